"""`kimi-graph` command line. Each subcommand lives in the module that owns its feature;
modules are imported only when their command runs."""
from __future__ import annotations

import argparse
import importlib
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-graph", description="Kimi Linear as a compiler-driven graph")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (mod, help_) in COMMANDS.items():
        modules[name] = importlib.import_module(mod)
        modules[name].add_arguments(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except (ValueError, FileNotFoundError) as e:       # our errors are ValueErrors: say them plainly
        print(f"kimi-graph {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
