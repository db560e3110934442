"""Decode-sized projections on the GPU: lowering/triton/gemv.py's kernel (tile variants) against
torch's linear (cuBLAS) on the published model's decode shapes, in the same run as the copy rate.

The shapes are read from the published model's decode graph after the default pipeline and the
triton backend's plan: plain linears (MLA's o_proj, the dense layer's down projection), KDA's
f_b and g_b as one launch ("pair", against two cuBLAS calls) and norm + linear steps (the fused
q/k/v/f_a/b/g_a projection, MLA's fused q / kv_a, the dense layer's gate/up, lm_head after
add_rmsnorm; KDA's o_proj after its gated per-head norm), the latter against the norm kernel then
cuBLAS, as the backend runs them without the kernel; MLA's absorbed head_matmul ("heads") against
the op's einsum. Each call is timed replayed from a CUDA
graph, cycling through copies of the weight so that no replay finds it in L2 (as in a step,
where the other layers evict it).
Per shape and row count: us, fraction of the copy rate (bytes read and written over the time),
speed-up vs cuBLAS, rel. error against fp64; per row count, the step's sum over its projections
(count x us) for cuBLAS and for the variant with the least sum (token_tiles holds one variant per
row bucket). JSON: $OUT/gemv.json and bench/results/gemv.json.

    python bench/gemv.py                          # rows 1,4,16, the default variants
    python bench/gemv.py --rows 1 --no-sweep      # the target's tiles only
    python bench/gemv.py --rows 1,4 --variants 0,1,3    # a shorter sweep
    python bench/gemv.py --use-best               # + the best tiles, switch and max_rows into the tuning file
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
from collections import Counter

import torch
import torch.nn.functional as F

import harness  # noqa: F401  (puts the checkout on the path)
from harness import bench, copy_bandwidth, merge_tuning, override_config, rel_err, write_result

ROTATE_BYTES = 256 << 20          # weight copies a graph cycles through: well past the 50 MB L2
# tile variants (keys of the gemv family); BN below 16 runs as 16 on the tl.dot path (2+ rows)
VARIANTS = [                # most promising first (the H200 run of 2026-11-30 23:40): --budget may stop early
    {},                                                     # the target's tiles
    {"BN": 8, "BK": 512, "num_warps": 4, "programs": 528},  # the best one-row step then
    {"BN": 64, "BK": 128, "num_warps": 4, "programs": 528},  # the best 4- and 16-row step then
    {"BN": 16, "BK": 256, "num_warps": 4, "programs": 1056},
    {"BN": 32, "BK": 256, "num_warps": 4, "programs": 528},
    {"BN": 8, "BK": 512, "num_warps": 4, "programs": 528, "norm_pass": "two"},
    {"BN": 16, "BK": 1024, "num_warps": 8, "programs": 528},
    {"BN": 16, "BK": 512, "num_warps": 4, "programs": 528, "num_stages": 3},
    {"BN": 64, "BK": 128, "num_warps": 4, "programs": 264, "max_split": 4},
    # one row with x read in W's tile shape (x_load "tile": no layout change through shared memory)
    {"BN": 8, "BK": 512, "num_warps": 4, "programs": 528, "x_load": "tile"},                   # 9
    {"BN": 4, "BK": 512, "num_warps": 4, "programs": 528, "x_load": "tile"},
    {"BN": 8, "BK": 256, "num_warps": 4, "programs": 528, "x_load": "tile"},
    {"BN": 16, "BK": 256, "num_warps": 4, "programs": 528, "x_load": "tile"},
    {"BN": 8, "BK": 512, "num_warps": 4, "programs": 1056, "x_load": "tile"},
    {"BN": 4, "BK": 1024, "num_warps": 4, "programs": 528, "x_load": "tile"},
    {"BN": 8, "BK": 256, "num_warps": 2, "programs": 1056, "x_load": "tile"},
    {"BN": 16, "BK": 512, "num_warps": 8, "programs": 528, "x_load": "tile"},
]
GRID = {"BN": (8, 16, 32, 64), "BK": (128, 256, 512, 1024), "num_warps": (4, 8), "programs": (264, 528, 1056),
        "num_stages": (1, 2, 3)}


def decode_shapes(model: str = "kimi-linear-48b-a3b") -> list[dict]:
    """{name, N, K, norm, count} of every projection of a decode step, as the triton backend plans it."""
    from kimi_graph.api import resolve_config
    from kimi_graph.lowering.triton.backend import LinearPair, NormLinear, legalize, plan
    from kimi_graph.model import build_graph
    from kimi_graph.passes import run_pipeline
    cfg, _ = resolve_config(model)
    g = legalize(run_pipeline(build_graph(cfg, "decode", stateful=True, dtype="bf16"), "default"))
    counts: Counter = Counter()
    names: dict = {}
    for item in plan(g):
        if isinstance(item, NormLinear):
            norm = item.ops[0]
            group = g.types[norm.inputs[1]].shape[0] if norm.kind == "gated_rmsnorm" else 0
            key, w = (norm.kind, norm.attrs["eps"], group), item.ops[-1].inputs[1]
        elif isinstance(item, LinearPair):
            key, w = ("pair", 0.0, 0), item.inputs[1]
        elif getattr(item, "kind", None) == "head_matmul" and item.inputs[1] in g.params:
            H, NI, R = g.types[item.inputs[1]].shape          # as N = R, K = NI, group = H
            counts["heads", 0.0, H, R, NI] += 1
            names.setdefault(("heads", 0.0, H, R, NI), item.inputs[1].split(".")[-1] + " heads")
            continue
        elif getattr(item, "kind", None) == "linear" and item.inputs[1] in g.params:
            key, w = (None, 0.0, 0), item.inputs[1]
        else:
            continue
        key = key + tuple(g.types[w].shape)
        counts[key] += 1
        names.setdefault(key, w.lstrip("@").split(".")[-2][:20] + {"rmsnorm": "+norm", "add_rmsnorm": "+addnorm",
                                                                    "gated_rmsnorm": "+gatednorm", "pair": " pair"}.get(key[0], ""))
    return [{"name": names[k], "N": k[3], "K": k[4], "norm": k[0], "eps": k[1], "group": k[2], "count": n}
            for k, n in counts.items()]


def graph_us(calls: list) -> float:
    """Median us of one call, the calls (each on its own weight copy) replayed from one graph."""
    for c in calls[: min(2, len(calls))]:
        c()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        calls[0]()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return bench(graph.replay, warmup=5, rep=30) / len(calls) * 1e3


def weights(shape: dict, gen) -> list:
    """Copies of a random weight of the shape ([N, K], or [H, K, N] for head_matmul), ROTATE_BYTES
    in all (at least one)."""
    N, K, H = shape["N"], shape["K"], shape["group"] if shape["norm"] == "heads" else 1
    dims = (H, K, N) if shape["norm"] == "heads" else (N, K)
    copies = max(1, min(256, math.ceil(ROTATE_BYTES / (H * N * K * 2))))
    return [torch.randn(*dims, device="cuda", generator=gen, dtype=torch.bfloat16) * K ** -0.5 for _ in range(copies)]


class Case:
    """One shape at one row count: weight copies, inputs, the fp64 reference."""

    def __init__(self, shape: dict, rows: int, gen, ws: list):
        N, K = shape["N"], shape["K"]
        wbytes = N * K * 2
        self.ws, self.copies = ws, len(ws)
        self.reps = max(20, self.copies)
        r = lambda *s: torch.randn(*s, device="cuda", generator=gen, dtype=torch.bfloat16)
        self.shape, self.rows = shape, rows
        if shape["norm"] == "heads":             # head_matmul: x [rows, 1, H, K] against [H, K, N]
            H = shape["group"]
            self.x = r(rows, 1, H, K)
            self.bytes = 2 * H * (N * K + rows * (N + K))
            self.ref = torch.einsum("bthn,hnr->bthr", self.x.double(), ws[0].double())
            return
        G = shape["group"] or K                 # the norm's groups (gated_rmsnorm: KDA's heads)
        self.x, self.res, self.nw = r(rows, K), r(rows, K), (1 + 0.1 * r(G))   # res: the residual or the gate
        self.shape, self.rows = shape, rows
        self.bytes = wbytes + 2 * rows * (N + K * (1 if shape["norm"] in (None, "rmsnorm") else 2))
        if shape["norm"] == "pair":             # two products: x w_i^T and res w_(i+1)^T
            self.bytes *= 2
        x = (self.x.double() + (self.res.double() if shape["norm"] == "add_rmsnorm" else 0)).view(rows, -1, G)
        if shape["norm"] not in (None, "pair"):
            x = x / torch.sqrt((x * x).mean(-1, keepdim=True) + shape["eps"]) * self.nw.double()
        if shape["norm"] == "gated_rmsnorm":
            x = x * torch.sigmoid(self.res.double().view(rows, -1, G))
        self.ref = x.view(rows, K) @ self.ws[0].double().T

    def torch_call(self, i: int):
        """cuBLAS, after the rmsnorm kernel where a norm feeds the projection."""
        from kimi_graph.lowering.triton.norm import rmsnorm
        w, norm = self.ws[i % self.copies], self.shape["norm"]
        if norm is None:
            return lambda: F.linear(self.x, w)
        if norm == "heads":
            return lambda: torch.einsum("bthn,hnr->bthr", self.x, w)
        if norm == "pair":
            w1 = self.ws[(i + 1) % self.copies]
            return lambda: (F.linear(self.x, w), F.linear(self.res, w1))[0]
        if norm == "rmsnorm":
            return lambda: F.linear(rmsnorm(self.x, self.nw, self.shape["eps"]), w)
        if norm == "gated_rmsnorm":
            heads = lambda t: t.view(self.rows, -1, self.shape["group"])
            return lambda: F.linear(rmsnorm(heads(self.x), self.nw, self.shape["eps"], gate=heads(self.res))
                                    .view(self.rows, -1), w)
        return lambda: F.linear(rmsnorm(self.x, self.nw, self.shape["eps"], self.res)[0], w)

    def ours_call(self, i: int):
        from kimi_graph.lowering.triton import gemv
        w, norm = self.ws[i % self.copies], self.shape["norm"]
        if norm is None:
            return lambda: gemv.linear(self.x, w)
        if norm == "heads":
            return lambda: gemv.heads(self.x, w)
        if norm == "pair":
            w1 = self.ws[(i + 1) % self.copies]
            return lambda: gemv.pair(self.x, w, self.res, w1)[0]
        if norm == "rmsnorm":
            return lambda: gemv.linear(self.x, w, self.nw, self.shape["eps"])
        if norm == "gated_rmsnorm":
            return lambda: gemv.linear(self.x, w, self.nw, self.shape["eps"], gate=self.res)
        return lambda: gemv.linear(self.x, w, self.nw, self.shape["eps"], self.res)[0]

    def time(self, make) -> tuple[float, float]:
        us = graph_us([make(i) for i in range(self.reps)])
        return us, rel_err(make(0)(), self.ref)


def main(argv=None) -> None:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,16", help="row counts (decode batch sizes)")
    ap.add_argument("--no-sweep", action="store_true", help="the target's tiles only")
    ap.add_argument("--grid", action="store_true", help="sweep the full GRID product, not VARIANTS")
    ap.add_argument("--variants", default="", help="indices into VARIANTS to sweep (comma list; default all)")
    ap.add_argument("--shapes", default="", help="only shapes whose name contains one of these (comma list)")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds after which no further variant starts "
                    "(results are written after each variant)")
    ap.add_argument("--use-best", action="store_true", help="write the choice (best tiles per row bucket, "
                    "max_rows, cublas_shapes, the switch) into this device's tuning file")
    a = ap.parse_args(argv)
    from kimi_graph.lowering.triton.targets import config
    rows_list = sorted(int(r) for r in a.rows.split(","))
    base = {k: v for k, v in config("gemv").items()}
    if a.no_sweep:
        variants = [{}]
    elif a.grid:
        variants = [{}] + [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    else:
        variants = [VARIANTS[int(i)] for i in a.variants.split(",")] if a.variants else VARIANTS
    shapes = decode_shapes()
    if a.shapes:
        shapes = [s for s in shapes if any(p in s["name"] for p in a.shapes.split(","))]
    bw = copy_bandwidth()
    print(f"copy rate {bw / 1e12:.3f} TB/s; shapes: {shapes}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    cases = {}
    for shape in shapes:
        ws = weights(shape, gen)
        for M in rows_list:
            cases[shape["name"], M] = Case(shape, M, gen, ws)
    cublas = {key: c.time(c.torch_call) for key, c in cases.items()}         # (name, M) -> (us, err)
    ours: dict = {}                                                          # (name, M, variant) -> (us, err)
    summary, cfg = [], {}
    for vi, v in enumerate(variants):
        if time.perf_counter() - t0 > a.budget:
            print(f"budget of {a.budget:.0f} s spent: variants {vi}.. not run", flush=True)
            break
        override_config("gemv", **{**base, **v, "token_tiles": [], "enabled": True})
        for (name, M), case in cases.items():
            try:
                ours[name, M, vi] = case.time(case.ours_call)
            except Exception as e:           # noqa: BLE001 (a variant that does not build is skipped)
                print(f"  {name} M={M} {v}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        per_variant = {}
        for (name, M, i), (us, _) in ours.items():
            per_variant.setdefault((M, i), {})[name] = us * cases[name, M].shape["count"]
        summary, cfg = choose(per_variant, {(M, n): cublas[n, M][0] * cases[n, M].shape["count"] for n, M in cases},
                              shapes, rows_list, variants)
        write_result("gemv", table(cases, cublas, ours, bw), {"copy_tb_s": bw / 1e12, "shapes": shapes,
                     "variants": variants[:vi + 1], "summary": summary, "choice": cfg})
    override_config("gemv", **base)
    print("\nper step (sum over the step's projections of count x us; one variant per row count; mixed: the "
          "shapes cuBLAS wins at the fewest rows left to it)")
    for s in summary:
        print(f"  M={s['M']:>3}  cuBLAS {s['cublas_step_us']:9.1f} us   ours {s['ours_step_us']:9.1f} us   "
              f"mixed {s['mixed_step_us']:9.1f} us   x{s['speedup']:.2f}   tiles {s['tiles']}")
    print(f"choice: {cfg}", flush=True)
    if a.use_best and cfg:
        path = merge_tuning("gemv", cfg, "bench/gemv.py: best tiles per row bucket over the decode step's projections "
                            f"(rows {rows_list}); on up to max_rows where the step's sum beats cuBLAS")
        print(f"gemv tuning -> {path}", flush=True)


def table(cases: dict, cublas: dict, ours: dict, bw: float) -> list[dict]:
    """One row per shape and row count: cuBLAS, and our best variant so far."""
    rows = []
    for (name, M), case in cases.items():
        got = [(us, err, i) for (n, m, i), (us, err) in ours.items() if (n, m) == (name, M)]
        if not got:
            continue
        (us, err, vi), (t_us, t_err), sh = min(got), cublas[name, M], case.shape
        rows.append({"shape": name, "N": sh["N"], "K": sh["K"], "norm": sh["norm"] or "-", "count": sh["count"],
                     "M": M, "cublas_us": t_us, "ours_us": us, "cublas_frac": case.bytes / (t_us * 1e-6) / bw,
                     "ours_frac": case.bytes / (us * 1e-6) / bw, "speedup": t_us / us, "err_ours": err,
                     "err_cublas": t_err, "variant": vi})
    return rows


def choose(per_variant: dict, cublas: dict, shapes: list, rows_list: list, variants: list) -> tuple[list, dict]:
    """Per row count, the variant with the least step sum; the weight shapes cuBLAS wins at the
    fewest rows (left to it: cublas_shapes); max_rows: the largest row count up to which every
    measured one is faster than cuBLAS with those shapes left to it."""
    names = {s["name"] for s in shapes}
    best = {}
    for M in rows_list:
        full = {vi: t for (m, vi), t in per_variant.items() if m == M and set(t) == names}
        if full:
            vi = min(full, key=lambda v: sum(full[v].values()))
            best[M] = (vi, full[vi])
    if not best:
        return [], {}
    m0, by_shape = min(best), {}
    wshape = lambda s: (s["group"], s["K"], s["N"]) if s["norm"] == "heads" else (s["N"], s["K"])  # noqa: E731
    for s in shapes:                                # ours and cuBLAS at the fewest rows, per weight shape
        o, c = by_shape.get(wshape(s), (0.0, 0.0))
        by_shape[wshape(s)] = (o + best[m0][1][s["name"]], c + cublas[m0, s["name"]])
    kept = [list(w) for w, (o, c) in by_shape.items() if o >= c]
    summary, max_rows = [], 0
    for M, (vi, t) in best.items():
        total = sum(cublas[M, n] for n in names)
        mixed = sum(cublas[M, s["name"]] if list(wshape(s)) in kept else t[s["name"]] for s in shapes)
        summary.append({"M": M, "cublas_step_us": total, "ours_step_us": sum(t.values()), "mixed_step_us": mixed,
                        "speedup": total / mixed, "variant": vi, "tiles": str(variants[vi] or "target")})
    for s in summary:                               # the largest row count below which every measured one wins
        if s["speedup"] <= 1.0:
            break
        max_rows = s["M"]
    cfg = {"enabled": max_rows > 0, "max_rows": max(max_rows, 1), "cublas_shapes": kept,
           "token_tiles": [[M, variants[vi]] for M, (vi, _) in best.items() if variants[vi]]}
    return summary, cfg

if __name__ == "__main__":
    main()
