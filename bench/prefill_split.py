"""Where a whole-model prefill's GPU time goes: Engine.prefill tok/s for each prompt shape and
prefill chunk, and the kernels of one prefill grouped by what they compute (MoE, KDA, MLA,
cuBLAS GEMMs, norms, the rest), with the largest kernels by name.

    python bench/prefill_split.py                                 # 27 layers, 32x1k and 1x16k
    python bench/prefill_split.py --layers 8 --chunks 4096,16384
    python bench/prefill_split.py --chunks auto,4096      # the engine's default: sized from free memory
"""
from __future__ import annotations

import argparse

import torch

import harness  # noqa: F401  (puts the checkout on the path)
import kimi_graph
from e2e import free_memory, prefill_batch, slice_dict, timed
from harness import kernel_events, per_name, write_result
from kimi_graph.config import KimiLinearConfig
from kimi_graph.runtime import Engine

GROUPS = (("moe", ("moe",)), ("kda", ("kda",)), ("mla", ("mla", "attn", "flash")),
          ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")), ("norm", ("norm",)),
          ("conv", ("conv",)))


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--shapes", default="32x1024,1x16384")
    ap.add_argument("--chunks", default="auto,4096,16384,32768", help="tokens per prefill call, or auto")
    ap.add_argument("--name", default="prefill_split")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="kimi-linear-48b-a3b", help="preset (\"tiny\": a CPU smoke run)")
    args = ap.parse_args(argv)
    cfg = KimiLinearConfig.from_dict(slice_dict(args.config, args.layers))
    dt = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = kimi_graph.load(cfg, dtype=dt, device=args.device, pipeline="default", backend="triton")
    V, gen, rows = cfg.vocab_size, torch.Generator().manual_seed(0), []
    for shape in args.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        prompts = [torch.randint(0, V, (T,), generator=gen).tolist() for _ in range(B)]
        for chunk in (c if c == "auto" else int(c) for c in args.chunks.split(",")):
            if chunk != "auto" and chunk > B * T and str(chunk) != args.chunks.split(",")[0]:
                continue
            engine = Engine(model, max_batch=B, max_len=T + 8, prefill_chunk=chunk)
            if chunk == "auto":
                chunk = f"auto={engine.prefill_chunk}"
            run = prefill_batch(engine, prompts, last_only=True)
            try:
                first = timed(run, args.device)
                s = min(timed(run, args.device) for _ in range(2))
                events = kernel_events(run, reps=1) if args.device == "cuda" else []
            except torch.OutOfMemoryError as e:
                rows.append({"shape": shape, "chunk": chunk, "error": str(e)[:120]})
                print(rows[-1], flush=True)
                del engine
                free_memory()
                continue
            kernel_ms = sum(ms for _, ms in events)
            groups: dict = {}
            for n, ms in events:
                groups[group_of(n)] = groups.get(group_of(n), 0.0) + ms
            rows.append({"shape": shape, "chunk": chunk, "first_s": round(first, 2), "s": round(s, 4),
                         "tok_s": round(B * T / s), "kernel_ms": round(kernel_ms, 1), "kernels": len(events),
                         "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if args.device == "cuda" else None,
                         "groups_ms": {g: round(v, 1) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
                         "top": {k[:60]: round(v, 2) for k, v in list(per_name(events, 1).items())[:14]},
                         "other": {k[:60]: round(v, 2) for k, v in per_name(events, 1).items()
                                   if group_of(k) == "other" and v >= 0.05}})
            print(rows[-1], flush=True)
            del engine
            free_memory()
    if args.device == "cuda":          # provenance names the GPU
        write_result(args.name, rows, {"layers": args.layers})


if __name__ == "__main__":
    main()
