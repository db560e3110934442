"""Decode step of a 2-layer slice of Kimi-Linear-48B-A3B: eager vs torch.compile vs
torch.compile with CUDA graphs (mode="reduce-overhead"), through the torch lowering.

The slice keeps the published dims and takes one layer of each attention kind: layer 0 is
KDA with the dense SwiGLU FFN, layer 1 is MLA with the 256-expert MoE; embedding and lm_head
are the published ones. bf16 weights, random (seeded). One run checks correctness (each
variant's logits and new states against the reference interpreter on the same GPU), counts
graph breaks (torch._dynamo.explain), and times each variant (CUDA events, median of
harness.bench: warm-up, then repeats) for each batch size; writes results.json and results.md under
$OUT (or --out) after every batch size, and prints the table last.

    python bench/torch_compile_decode.py                     # on the GPU: B=1 and B=32
    python bench/torch_compile_decode.py --config tiny --device cpu --dtype f32 --batch 2
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from harness import bench, provenance, rel_err     # bench/harness.py (also puts the repo on sys.path)

from kimi_graph.config import KimiLinearConfig
from kimi_graph.interpreter import run_graph
from kimi_graph.ir import eval_dim
from kimi_graph.lowering.torch import lower
from kimi_graph.model import build_graph
from kimi_graph.ops import TORCH_DTYPES
from kimi_graph.presets import PRESETS
from kimi_graph.weights import random_weights

TOL = {"bf16": 2e-2, "f32": 1e-4}   # ‖out - ref‖ / ‖ref‖ against the interpreter


def slice_config(name: str) -> KimiLinearConfig:
    d = copy.deepcopy(PRESETS[name])
    if name != "tiny":
        d["num_hidden_layers"] = 2
        d["linear_attn_config"]["kda_layers"], d["linear_attn_config"]["full_attn_layers"] = [1], [2]
    return KimiLinearConfig.from_dict(d)


def make_weights(g, device: str, seed: int) -> dict[str, torch.Tensor]:
    """The project's random_weights, except the big matrices (routed experts, embedding,
    lm_head), drawn on the device with the same rule (std 1/sqrt(fan_in); embedding std 1):
    drawing 2.5 B numbers on the CPU would take most of a device run."""
    big = {n for n, t in g.params.items() if ".experts." in n or t.shape[0] >= 100_000}
    small = g.copy()
    for n in big:
        small.remove_param(n)
    w = random_weights(small, seed=seed, device=device)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    for n in sorted(big):
        ty = g.params[n]
        t = torch.randn(ty.shape, generator=gen, device=device, dtype=TORCH_DTYPES[ty.dtype])
        w[n[1:]] = t if "embed_tokens" in n else t.div_(math.sqrt(ty.shape[-1]))
    return w


def make_inputs(g, B: int, S: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab = next(g.types[op.inputs[1]].shape[0] for op in g.ops() if op.kind == "embedding")
    out = {"%input_ids": torch.randint(0, vocab, (B, 1), generator=gen, device=device),
           "%cache_pos": torch.randint(S // 4, S - 1, (B,), generator=gen, device=device)}
    for n in g.meta["state_inputs"]:
        ty = g.types[n]
        shape = [eval_dim(d, {"B": B, "S": S}) for d in ty.shape]
        scale = 0.1 if n.endswith(".kda") else 1.0
        out[n] = (scale * torch.randn(shape, generator=gen, device=device)).to(TORCH_DTYPES[ty.dtype])
    return out


def time_ms(fn, device: str, rep_ms: int) -> float:
    """Median ms per call: CUDA events on the GPU (harness.bench), the host clock on the CPU."""
    if device == "cuda":
        return bench(fn, warmup=max(rep_ms // 4, 1), rep=rep_ms)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_batch(g, gm, weights, B: int, args) -> dict:
    inputs = make_inputs(g, B, args.cache_len, args.device, args.seed + B)
    flat = [inputs[n] for n in g.inputs]
    ref = run_graph(g, inputs, weights)
    res = {"B": B, "S": args.cache_len}
    explain = torch._dynamo.explain(gm)(*flat)
    res["graph_breaks"], res["graphs"] = explain.graph_break_count, explain.graph_count
    variants = {"eager": (gm, False)}
    variants["compiled"] = (torch.compile(gm, fullgraph=True, dynamic=False), False)
    if args.device == "cuda":
        variants["compiled+cudagraphs"] = (
            torch.compile(gm, fullgraph=True, dynamic=False, mode="reduce-overhead"), True)
    for name, (fn, graphs) in variants.items():
        def step(fn=fn, graphs=graphs):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            return fn(*flat)
        t0 = time.perf_counter()
        out = [o.clone() for o in step()]
        for _ in range(2):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        errs = [rel_err(o, r) for o, r in zip(out, ref)]
        res[name] = {"ms": time_ms(step, args.device, args.rep_ms), "first_calls_s": round(first, 1),
                     "max_rel_err": max(errs), "logits_rel_err": errs[0],
                     "ok": all(e <= TOL[args.dtype] for e in errs)}
        print(f"B={B} {name}: {res[name]}", flush=True)
    return res


def table(rows: list[dict]) -> str:
    names = [n for n in ("eager", "compiled", "compiled+cudagraphs") if n in rows[0]]
    head = "| B | " + " | ".join(f"{n} ms/step" for n in names) + " | speedup vs eager | max rel err | graph breaks |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for r in rows:
        best = names[-1]
        lines.append(f"| {r['B']} | " + " | ".join(f"{r[n]['ms']:.3f}" for n in names)
                     + f" | {r['eager']['ms'] / r[best]['ms']:.2f}x ({best})"
                     + f" | {max(r[n]['max_rel_err'] for n in names):.1e} | {r['graph_breaks']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="kimi-linear-48b-a3b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(TOL))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--rep-ms", type=int, default=400, help="timing budget per variant (GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/out"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    cfg = slice_config(args.config)
    g = build_graph(cfg, "decode", dtype=args.dtype)
    weights = make_weights(g, args.device, args.seed)
    gm = lower(g, weights)
    meta = {**(provenance() if args.device == "cuda" else {"device": "cpu", "torch": torch.__version__}),
            "config": f"{args.config} ({cfg.num_hidden_layers} layers: {', '.join(cfg.layer_kinds)})",
            "dtype": args.dtype, "ops": len(g), "setup_s": round(time.perf_counter() - t0, 1),
            "params_B": round(sum(t.numel() for t in weights.values()) / 1e9, 3)}
    print(json.dumps(meta), flush=True)
    rows = []
    for B in args.batch:
        rows.append(bench_batch(g, gm, weights, B, args))
        result = {"meta": meta, "rows": rows}
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0 if all(r[n]["ok"] for r in rows for n in r if isinstance(r[n], dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
