"""`kimi-graph export-mlir MODEL --dialect torch|linalg-on-tensors|stablehlo --out FILE`:
the model as MLIR through torch-mlir (static shapes; weights inlined; custom ops decomposed
to their reference form, as the file's header says). Needs the `mlir` extra."""
from __future__ import annotations


def add_arguments(p):
    from ..lowering.mlir.export import DIALECTS
    p.add_argument("model", help="model directory (config.json + safetensors) or preset name")
    p.add_argument("--dialect", default="torch", choices=DIALECTS)
    p.add_argument("--out", required=True, help="output .mlir file")
    p.add_argument("--mode", default="prefill", choices=["prefill", "decode"])
    p.add_argument("--stateful", action="store_true", help="prefill over caches (decode always is)")
    p.add_argument("--batch", type=int, default=1, help="B (default 1)")
    p.add_argument("--seq", type=int, default=8, help="T, prefill tokens (default 8)")
    p.add_argument("--cache-len", type=int, default=16, help="S, MLA cache slots (default 16)")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16", "f64"])
    p.add_argument("--pipeline", default=None, help="pass pipeline to run first (e.g. default)")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def run(args) -> int:
    from ..api import load
    from .output import human_bytes
    from ..lowering.mlir.export import example_inputs, export_mlir
    from ..ops import TORCH_DTYPES

    from .output import output_file
    for flag in ("batch", "seq", "cache_len"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    out = output_file(args.out, args.force)
    model = load(args.model, dtype=TORCH_DTYPES[args.dtype], pipeline=args.pipeline, seed=args.seed)
    g = model.get_graph(args.mode, args.stateful)
    inputs = example_inputs(g, args.batch, 1 if args.mode == "decode" else args.seq, args.cache_len)
    text = export_mlir(g, model.weights, args.dialect, inputs)    # ImportError without torch-mlir
    out.write_text(text)
    print(f"wrote {args.out}: {args.dialect}, {human_bytes(len(text))}, graph {g.name} ({len(g)} ops)")
    return 0
