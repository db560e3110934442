"""CLI subcommands, one module each (see kimi_graph/cli.py)."""
