"""Does a one-token MoE decode kernel's time follow the bytes it reads? The direct routed (+
shared) experts (lowering/triton/moe_decode.py) at B=1 on the published shapes (256 experts, D
2304, I 1024), with 1-8 routed experts and with / without the shared expert: each kernel's time
(torch.profiler, CUDA-graph-replayed calls) against its weight bytes, and a least-squares line
time = fixed + bytes / rate per kernel. A large `fixed` (and a `rate` near the copy rate) says
the kernel is bound by its latency, not by DRAM bytes: reading fewer bytes (an L2 prefetch, the
shared expert elsewhere) then buys little.

    python bench/moe_decode_bytes.py          # GPU: table + bench/results/moe_decode_bytes.json (--name)
    python bench/moe_decode_bytes.py --forms  # one-token tiles and forms at 8 routed + shared
    python bench/moe_decode_bytes.py --beside # the shared expert on a side stream beside the router

The replays of one call read the same experts again, so the few-expert points partly hit L2
(50 MB); --forms cycles through distinct expert sets so every call reads DRAM, as a model's
layers do.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from kimi_graph.lowering.triton.moe_decode import FORMS, TILE_KEYS

E, D, I = 256, 2304, 1024


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept us, bytes per us) of the least-squares line us = a + bytes / rate."""
    n = len(points)
    mx, my = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (t - my) for b, t in points) / sxx
    return my - slope * mx, 1.0 / slope


def draw(seed: int = 0):
    """(generator, r, w13, w2, shared): the published shapes' experts and shared expert in bf16,
    drawn on the GPU; r(*shape) draws more of the same scale."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: (torch.randn(*s, device="cuda", generator=g) * s[-1] ** -0.5).bfloat16()  # noqa: E731
    return g, r, r(E, 2 * I, D), r(E, D, I), (r(I, D), r(I, D), r(D, I))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="moe_decode_bytes", help="bench/results/NAME.json")
    ap.add_argument("--forms", action="store_true", help="time the FORMS variants instead")
    ap.add_argument("--beside", action="store_true", help="time the shared expert beside the router instead")
    ap.add_argument("--only", default="", help="--forms: only the variants whose names contain one of these "
                    "(comma list; the default tiles always)")
    ap.add_argument("--no-ceilings", action="store_true", help="--forms: skip the streaming and cuBLAS reads")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moe_decode_bytes: needs a GPU")
    sys.path.insert(0, os.path.dirname(__file__))
    if args.beside:
        return beside(args.name if args.name != "moe_decode_bytes" else "moe_decode_beside")
    if args.forms:
        only = [o for o in args.only.split(",") if o]
        return forms(args.name if args.name != "moe_decode_bytes" else "moe_decode_forms", only=only,
                     ceiling=not args.no_ceilings)
    from harness import bench_graph, copy_bandwidth, kernel_times, write_result

    from kimi_graph.lowering.triton import moe_decode
    bw = copy_bandwidth()
    g, r, w13, w2, shared = draw()
    x = r(1, D)
    rows, lines = [], {"moe_decode_gate_up": [], "moe_decode_down": []}
    print(f"copy {bw / 1e12:.2f} TB/s; B=1, D={D}, I={I}")
    print(f"{'experts':>8} {'shared':>7} {'step us':>8} {'gate_up us':>11} {'down us':>8}")
    for with_shared in (False, True):
        for k in (1, 2, 4, 8):
            ids = torch.randperm(E, device="cuda", generator=g)[:k][None]
            w = torch.rand(1, k, device="cuda", generator=g)
            acc = torch.zeros(1, D, device="cuda", dtype=torch.bfloat16)
            run = (lambda: moe_decode.direct(x, ids, w, w13, w2, None, shared)) if with_shared else \
                (lambda: moe_decode.direct(x, ids, w, w13, w2, acc, None))
            us = bench_graph(run) * 1e3
            kt = {name: ms * 1e3 for name, ms in kernel_times(run, 10).items()}
            experts = k + with_shared
            nbytes = {"moe_decode_gate_up": experts * 2 * I * D * 2, "moe_decode_down": experts * D * I * 2}
            for name, b in nbytes.items():
                lines[name].append((b, kt.get(name, float("nan"))))
            rows.append({"routed": k, "shared": with_shared, "step_us": us, "kernel_us": kt,
                         "bytes": nbytes})
            print(f"{k:>8} {str(with_shared):>7} {us:>8.2f} {kt.get('moe_decode_gate_up', 0):>11.2f}"
                  f" {kt.get('moe_decode_down', 0):>8.2f}", flush=True)
    fits = {}
    for name, pts in lines.items():
        fixed, rate = fit(pts)
        fits[name] = {"fixed_us": fixed, "rate_TB_s": rate * 1e6 / 1e12, "of_copy": rate * 1e6 / bw}
        print(f"{name}: time = {fixed:.2f} us + bytes / {rate * 1e6 / 1e12:.2f} TB/s "
              f"({100 * rate * 1e6 / bw:.0f}% of copy)")
    write_result(args.name, rows, {"copy_tb_s": bw / 1e12, "fits": fits})


FORM_KEYS = tuple(FORMS)


# one-token tiles of the direct MoE kernels (moe_decode token_tiles' bucket 1, over the tuning
# file's): gate/up (BN, BK, warps) and down (BND, BKD, warps_down), each in its K loop's forms
# (acc, unroll, x_load), and software-pipeline stages. D = 2304 = 9 x 256: K tiles of 256 divide
# it, wider ones leave a masked last step. x_load "tile": x (h) read in the weight tile's shape
# (no layout change through shared memory, no barrier between a step's loads)
def _tiles(gu, dn, form=("tile", False, "tile"), down=None, stages=2):
    return dict(zip(TILE_KEYS, (*gu, *dn, stages, *form, *(down or form))))


_GU = (4, 256, 4)                       # 2026-12-02 17:50: 22.0 us (the streaming read: 20.7)
_VEC, _VEC_UNROLL, _XT = ("tile", False, "vector"), ("tile", True, "vector"), ("tile", False, "tile")
FORM_VARIANTS = {
    "default": None,
    "gu 4/256/w4 xt, dn 16/256/w8 vec": _tiles(_GU, (16, 256, 8), down=_VEC),
    "gu 4/256/w4 xt, dn 16/256/w8 vec s3": _tiles(_GU, (16, 256, 8), down=_VEC, stages=3),
    "gu 4/256/w4 xt, dn 8/256/w4 vec": _tiles(_GU, (8, 256, 4), down=_VEC),
    "gu 4/256/w4 xt, dn 16/256/w8 vec-unroll": _tiles(_GU, (16, 256, 8), down=_VEC_UNROLL),
    "gu 4/256/w4 xt, dn 8/512/w4 vec": _tiles(_GU, (8, 512, 4), down=_VEC),
    "gu 4/256/w4 xt, dn 16/512/w8 vec": _tiles(_GU, (16, 512, 8), down=_VEC),
    "gu 4/256/w4 xt, dn 32/256/w8 vec": _tiles(_GU, (32, 256, 8), down=_VEC),
    "gu 4/256/w4 xt, dn 16/1024/w8 vec-unroll": _tiles(_GU, (16, 1024, 8), down=_VEC_UNROLL),
    "gu 4/256/w4 xt, dn 8/1024/w4 xt-unroll": _tiles(_GU, (8, 1024, 4), down=("tile", True, "tile")),
    "gu 4/256/w4 xt, dn 16/256/w8 row-vec": _tiles(_GU, (16, 256, 8), down=("row", False, "vector")),
    "gu 4/256/w4 xt, dn 8/256/w4 xt": _tiles(_GU, (8, 256, 4), down=_XT),
    "gu 4/256/w4 xt s3, dn 8/256/w4 xt": _tiles(_GU, (8, 256, 4), down=_XT, stages=3),
    "gu 2/256/w2 xt, dn 8/256/w4 xt": _tiles((2, 256, 2), (8, 256, 4), down=_XT),
    "gu 4/128/w2 xt, dn 8/256/w4 xt": _tiles((4, 128, 2), (8, 256, 4), down=_XT),
    "gu 4/512/w4 xt, dn 8/256/w4 xt": _tiles((4, 512, 4), (8, 256, 4), down=_XT),
    "gu 4/256/w8 xt, dn 8/256/w4 xt": _tiles((4, 256, 8), (8, 256, 4), down=_XT),
    "gu 8/128/w4 xt, dn 8/256/w4 xt": _tiles((8, 128, 4), (8, 256, 4), down=_XT),
    # the down's whole K in one step (I = 1024): every load of a program issued before its first
    # barrier (sm_90 PTX), on the tuning file's gate/up (2 x 256, 2 warps, x as tile)
    "gu 2/256/w2 xt, dn 16/1024/w4 vec": _tiles((2, 256, 2), (16, 1024, 4), down=_VEC),
    "gu 2/256/w2 xt, dn 8/1024/w4 vec": _tiles((2, 256, 2), (8, 1024, 4), down=_VEC),
    "gu 2/256/w2 xt, dn 16/512/w2 vec": _tiles((2, 256, 2), (16, 512, 2), down=_VEC),
    "gu 2/256/w2 xt, dn 8/256/w1 vec": _tiles((2, 256, 2), (8, 256, 1), down=_VEC),
    "gu 2/256/w2 xt, dn 4/1024/w2 vec": _tiles((2, 256, 2), (4, 1024, 2), down=_VEC),
}


def one_token(base: dict, tiles: dict | None) -> dict:
    """moe_decode's config with `tiles` as the one-token bucket's (the other buckets as they are)."""
    if tiles is None:
        return base
    rest = [b for b in base.get("token_tiles", []) if b[0] != 1]
    return {**base, "token_tiles": [[1, tiles]] + rest}


def best_tiles(path: str = "bench/results/moe_decode_forms.json") -> dict:
    """The one-token tiles of the least gate/up time and, with its stages, of the least down
    time (each kernel's own forms), from `--forms`'s result file."""
    import json
    timed = [r for r in json.load(open(path))["rows"] if r.get("gate_up_us") and "tiles" in r]
    gu = min(timed, key=lambda r: r["gate_up_us"])
    stages = gu["tiles"]["num_stages"]
    dn = min((r for r in timed if r["tiles"]["num_stages"] == stages), key=lambda r: r["down_us"])
    pick = {k: gu["tiles"][k] for k in ("BN", "BK", "num_warps", "num_stages", *FORM_KEYS)}
    pick.update({k: dn["tiles"][k] for k in ("BND", "BKD", "warps_down", *(f"{k}_down" for k in FORM_KEYS))})
    print(f"best one-token tiles: gate/up of {gu['variant']} ({gu['gate_up_us']:.2f} us), down of "
          f"{dn['variant']} ({dn['down_us']:.2f} us): {pick}", flush=True)
    return pick


def ceilings(w13, bw: float, sets: int, rows: list) -> None:
    """What one kernel can read of the same bytes: a plain streaming sum over 9 experts' gate/up
    rows (the routed gate/up kernel's addresses, `per` programs an expert, `block` elements a
    load, `warps`), and cuBLAS's one-row product with a dense weight of those bytes (18432 x D,
    layer 0's dense gate/up), each call on the next of `sets` expert sets / weight copies."""
    import triton
    import triton.language as tl

    from harness import bench_graph, kernel_times

    @triton.jit
    def _stream(w_ptr, ids_ptr, out_ptr, PER: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                W: tl.constexpr):
        p = tl.program_id(0)
        e = tl.load(ids_ptr + p // PER)
        base = w_ptr + e.to(tl.int64) * W + (p % PER) * CHUNK
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(0, CHUNK, BLOCK):
            acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(out_ptr + p, tl.sum(acc))

    g = torch.Generator(device="cuda").manual_seed(1)
    ids = [torch.randperm(E, device="cuda", generator=g)[:9] for _ in range(sets)]
    W = 2 * I * D
    nbytes = 9 * W * 2
    for per, block, warps in ((64, 4096, 4), (128, 4096, 4), (128, 4096, 8), (256, 2048, 4), (512, 1024, 4),
                              (128, 2048, 2)):
        out = torch.empty(9 * per, device="cuda")
        turn = [0]

        def run():
            turn[0] += 1
            _stream[(9 * per,)](w13, ids[turn[0] % sets], out, per, W // per, block, W, num_warps=warps)
        us = bench_graph(run, replays=sets) * 1e3
        kt = sum(kernel_times(run, sets).values()) * 1e3
        rows.append({"B": 1, "variant": f"stream {per}/{block}/w{warps}", "step_us": us, "kernel_us": kt,
                     "of_copy": nbytes / (kt * 1e-6) / bw})
        print(f"ceiling  stream {per:>4} programs an expert, {block} a load, {warps} warps: kernel {kt:6.2f} us "
              f"({100 * rows[-1]['of_copy']:.1f}% of copy over {nbytes / 1e6:.1f} MB)", flush=True)
    dense = [torch.randn(18432, D, device="cuda", generator=g).bfloat16() for _ in range(sets)]
    x = torch.randn(1, D, device="cuda", generator=g).bfloat16()
    turn = [0]

    def run():
        turn[0] += 1
        return torch.nn.functional.linear(x, dense[turn[0] % sets])
    us = bench_graph(run, replays=sets) * 1e3
    kt = sum(kernel_times(run, sets).values()) * 1e3
    rows.append({"B": 1, "variant": "cublas dense 18432", "step_us": us, "kernel_us": kt,
                 "of_copy": dense[0].numel() * 2 / (kt * 1e-6) / bw})
    print(f"ceiling  cuBLAS 1 x {D} by {D} x 18432: kernel {kt:6.2f} us ({100 * rows[-1]['of_copy']:.1f}% of copy)",
          flush=True)


def forms(name: str, sets: int = 20, only: list | None = None, ceiling: bool = True):
    """Each FORM_VARIANTS entry at B = 1 (8 routed experts + the shared one), each call on the
    next of `sets` distinct expert sets (so from DRAM): step us, kernel us, the share of copy over
    the bytes read, the error against the default tiles; then the ceilings."""
    from harness import bench_graph, copy_bandwidth, kernel_times, override_config, rel_err, write_result

    from kimi_graph.lowering.triton import moe_decode
    from kimi_graph.lowering.triton.targets import config
    bw = copy_bandwidth()
    g, r, w13, w2, shared = draw()
    base = config("moe_decode")
    rows = []
    print(f"copy {bw / 1e12:.2f} TB/s; D={D}, I={I}, B=1, 8 routed + shared, {sets} expert sets in turn")
    x = r(1, D)
    ids = [torch.randperm(E, device="cuda", generator=g)[:8][None] for _ in range(sets)]
    w = torch.rand(1, 8, device="cuda", generator=g)
    nbytes = 9 * 3 * D * I * 2
    turn = [0]

    def run():
        turn[0] += 1
        return moe_decode.direct(x, ids[turn[0] % sets], w, w13, w2, None, shared)
    want = None
    for vname, tiles in FORM_VARIANTS.items():
        if only and tiles is not None and not any(o in vname for o in only):
            continue
        cfg = one_token(base, tiles)
        override_config("moe_decode", **cfg)
        try:
            turn[0] = -1
            out = run().float()
            want = out if want is None else want
            us = bench_graph(run, replays=sets) * 1e3
            kt = {k: v * 1e3 for k, v in kernel_times(run, sets).items()}
        except Exception as e:     # a tile that does not fit this GPU: reported, not fatal
            print(f"B=1 {vname}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        used = dict(cfg["token_tiles"])[1] if tiles is None else tiles
        tiles_used = {k: used.get(k, cfg.get(k)) for k in TILE_KEYS}
        form, down = moe_decode.forms_of(tiles_used)        # the forms as moe_decode resolves them
        tiles_used.update(form, **{f"{k}_down": v for k, v in down.items()})
        row = {"B": 1, "variant": vname, "tiles": tiles_used,
               "step_us": us, "of_copy": nbytes / (us * 1e-6) / bw,
               "gate_up_us": kt.get("moe_decode_gate_up"), "down_us": kt.get("moe_decode_down"),
               "rel_err_vs_default": rel_err(out, want)}
        rows.append(row)
        print(f"B=1 {vname:<30} {us:7.2f} us  {100 * row['of_copy']:5.1f}% of copy  gate_up "
              f"{row['gate_up_us'] or 0:6.2f}  down {row['down_us'] or 0:6.2f}  err {row['rel_err_vs_default']:.1e}",
              flush=True)
    override_config("moe_decode", **base)
    if ceiling:
        ceilings(w13, bw, sets, rows)
    write_result(name, rows, {"copy_tb_s": bw / 1e12, "sets": sets})


def beside(name: str, sets: int = 20):
    """One MoE layer at B=1 as a decode step runs it (norm + router in one launch, then the routed
    and shared experts), against the shared expert on a side stream (its own norm, then the direct
    kernels with no routed pairs) beside the router and the routed gate/up, its output the routed
    down kernel's acc: graph-replayed over `sets` inputs (distinct experts), us a layer."""
    from harness import bench_graph, copy_bandwidth, kernel_times, rel_err, write_result

    from kimi_graph.lowering.triton import moe_decode
    from kimi_graph.lowering.triton.moe_route import routed_norm
    bw = copy_bandwidth()
    g, r, w13, w2, shared = draw()
    gate, bias = r(E, D), torch.zeros(E, device="cuda")
    nw = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).bfloat16()
    xs = [torch.randn(1, D, device="cuda", generator=g).bfloat16() for _ in range(sets)]
    res = [torch.randn(1, D, device="cuda", generator=g).bfloat16() for _ in range(sets)]
    route = {"top_k": 8, "scaling": 2.446}
    turn = [0]
    rows_of = ((0, I), (0, I))                  # the shared expert's Wg and Wu rows (apart here)

    def plain():
        turn[0] += 1
        x, rr = xs[turn[0] % sets], res[turn[0] % sets]
        ids, wts, xn, _ = routed_norm(x, rr, nw, 1e-6, gate, bias, **route)
        return moe_decode.direct(xn, ids, wts, w13, w2, None, shared)

    def split():                                # as the backend runs it (moe_decode shared_beside)
        turn[0] += 1
        x, rr = xs[turn[0] % sets], res[turn[0] % sets]
        side = moe_decode.shared_beside("moe_experts", {}, [None, None, None, w13, w2, *shared], rows_of,
                                        x, rr, nw, 1e-6)
        ids, wts, xn, _ = routed_norm(x, rr, nw, 1e-6, gate, bias, **route)
        return moe_decode.run_step("moe_experts", {}, [xn, ids, wts, w13, w2, *shared], rows_of, side)

    rows = []
    turn[0] = -1
    want = plain().float()
    for vname, fn in (("plain", plain), ("shared beside", split), ("plain", plain), ("shared beside", split)):
        turn[0] = -1
        err = rel_err(fn().float(), want)
        us = bench_graph(fn, replays=sets) * 1e3
        kt = {k: v * 1e3 for k, v in kernel_times(fn, sets).items()}
        rows.append({"variant": vname, "us": us, "rel_err_vs_plain": err, "kernel_us": kt})
        print(f"{vname:<15} {us:7.2f} us a layer  err {err:.1e}  kernels " +
              ", ".join(f"{k} {v:.2f}" for k, v in kt.items()), flush=True)
    write_result(name, rows, {"copy_tb_s": bw / 1e12, "sets": sets})


if __name__ == "__main__":
    main()
