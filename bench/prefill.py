"""Prefill, old MoE path against new, in one run (bf16, published widths):
- one MoE layer's routed experts (E=256, top-8, D=2304, I=1024) at 1k / 4k / 32k tokens:
  old = route + permute (row copies) + grouped SwiGLU + un-permute; new = route + moe_experts
  (sort without copies, gate_up reading rows by index, down writing each copy to its token's
  slot, in-order combine). ms per layer, dispatch share (everything but the two grouped GEMMs),
  the grouped GEMM's TFLOP/s against cuBLAS on dense GEMMs of the same shapes and FLOPs, and
  against cuBLAS's 8192^3 rate, all measured in this run. Checks: new equal to old (bitwise),
  both against the float64 reference at 1k tokens.
- the grouped GEMM variants of bench/moe_swiglu.py swept at 4k and 32k tokens (--budget); the
  best per tile class goes to this device's tuning file.
- a published-width slice (--layers, default 4: KDA dense, KDA + MoE x2, MLA + MoE) through the
  engine as bench/e2e.py runs it: prefill tok/s at 1x4k, 32x1k, 1x16k, old and new path, and
  with a 16k-token prefill chunk; then the kernels of one 4k-token prefill call (profiler).

    python bench/prefill.py                                   # GPU, ~3 minutes
    TRITON_INTERPRET=1 python bench/prefill.py --smoke        # CPU: tiny shapes, wall clock
Short table last; JSON to bench/results/prefill.json."""
from __future__ import annotations

import argparse

import torch
from harness import copy_bandwidth, gemm_rate, kernel_times, merge_tuning, override_config, rel_err, \
    write_result

from e2e import prefill_batch, slice_dict, timed
import moe_dispatch
import moe_swiglu
from moe_dispatch import timer

from kimi_graph.lowering.triton import moe, moe_permute, moe_route
from kimi_graph.lowering.triton.targets import config
from kimi_graph.ops import get_op

ATTRS = dict(n_group=1, topk_group=1, renormalize=True, scaling=2.446, weights="official")
OLD = {"fused_min_rows": 1 << 62}          # moe_experts runs the chain at every size


class Shapes(moe_dispatch.Shapes):
    def __init__(self, smoke: bool):
        super().__init__(smoke)
        self.tokens = (40,) if smoke else (1024, 4096, 32768)
        self.slice_shapes = [(2, 8)] if smoke else [(1, 4096), (32, 1024), (1, 16384)]
        self.small_chunk, self.big_chunk = 4096, 16384      # the engine's default; a larger one


def layer_inputs(S, N, g):
    r = lambda *s, scale=1.0: (torch.randn(*s, device=S.dev, generator=g) * scale).to(S.dt)
    x, gate = r(N, S.D), r(S.E, S.D, scale=S.D ** -0.5)
    bias = torch.randn(S.E, device=S.dev, generator=g) * 0.01
    return x, gate, bias, r(N, S.D)


def time_layer(S, N, x, gate, bias, acc, w13, w2) -> dict:
    """ms of each part of one MoE layer's routed experts, old and new path."""
    t, E, K = timer(S), S.E, S.K
    ids, wts = moe_route.moe_route(x, gate, bias, top_k=K, **ATTRS)
    rows, off, order = moe_permute.moe_permute(x, ids, E)
    y = moe.grouped_swiglu(rows, off, w13, w2)
    slots = moe._swiglu_launch(x, off, w13, w2, ids.numel(), order, K)
    p = {"route": t(lambda: moe_route.moe_route(x, gate, bias, top_k=K, **ATTRS)),
         "old_permute": t(lambda: moe_permute.moe_permute(x, ids, E)),
         "old_gemm": t(lambda: moe.grouped_swiglu(rows, off, w13, w2)),
         "old_unpermute": t(lambda: moe_permute.moe_unpermute(y, order, wts, acc)),
         "new_sort": t(lambda: moe_permute.moe_sort(ids, E)),
         "new_gemm": t(lambda: moe._swiglu_launch(x, off, w13, w2, ids.numel(), order, K)),
         "new_combine": t(lambda: moe_permute.moe_combine(slots, wts, acc)),
         "new_total": t(lambda: moe.moe_experts(x, ids, wts, w13, w2, acc))}
    p["old_total"] = p["old_permute"] + p["old_gemm"] + p["old_unpermute"]
    return p


def dense_ms(S, M, t) -> float:
    """cuBLAS on dense GEMMs of the grouped op's shapes and FLOPs: [M,D]x[D,2I], [M,I]x[I,D]."""
    a, h = torch.randn(M, S.D, device=S.dev).to(S.dt), torch.randn(M, S.I, device=S.dev).to(S.dt)
    w1, w2 = torch.randn(2 * S.I, S.D, device=S.dev).to(S.dt), torch.randn(S.D, S.I, device=S.dev).to(S.dt)
    return t(lambda: a @ w1.T) + t(lambda: h @ w2.T)


def bench_layers(S, g, gemm_flops) -> list[dict]:
    t = timer(S)
    w13 = (torch.randn(S.E, 2 * S.I, S.D, device=S.dev, generator=g) * S.D ** -0.5).to(S.dt)
    w2 = (torch.randn(S.E, S.D, S.I, device=S.dev, generator=g) * S.I ** -0.5).to(S.dt)
    out = []
    for N in S.tokens:
        x, gate, bias, acc = layer_inputs(S, N, g)
        ids, wts = moe_route.moe_route(x, gate, bias, top_k=S.K, **ATTRS)
        new = moe.moe_experts(x, ids, wts, w13, w2, acc)
        override_config("moe_gemm", **OLD)
        old = moe.moe_experts(x, ids, wts, w13, w2, acc)
        override_config("moe_gemm", **BASE_GEMM)
        check = f"new==old {torch.equal(new, old)}"
        if N == S.tokens[0]:
            up = lambda a: a.double() if a.is_floating_point() else a
            ref = get_op("moe_experts").ref([up(a) for a in (x, ids, wts, w13, w2, acc)], {})[0]
            check += f"; rel err new {rel_err(new, ref):.2g} old {rel_err(old, ref):.2g}"
        p = time_layer(S, N, x, gate, bias, acc, w13, w2)
        flops = 6.0 * N * S.K * S.D * S.I
        dense = dense_ms(S, N * S.K, t)
        row = {"tokens": N, "old_ms": p["route"] + p["old_total"], "new_ms": p["route"] + p["new_total"],
               "old_dispatch": 1 - p["old_gemm"] / (p["route"] + p["old_total"]),
               "new_dispatch": 1 - p["new_gemm"] / (p["route"] + p["new_total"]),
               "gemm_TFLOPs": flops / (p["new_gemm"] * 1e-3) / 1e12,
               "of_dense_same_shape": dense / p["new_gemm"], "of_cublas_peak": flops / (p["new_gemm"] * 1e-3) / gemm_flops,
               "check": check, "parts_ms": {k: round(v, 4) for k, v in p.items()}}
        out.append(row)
        print(row, flush=True)
    return out


def bench_slice(S, layers: int) -> tuple[list[dict], dict]:
    """Engine prefill tok/s on a slice, old and new MoE path (and a 16k prefill chunk); the
    kernels of one 4k-token call."""
    import kimi_graph
    from kimi_graph.config import KimiLinearConfig
    from kimi_graph.runtime.engine import Engine
    cfg = "tiny" if S.smoke else KimiLinearConfig.from_dict(slice_dict("kimi-linear-48b-a3b", layers))
    model = kimi_graph.load(cfg, dtype=S.dt, device=S.dev, pipeline="default", backend="triton")
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    shapes = S.slice_shapes
    rows, profile = [], {}
    for B, T in shapes:
        prompts, logits = [torch.randint(0, V, (T,), generator=gen).tolist() for _ in range(B)], []
        for path, over, chunk in (("old", OLD, None), ("new", {}, None), ("new, chunk 16k", {}, S.big_chunk)):
            if chunk and B * T <= S.small_chunk:
                continue
            override_config("moe_gemm", **{**BASE_GEMM, **over})
            engine = Engine(model, max_batch=B, max_len=T + 8, **({"prefill_chunk": chunk} if chunk else {}))
            run = prefill_batch(engine, prompts)
            s = timed(lambda: logits.append(run()), S.dev) if S.smoke else None   # smoke: the first call
            if not S.smoke:
                logits.append(run())                                  # kernels compile on first use
                s = min(timed(run, S.dev) for _ in range(2))
            rows.append({"shape": f"{B}x{T}", "path": path, "s": s, "tok_s": B * T / s})
            if path != "old":
                rows[-1]["logits_vs_old"] = max(rel_err(a, b) for a, b in zip(logits[-1], logits[0]))
            print(rows[-1], flush=True)
            if (B, T) == shapes[0] and path == "new" and not S.smoke:
                profile = {k: round(v, 3) for k, v in list(kernel_times(run, reps=1).items())[:16]}
            del engine
    override_config("moe_gemm", **BASE_GEMM)
    return rows, profile


BASE_GEMM: dict = {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1), wall clock")
    ap.add_argument("--layers", type=int, default=4, help="depth of the published-width slice")
    ap.add_argument("--no-sweep", action="store_true", help="skip the grouped GEMM tile sweep")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds after which no sweep variant starts")
    args = ap.parse_args()
    S = Shapes(args.smoke)
    BASE_GEMM.update(config("moe_gemm"))
    bw, flops = (1e11, 1e12) if S.smoke else (copy_bandwidth(), gemm_rate())
    g = torch.Generator(device=S.dev).manual_seed(0)
    sweep_rows = []
    if not args.no_sweep:
        sweep_rows, best, cfg = moe_swiglu.sweep((70, 260) if S.smoke else (4096, 32768), args.budget, S.smoke,
                                                 ["current", "host_half"] if S.smoke else None)
        BASE_GEMM.update(cfg)
        override_config("moe_gemm", **cfg)
        if not S.smoke and best:
            merge_tuning("moe_gemm", cfg, "bench/prefill.py: best of bench/moe_swiglu.py's grouped GEMM variants "
                         f"per class ({best}) at 4k, 32k tokens")
    layer_rows = bench_layers(S, g, flops)
    slice_rows, profile = bench_slice(S, args.layers)
    table = [{"what": f"MoE layer {r['tokens']} tok", "old": r["old_ms"], "new": r["new_ms"],
              "new/old": r["new_ms"] / r["old_ms"], "note": f"dispatch {r['old_dispatch']:.1%} -> "
              f"{r['new_dispatch']:.1%}; gemm {r['gemm_TFLOPs']:.0f} TF/s = {r['of_dense_same_shape']:.0%} "
              f"of dense cuBLAS, {r['of_cublas_peak']:.0%} of peak; {r['check']}"} for r in layer_rows]
    for shape in dict.fromkeys(r["shape"] for r in slice_rows):
        by = {r["path"]: r for r in slice_rows if r["shape"] == shape}
        table.append({"what": f"{args.layers}-layer prefill {shape} tok/s", "old": by["old"]["tok_s"],
                      "new": by["new"]["tok_s"], "new/old": by["new"]["tok_s"] / by["old"]["tok_s"],
                      "note": (f"chunk 16k: {by['new, chunk 16k']['tok_s']:.4g} tok/s; "
                               if "new, chunk 16k" in by else "") + f"logits vs old {by['new']['logits_vs_old']:.2g}"})
    extra = {"copy_bandwidth_GBps": bw / 1e9, "bf16_gemm_TFLOPs": flops / 1e12, "layers": layer_rows,
             "slice": slice_rows, "slice_layers": args.layers, "profile_1x4k_new_ms": profile,
             "gemm_sweep": sweep_rows, "gemm_config": BASE_GEMM,
             "shape": f"E={S.E}, top-{S.K}, D={S.D}, I={S.I}, {S.dt}"}
    if profile:
        print("\nkernels of one 1x4k prefill call (ms):")
        for k, v in profile.items():
            print(f"  {v:9.3f}  {k[:100]}")
    if S.smoke:
        for r in table:
            print(r)
    else:
        write_result("prefill", table, extra)


if __name__ == "__main__":
    main()
