"""kimi-graph: Kimi Linear as a compiler-driven layer graph."""
from .api import KimiModel, load, resolve_config
from .config import ConfigError, KimiLinearConfig
from .interpreter import run_graph
from .ir import Graph, IRError, TensorType
from .model import build_graph
from .printer import parse_graph, print_graph
from .verifier import VerifyError, verify
from .weights import WeightError

__version__ = "0.1.0"
__all__ = ["load", "KimiModel", "KimiLinearConfig", "ConfigError", "Graph", "TensorType",
           "IRError", "VerifyError", "WeightError", "build_graph", "run_graph", "verify",
           "parse_graph", "print_graph", "resolve_config"]
