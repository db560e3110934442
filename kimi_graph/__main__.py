"""`python -m kimi_graph ...`: the kimi-graph command line."""
import sys

from .cli import main

sys.exit(main())
