"""MoE dispatch on the published shapes (E=256, top-8, D=2304, I=1024, bf16), the kernels before
(bench/moe_dispatch_before.py) against now, in one run:
- route, B = 1, 8, 64 tokens: CUDA-graph replay (as a captured decode step runs it) and eager;
  target <= 10 us per layer. Also 32k tokens (prefill).
- permute (sort + row copy), 1k / 32k / 128k tokens: the counting sort against the single-program
  sort before and against torch.sort(stable) + an index; the row copy's floor is its bytes (rows
  written, x read once) over the copy bandwidth measured in the same run.
- one MoE layer's routed part at 32k tokens: route + permute + grouped SwiGLU + un-permute;
  dispatch share = (route + permute + un-permute) / total, target <= 10%.
Tile candidates for the router and the permutation are swept in the same run; the winners are
printed and merged into this device's tuning file (bench/results/tuning-<device>.json).
Every timed kernel is first checked: router ids against the op library's fp32 reference (near
ties may flip: <= 1% of choices), permutation outputs equal to the reference's.

    python bench/moe_dispatch.py            # on a GPU
    python bench/moe_dispatch.py --route-only   # the router's decode tiles alone (B = 1, 8, 64), ~1 min
    TRITON_INTERPRET=1 python bench/moe_dispatch.py --smoke     # CPU: tiny shapes, wall clock"""
from __future__ import annotations

import argparse
import time

import torch
from harness import bench, bench_graph, copy_bandwidth, merge_tuning, override_config, rel_err, write_result

import moe_dispatch_before as before
from kimi_graph.lowering.triton import moe, moe_permute, moe_route
from kimi_graph.lowering.triton.targets import config
from kimi_graph.ops import get_op

ROUTE_SMALL = [          # decode tiles: logits (BN/BE/BK_small, warps, K-split target) and selection
    {},
    {"BE_small": 16, "BK_small": 64, "programs": 528},
    {"BE_small": 16, "BK_small": 128, "programs": 264},
    {"BE_small": 64, "BK_small": 128, "programs": 132},
    {"BE_small": 32, "BK_small": 64, "programs": 528},
    {"BE_small": 32, "BK_small": 128, "num_warps_small": 2},
    {"BN_small": 32, "BE_small": 32, "BK_small": 64, "num_warps_small": 4},
    {"BR": 1, "select_warps": 2},
    {"BR": 8, "select_warps": 8},
    # one reduction a pick (moe_route.SELECTIONS), with fewer warps (fewer cross-warp steps a reduction)
    {"select": "packed"},
    {"select": "packed", "num_warps_small": 2},
    {"select": "packed", "num_warps_small": 1, "BE_small": 16},
    {"select": "packed", "num_warps_small": 2, "BE_small": 64, "BK_small": 256, "programs": 132},
    {"select": "packed", "num_warps_small": 4, "BE_small": 64, "BK_small": 256, "programs": 132},
    {"select": "packed", "BR": 1, "select_warps": 2, "num_warps_small": 2},
]
ROUTE_LARGE = [          # prefill tiles of the logits GEMM
    {},
    {"BN": 128, "BE": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
    {"BN": 64, "BE": 256, "BK": 64, "num_warps": 8, "num_stages": 3},
    {"BN": 128, "BE": 256, "BK": 32, "num_warps": 8, "num_stages": 3},
    {"BN": 64, "BE": 64, "BK": 64, "num_warps": 4, "num_stages": 4},
]
PERMUTE = [
    {},
    {"BLOCK": 512},
    {"BLOCK": 2048},
    {"SUB": 32},
    {"SUB": 128, "num_warps": 8},
    {"BD": 128},
    {"BD": 512},
    {"BLOCK": 2048, "BD": 512, "num_warps": 8},
]


class Shapes:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.dev = "cpu" if smoke else "cuda"
        self.dt = torch.float32 if smoke else torch.bfloat16     # the interpreter runs fp32 only
        self.E, self.K, self.D, self.I = (16, 4, 64, 32) if smoke else (256, 8, 2304, 1024)
        self.route_B = (1, 8, 64)
        self.prefill = 300 if smoke else 32768
        self.permute_N = (40, 300) if smoke else (1024, 32768, 131072)


def timer(S: Shapes, graph: bool = False):
    """Median ms of fn(): do_bench (or graph replay) on the GPU; one wall-clock call in --smoke."""
    if not S.smoke:
        return bench_graph if graph else bench

    def wall(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return wall


def route_inputs(S: Shapes, N, g):
    x = torch.randn(N, S.D, device=S.dev, generator=g).to(S.dt)
    w = (torch.randn(S.E, S.D, device=S.dev, generator=g) * S.D ** -0.5).to(S.dt)
    return x, w, torch.randn(S.E, device=S.dev, generator=g) * 0.01


ATTRS = dict(n_group=1, topk_group=1, renormalize=True, scaling=2.446, weights="official")


def check_route(ids, wts, x, w, b, K):
    """Fraction of choices that differ from the fp32 reference; weight error on equal rows."""
    ri, rw = get_op("moe_route").ref([x.float(), w.float(), b], dict(ATTRS, top_k=K))
    same = (ids == ri).all(-1)
    return (ids != ri).float().mean().item(), rel_err(wts[same], rw[same]) if same.any() else float("nan")


def sweep_best(rows, part, variants, sizes):
    """Index of the variant with the lowest mean time relative to the best at each size."""
    t = {(r["variant"], r["tokens"]): r["us"] for r in rows if r["part"] == part}
    best = {n: min(t[(v, n)] for v in range(len(variants)) if (v, n) in t) for n in sizes}
    score = [sum(t.get((v, n), float("inf")) / best[n] for n in sizes) for v in range(len(variants))]
    return min(range(len(variants)), key=score.__getitem__)


def bench_route(S, rows, g, decode_only=False):
    K, base = S.K, dict(config("moe_route"))
    ins = {N: route_inputs(S, N, g) for N in S.route_B + (() if decode_only else (S.prefill,))}
    for N, (x, w, b) in ins.items():          # before, for the record
        ids, wts = before.route(x, w, b, K, ATTRS["scaling"])
        flips, err = check_route(ids, wts, x, w, b, K)
        run = lambda: before.route(x, w, b, K, ATTRS["scaling"])
        eager = timer(S)(run)
        graph = timer(S, graph=True)(run) if N <= 64 else eager
        rows.append({"part": "route" if N <= 64 else "route_prefill", "tokens": N, "variant": "before",
                     "us": graph * 1e3, "graph_us": graph * 1e3, "eager_us": eager * 1e3,
                     "check": f"flips {flips:.3g} err {err:.2g}"})
    sweeps = ((S.route_B, ROUTE_SMALL, "route"),) + (() if decode_only else (((S.prefill,), ROUTE_LARGE, "route_prefill"),))
    for sizes, variants, tag in sweeps:
        for v, over in enumerate(variants):
            override_config("moe_route", **{**base, **over})
            for N in sizes:
                x, w, b = ins[N]
                ids, wts = moe_route.moe_route(x, w, b, top_k=K, **ATTRS)
                flips, err = check_route(ids, wts, x, w, b, K)
                run = lambda: moe_route.moe_route(x, w, b, top_k=K, **ATTRS)
                eager = timer(S)(run)
                graph = timer(S, graph=True)(run) if N <= 64 else eager
                rows.append({"part": tag, "tokens": N, "variant": v, "us": graph * 1e3, "graph_us": graph * 1e3,
                             "eager_us": eager * 1e3, "check": f"flips {flips:.3g} err {err:.2g}",
                             "config": over})
        win = sweep_best(rows, tag, variants, sizes)
        base = {**base, **variants[win]}
        print(f"{tag}: best variant {win} {variants[win]}")
    override_config("moe_route", **base)
    return base


def permute_inputs(S, N, g):
    x = torch.randn(N, S.D, device=S.dev, generator=g).to(S.dt)
    ids = torch.rand(N, S.E, device=S.dev, generator=g).topk(S.K, -1)[1]
    return x, ids


def torch_permute(x, ids, E):
    """The library primitive: a stable radix sort of the expert ids, then an index."""
    flat = ids.reshape(-1)
    keys, order = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(keys, torch.arange(E + 1, device=x.device))
    return x[order // ids.shape[-1]], offsets, order


def bench_permute(S, rows, g, bw):
    base = dict(config("moe_permute"))
    sizes = S.route_B + S.permute_N
    ins = {N: permute_inputs(S, N, g) for N in sizes}
    for N, (x, ids) in ins.items():
        ref = get_op("moe_permute").ref([x, ids], {"num_experts": S.E})
        floor = (N * S.K + N) * S.D * x.element_size() / bw * 1e6     # rows written, x read once
        fns = {"torch.sort": lambda: torch_permute(x, ids, S.E)}
        if N <= 32768 or S.smoke:           # the single-program sort takes ~0.4 s at 128k tokens
            fns["before"] = lambda: before.permute(x, ids, S.E)
        for name, fn in fns.items():
            ok = all(torch.equal(a, r) for a, r in zip(fn(), ref))
            rows.append({"part": "permute", "tokens": N, "variant": name, "us": timer(S)(fn) * 1e3,
                         "graph_us": "-", "check": f"exact {ok}; copy floor {floor:.3g} us"})
    for v, over in enumerate(PERMUTE):
        override_config("moe_permute", **{**base, **over})
        for N, (x, ids) in ins.items():
            ref = get_op("moe_permute").ref([x, ids], {"num_experts": S.E})
            ok = all(torch.equal(a, r) for a, r in zip(moe_permute.moe_permute(x, ids, S.E), ref))
            fn = lambda: moe_permute.moe_permute(x, ids, S.E)
            ms = timer(S, graph=N <= 64)(fn)
            rows.append({"part": "permute_new", "tokens": N, "variant": v, "us": ms * 1e3,
                         "graph_us": ms * 1e3 if N <= 64 else "-", "check": f"exact {ok}", "config": over})
    win = sweep_best(rows, "permute_new", PERMUTE, sizes)
    print(f"permute: best variant {win} {PERMUTE[win]}")
    best = {**base, **PERMUTE[win]}
    override_config("moe_permute", **best)
    return best


def bench_layer(S, g):
    """One MoE layer's routed experts at the prefill size: each part's time, new and before."""
    N, E, K, D, I = S.prefill, S.E, S.K, S.D, S.I
    x, w, b = route_inputs(S, N, g)
    w13 = (torch.randn(E, 2 * I, D, device=S.dev, generator=g) * D ** -0.5).to(S.dt)
    w2 = (torch.randn(E, D, I, device=S.dev, generator=g) * I ** -0.5).to(S.dt)
    ids, wts = moe_route.moe_route(x, w, b, top_k=K, **ATTRS)
    rows_, off, order = moe_permute.moe_permute(x, ids, E)
    y = moe.grouped_swiglu(rows_, off, w13, w2)
    t = timer(S)
    parts = {"route": t(lambda: moe_route.moe_route(x, w, b, top_k=K, **ATTRS)),
             "permute": t(lambda: moe_permute.moe_permute(x, ids, E)),
             "grouped_swiglu": t(lambda: moe.grouped_swiglu(rows_, off, w13, w2)),
             "unpermute": t(lambda: moe_permute.moe_unpermute(y, order, wts, x)),
             "route_before": t(lambda: before.route(x, w, b, K, ATTRS["scaling"])),
             "permute_before": t(lambda: before.permute(x, ids, E))}
    share = lambda r, p: (r + p + parts["unpermute"]) / (r + p + parts["unpermute"] + parts["grouped_swiglu"])
    return {"layer_ms": {k: round(v, 4) for k, v in parts.items()},
            "dispatch_share": share(parts["route"], parts["permute"]),
            "dispatch_share_before": share(parts["route_before"], parts["permute_before"])}


def route_only(S, rows, g) -> None:
    """The decode router's tile and selection variants alone: a table of us per variant and batch."""
    best = bench_route(S, rows, g, decode_only=True)
    table = [{k: r.get(k, "-") for k in ("part", "tokens", "variant", "us", "eager_us", "check", "config")}
             for r in rows]
    if not S.smoke:
        write_result("moe_dispatch_route", table, {"shape": f"E={S.E}, top-{S.K}, D={S.D}, {S.dt}",
                                                   "route_config": best, "sweep": ROUTE_SMALL})
    print("\nrouter, CUDA-graph replay (us):  variant  " + "  ".join(f"B={N:<5}" for N in S.route_B))
    for v in ["before"] + list(range(len(ROUTE_SMALL))):
        us = [next((r["us"] for r in rows if r["variant"] == v and r["tokens"] == N), float("nan")) for N in S.route_B]
        conf = "" if v == "before" else ROUTE_SMALL[v]
        print(f"  {v!s:>7}  " + "  ".join(f"{u:7.2f}" for u in us) + f"  {conf}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1), wall clock")
    ap.add_argument("--route-only", action="store_true", help="the router's decode tiles alone (written to "
                    "moe_dispatch_route.json; the tuning file untouched)")
    args = ap.parse_args()
    S = Shapes(args.smoke)
    bw = copy_bandwidth() if not S.smoke else 1e11
    g = torch.Generator(device=S.dev).manual_seed(0)
    rows: list[dict] = []
    if args.route_only:
        return route_only(S, rows, g)
    route_cfg = bench_route(S, rows, g)
    permute_cfg = bench_permute(S, rows, g, bw)
    layer = bench_layer(S, g)
    if not S.smoke:
        merge_tuning("moe_route", route_cfg, "bench/moe_dispatch.py: best of the swept router tiles")
        merge_tuning("moe_permute", permute_cfg, "bench/moe_dispatch.py: best of the swept permutation tiles")
    us = lambda part, N, v: min((r["us"] for r in rows if r["part"] == part and r["tokens"] == N
                                 and (r["variant"] == v if v else r["variant"] != "before")), default=None)
    summary = {f"route_B{N}_us": {"now": us("route", N, None), "before": us("route", N, "before")}
               for N in S.route_B}
    summary.update({f"permute_{N}_us": {"now": us("permute_new", N, None), "before": us("permute", N, "before"),
                                        "torch.sort": us("permute", N, "torch.sort")} for N in S.permute_N})
    table = [{k: r.get(k, "-") for k in ("part", "tokens", "variant", "us", "graph_us", "check")} for r in rows]
    extra = {"copy_bandwidth_GBps": bw / 1e9, "shape": f"E={S.E}, top-{S.K}, D={S.D}, I={S.I}, {S.dt}",
             "route_config": route_cfg, "permute_config": permute_cfg, "summary": summary, **layer,
             "sweeps": {"route": ROUTE_SMALL, "route_prefill": ROUTE_LARGE, "permute": PERMUTE}}
    if S.smoke:                         # nothing written: no device to name
        for r in table:
            print(r)
    else:
        write_result("moe_dispatch", table, extra)
    print("\nsummary (us; route at B<=64 from CUDA-graph replay; target route <= 10 us, dispatch share <= 10%)")
    for k, v in summary.items():
        print(f"  {k:>20}: {v}")
    print(f"  MoE layer at {S.prefill} tokens (ms): {layer['layer_ms']}")
    print(f"  dispatch share: {layer['dispatch_share']:.1%} now, {layer['dispatch_share_before']:.1%} before")


if __name__ == "__main__":
    main()
