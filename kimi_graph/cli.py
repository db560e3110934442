"""`kimi-graph` command line (also `python -m kimi_graph`). Each subcommand lives in the module
that owns its feature; their heavy imports happen only when the command runs.

A user's mistake (an error of a class in USER_ERRORS: a bad value, a missing or misnamed
file, a missing optional package) prints one line `kimi-graph CMD: error: ...` and exits
with 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> module with add_arguments(parser) and run(args) -> int
COMMANDS = {
    "demo": ("kimi_graph.commands.demo", "run the embedded tiny model end to end"),
    "inspect": ("kimi_graph.commands.inspect", "print a model's IR and a summary"),
    "compile": ("kimi_graph.commands.compile", "build the model's Triton kernels per GPU target"),
    "generate": ("kimi_graph.commands.generate", "generate tokens from a prompt, streamed"),
    "serve": ("kimi_graph.commands.serve", "serve a model over OpenAI-compatible HTTP"),
    "export-mlir": ("kimi_graph.commands.export_mlir", "export MLIR through torch-mlir (torch, linalg, stablehlo)"),
    "export-onnx": ("kimi_graph.commands.export_onnx", "export ONNX models, weights and genai_config.json"),
}

# ValueError covers ConfigError, WeightError, GenerationError, ...; OSError covers files that
# are missing, are directories, or cannot be written
USER_ERRORS = (ValueError, OSError, ImportError)
EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "onnxruntime_genai": "genai", "triton": "triton",
          "torch_mlir": "mlir", "starlette": "serve", "uvicorn": "serve", "prometheus_client": "serve"}


def describe(e: BaseException) -> str:
    """The message a user sees for an error of USER_ERRORS."""
    if isinstance(e, ImportError):
        root = (e.name or "").split(".")[0]
        hint = f"; install it with: pip install 'kimi-graph[{EXTRAS[root]}]'" if root in EXTRAS else ""
        return f"{e}{hint}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return str(e) or type(e).__name__


def parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="kimi-graph", description="Kimi Linear as a compiler-driven graph")
    p.add_argument("--version", action="version", version=f"kimi-graph {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        importlib.import_module(mod).add_arguments(
            sub.add_parser(name, help=help_, description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
        sys.stdout.flush()
        return code
    except BrokenPipeError:         # the reader went away (`kimi-graph inspect ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no error at exit
        return 0
    except KeyboardInterrupt:
        print(f"kimi-graph {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"kimi-graph {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
