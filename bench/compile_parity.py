"""Compiled torch backend against eager, on a published-width slice: prefill logits and one
decode step of every variant against the fp32 eager model with the op library's kernels.

    python bench/compile_parity.py --layers 2 4
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kimi_graph
from kimi_graph.runtime import Engine

from compile_depth import rel_err, slice_config

VARIANTS = [  # name, dtype, backend, compile, kernels
    ("eager-f32-torchk", torch.float32, "torch", False, "torch"),
    ("compiled-f32-torchk", torch.float32, "torch", True, "torch"),
    ("eager-bf16-torchk", torch.bfloat16, "torch", False, "torch"),
    ("compiled-bf16-torchk", torch.bfloat16, "torch", True, "torch"),
    ("eager-f32-tritonk", torch.float32, "torch", False, "triton"),
    ("compiled-f32-tritonk", torch.float32, "torch", True, "triton"),
    ("eager-bf16-tritonk", torch.bfloat16, "torch", False, "triton"),
    ("compiled-bf16-tritonk", torch.bfloat16, "torch", True, "triton"),
    ("triton-f32", torch.float32, "triton", False, None),
    ("triton-bf16", torch.bfloat16, "triton", False, None),
]


def run(cfg, prompt, dtype, backend, compile, kernels):
    opts = {} if backend == "triton" else {"compile": compile, "kernels": kernels}
    model = kimi_graph.load(cfg, dtype=dtype, device="cuda", pipeline="default", backend=backend, **opts)
    engine = Engine(model, max_batch=1, max_len=len(prompt) + 64, window_block=64)
    t = time.perf_counter()
    with engine.sequence() as s:
        logits = s.extend(prompt).float()
        step = engine.decode([s.slot], [7]).float()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del model, engine
    torch.cuda.empty_cache()
    if kernels == "triton":     # registered process-wide: the next variant picks its own
        from kimi_graph.lowering.torch.custom_ops import custom_kinds, set_impl
        for kind in custom_kinds():
            set_impl(kind, "cuda", None)
    return logits, step, dt


def main():
    """Prints one row per (layers, variant) and a table last; --out writes them as JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--out", help="JSON file for the rows")
    args = p.parse_args()
    rows = []
    for layers in args.layers:
        cfg = slice_config("kimi-linear-48b-a3b", layers)
        prompt = [int(x) for x in torch.randint(3, cfg.vocab_size, (args.prompt_len,),
                                                generator=torch.Generator().manual_seed(0))]
        ref = None
        for name, dtype, backend, compile, kernels in VARIANTS:
            try:
                out = run(cfg, prompt, dtype, backend, compile, kernels)
            except Exception as err:  # noqa: BLE001 - reported in the table
                rows.append((layers, name, f"failed: {type(err).__name__}: {str(err)[:200]}"))
                continue
            ref = ref or out
            rows.append((layers, name, rel_err(out[0], ref[0]), rel_err(out[1], ref[1]), out[2]))
            print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print("| layers | variant | prefill rel err | decode rel err | first-call s |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(f"{x:.2e}" if isinstance(x, float) else str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
