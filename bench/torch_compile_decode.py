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
from kimi_graph.passes import run_pipeline
from kimi_graph.presets import PRESETS
from kimi_graph.weights import random_weights

# ‖out - ref‖ / ‖ref‖ against the interpreter. bf16: rounding differs between Inductor's
# fused kernels and eager ops, and can flip a near-tied expert choice (seen: 3e-2 on logits)
TOL = {"bfloat16": 5e-2, "float32": 1e-4}


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


# name -> (graph: "declared" | "optimized" (default pipeline), torch.compile mode or None for
# eager, custom-op kernels on CUDA: "default" (static forms / references) or "triton")
VARIANTS = {
    "eager": ("declared", None, "default"),
    "compiled": ("declared", "default", "default"),
    "compiled+cudagraphs": ("declared", "reduce-overhead", "default"),
    "opt eager": ("optimized", None, "default"),
    "opt compiled+cudagraphs": ("optimized", "reduce-overhead", "default"),
    "opt compiled+cudagraphs, triton kernels": ("optimized", "reduce-overhead", "triton"),
}


def run_variant(name, g, weights, inputs, ref, args) -> dict:
    """Correctness against `ref` (the interpreter's outputs), then time per step."""
    _, mode, kernels = VARIANTS[name]
    registered = []
    try:
        if kernels == "triton":
            from kimi_graph.lowering.triton.backend import register_custom_ops
            registered = register_custom_ops("cuda")
        fn = lower(g, weights)
        if mode is not None:
            fn = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
        graphs = mode == "reduce-overhead"
        flat = [inputs[n] for n in g.inputs]

        def step():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            return fn(*flat)

        t0 = time.perf_counter()
        out = [o.clone() for o in step()]
        for _ in range(3):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        errs = [rel_err(o, r) for o, r in zip(out, ref)]
        res = {"ms": time_ms(step, args.device, args.rep_ms), "first_calls_s": round(first, 1),
               "max_rel_err": max(errs), "logits_rel_err": errs[0],
               "states_max_rel_err": max(errs[1:]), "ok": max(errs) <= TOL[str(out[0].dtype)[6:]]}
        if registered:
            res["triton_kinds"] = registered
    except Exception as e:          # a variant that fails is reported, the others still run
        res = {"error": f"{type(e).__name__}: {str(e)[:400]}", "ok": False}
    finally:
        if registered:
            from kimi_graph.lowering.torch.custom_ops import set_impl
            for k in registered:
                set_impl(k, "cuda", None)
    print(f"  {name}: {res}", flush=True)
    return res


def bench_batch(graphs, weights, B: int, args, res: dict, save) -> None:
    """Fill `res` variant by variant, calling `save()` after each."""
    res.update({"B": B, "S": args.cache_len})
    refs = {}
    for name, (which, mode, _) in VARIANTS.items():
        if mode == "reduce-overhead" and args.device != "cuda":
            continue
        g = graphs[which]
        if which not in refs:
            inputs = make_inputs(graphs["declared"], B, args.cache_len, args.device, args.seed + B)
            refs[which] = (inputs, run_graph(g, inputs, weights))
            explain = torch._dynamo.explain(lower(g, weights))(*[inputs[n] for n in g.inputs])
            res[f"{which} graph breaks"] = explain.graph_break_count
            res[f"{which} ops"] = len(g)
        res[name] = run_variant(name, g, weights, *refs[which], args)
        save()


def fp32_check(g32, weights, B: int, args) -> dict:
    """The declared graph in fp32 (the bf16 weights upcast): compiled with CUDA graphs against
    the fp32 interpreter, where rounding cannot flip a routing decision."""
    w32 = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    inputs = make_inputs(g32, B, args.cache_len, args.device, args.seed + B)
    ref = run_graph(g32, inputs, w32)
    mode = "compiled+cudagraphs" if args.device == "cuda" else "compiled"
    res = {"B": B, "variant": mode, **run_variant(mode, g32, w32, inputs, ref, args)}
    del w32
    return res


def table(rows: list[dict]) -> str:
    names = [n for n in VARIANTS if n in rows[0]]
    rows = [r for r in rows if all(n in r for n in names)]
    lines = ["| variant | " + " | ".join(f"B={r['B']} ms/step" for r in rows)
             + " | " + " | ".join(f"B={r['B']} max rel err" for r in rows) + " |",
             "|---|" + "---|" * (2 * len(rows))]
    for n in names:
        cells = [f"{r[n]['ms']:.3f}" if "ms" in r[n] else "failed" for r in rows]
        errs = [f"{r[n]['max_rel_err']:.1e}" if "ms" in r[n] else r[n]["error"][:60] for r in rows]
        lines.append(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(errs) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="kimi-linear-48b-a3b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--rep-ms", type=int, default=300, help="timing budget per variant (GPU)")
    p.add_argument("--no-fp32-check", dest="fp32_check", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/out"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    cfg = slice_config(args.config)
    g = build_graph(cfg, "decode", dtype=args.dtype)
    weights = make_weights(g, args.device, args.seed)
    graphs = {"declared": g, "optimized": run_pipeline(g, "default", weights=weights)}
    meta = {**(provenance() if args.device == "cuda" else {"device": "cpu", "torch": torch.__version__}),
            "config": f"{args.config} ({cfg.num_hidden_layers} layers: {', '.join(cfg.layer_kinds)})",
            "dtype": args.dtype, "ops": len(g), "setup_s": round(time.perf_counter() - t0, 1),
            "params_B": round(sum(t.numel() for t in weights.values()) / 1e9, 3)}
    print(json.dumps(meta), flush=True)
    result = {"meta": meta, "rows": []}
    if args.fp32_check:
        print(f"fp32 check, B={max(args.batch)}:", flush=True)
        result["fp32_check"] = fp32_check(build_graph(cfg, "decode", dtype="f32"), weights,
                                          max(args.batch), args)

    def save():
        (out / "results.json").write_text(json.dumps(result, indent=1))

    for B in args.batch:
        print(f"B={B}:", flush=True)
        result["rows"].append({})
        bench_batch(graphs, weights, B, args, result["rows"][-1], save)
        (out / "results.md").write_text(table(result["rows"]) + "\n")
    print(table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
