"""Low-bit expert kernels (lowering/triton/moe_quant.py) on the published shapes (D=2304 ->
I=1024, 256 experts, top-8), against our bf16 grouped SwiGLU (lowering/triton/moe.py) in the
same run, one line a variant (a moe_gemm_q config over the target's):

- int4 (group 128) and int8 at 1 / 4 / 16 tokens (decode; CUDA-graph replays): int4 times int8
  activations by dp4a (lowering/triton/moe_w4a8.py, W4A8: activations rounded per row and group;
  sm_90's default; `fuse ...`: the activations quantized inside gate_up and down, two launches
  instead of four; `pdl`: programmatic dependent launch); int8 on the per-row word kernels
  (lowering/triton/dequant.py); pct_copy_bw: the low-bit bytes read (codes + scales of the
  experts touched, read_MB) per second against the copy bandwidth measured here; x_bf16: our
  bf16 grouped SwiGLU's time over this one;
- with --by-id, the same formats through moe_decode's entry (the decode step's path, 1-8 tokens
  at top-8, with the combine): experts by id (words; `a8`: int8 activations by dp4a, moe_w4a8's
  loops), and the permuted grouped path
  (`quant_direct` False: permute, the grouped kernels above, un-permute);
- int4 / int8 at 4k tokens (prefill; --int-prefill): the dequantizing tensor-core loops against
  passes of experts dequantized to bf16 and our bf16 grouped GEMMs (`dequant ...`, moe_dequant.py);
- fp8 (128 x 128 blocks) at 8k tokens (prefill): W8A8 on fp8 tensor cores (lowering/triton/
  moe_fp8.py), activations in e4m3 per row and K tile, at the target's tiles (`default`) and
  others (`tma ...`: operands through host tensor descriptors), against bf16; both timed by
  CUDA-graph replay (wall_ms: host-timed calls, which also count the host's set-up before the
  first kernel), each variant's kernels split by torch.profiler (kernel_ms).
- with --chain, fp8's whole routed-expert layer (quantized_moe_experts: tokens quantized before
  the permutation) against the permuted rows' form and bf16's moe_experts, at --prefill sizes.
Errors: against a float64 SwiGLU over the dequantized weights.

    python bench/lowbit.py --budget 100 [--write-tuning]   # GPU: table + bench/results/lowbit.json (--name)
    python bench/lowbit.py --cpu        # no GPU: the same kernels on small shapes through the
                                        # Triton interpreter (errors only, no timing)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

E, K, D, I = 256, 8, 2304, 1024


def swiglu_fp64(rows, offsets, w13, w2, fmt, group):
    """float64 SwiGLU of each expert's rows over its dequantized weights (one expert at a time)."""
    from kimi_graph.ops.quant import dequantize
    out = torch.zeros(rows.shape, dtype=torch.float64, device=rows.device)
    off = offsets.tolist()
    Ie = w2[0].shape[-1] * (2 if fmt == "int4" else 1)
    for e in range(len(off) - 1):
        if off[e + 1] > off[e]:
            a = dequantize(w13[0][e], w13[1][e].double(), None, fmt, group)
            b = dequantize(w2[0][e], w2[1][e].double(), None, fmt, group)
            x = rows[off[e]:off[e + 1]].double()
            g, u = x @ a[:Ie].T, x @ a[Ie:].T
            out[off[e]:off[e + 1]] = (g * torch.sigmoid(g) * u) @ b.T
    return out


def routed_rows(N, experts, dim, g, device, dtype):
    """N tokens routed top-8 over `experts`: rows sorted by expert and offsets."""
    x = torch.randn(N, dim, generator=g, device=device).to(dtype)
    ids = torch.rand(N, experts, generator=g, device=device).topk(K, -1)[1].reshape(-1)
    order = ids.sort(stable=True)[1]
    offsets = torch.zeros(experts + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.bincount(ids, minlength=experts).cumsum(0)
    return x[order // K].contiguous(), offsets


def cpu_smoke():
    """The kernels through the Triton interpreter on small shapes (fp32): errors only."""
    os.environ["TRITON_INTERPRET"] = "1"
    from kimi_graph.lowering.triton.moe_quant import quantized_grouped_swiglu
    from kimi_graph.ops.quant import quantize
    g = torch.Generator().manual_seed(0)
    e, d, i = 8, 128, 64
    w13 = torch.randn(e, 2 * i, d, generator=g) * d ** -0.5
    w2 = torch.randn(e, d, i, generator=g) * i ** -0.5
    print(f"{'format':>8}{'tokens':>8}{'rel err':>12}   (Triton interpreter, fp32, E={e} D={d} I={i})")
    for fmt in ("int4", "int8", "fp8"):
        q13, q2 = quantize(w13, fmt, 64)[:2], quantize(w2, fmt, 64)[:2]
        for n in (1, 4):
            rows, off = routed_rows(n, e, d, g, "cpu", torch.float32)
            y = quantized_grouped_swiglu(rows, off, *q13, *q2, fmt=fmt, group_size=64)
            err = ((y.double() - (ref := swiglu_fp64(rows, off, q13, q2, fmt, 64))).norm() / ref.norm()).item()
            print(f"{fmt:>8}{n:>8}{err:>12.2e}")


W4A8, FUSE = dict(rows_kernel="w4a8"), dict(rows_kernel="w4a8", fuse_w4a8=True)
DECODE_VARIANTS = [("default", {}),
                   ("fuse", FUSE),
                   ("fuse pdl", dict(FUSE, pdl=True)),
                   ("fuse BN32_TPS2", dict(FUSE, BN_w4a8=32, BND_w4a8=32, TPS_w4a8=2)),
                   ("fuse BND32", dict(FUSE, BND_w4a8=32)),
                   ("fuse BN8", dict(FUSE, BN_w4a8=8)),
                   ("fuse TPS2", dict(FUSE, TPS_w4a8=2)),
                   ("fuse TPSD8", dict(FUSE, TPSD_w4a8=8)),
                   ("w4a8 BN32_TPS2", dict(W4A8, BN_w4a8=32, BND_w4a8=32, TPS_w4a8=2))]
W8A8 = dict(fp8_dot="w8a8")
TMA = dict(W8A8, tma_w8a8=True)
PREFILL_VARIANTS = [("default", {}),                      # sm_90: TMA operands, h quantized by its own pass
                    ("epilogue", dict(W8A8, tma_w8a8=False, h_pass_w8a8=False)),    # the form before both
                    ("tma epilogue", dict(TMA, h_pass_w8a8=False)),
                    # gate_up programs of two N tiles: h's scale block and down's K tile 2 BN
                    ("tma halves", dict(TMA, h_pass_w8a8=False, h_halves_w8a8=True)),
                    # h stored by gate_up (BN 64 tiles), quantized per 128 columns by the rows pass
                    ("tma hpass", dict(TMA, h_pass_w8a8=True)),
                    ("tma hpass q32x2", dict(TMA, h_pass_w8a8=True, QR_w8a8=32, QK_w8a8=2)),
                    # gate_up on 128-row tiles (8 warps), down on its own 64-row tiles
                    ("tma hpass BM128 w8 BMD64", dict(TMA, h_pass_w8a8=True, BM_w8a8=128, warps_w8a8=8, BMD_w8a8=64)),
                    ("tma hpass BM128 w8 BMD64 s4", dict(TMA, h_pass_w8a8=True, BM_w8a8=128, warps_w8a8=8, BMD_w8a8=64,
                                                         stages_w8a8=4, stages_down_w8a8=3)),
                    ("tma hpass BM128 w8", dict(TMA, h_pass_w8a8=True, BM_w8a8=128, warps_w8a8=8, warps_down_w8a8=8))]
# measured and beaten at 449c566 / 02f5830 (lowbit-fp8-tiles.json, lowbit-fp8-halves.json): stages 2 /
# 4, BN 128 on 4 or 8 warps (down's K tile 128 at gate_up's cost), BM 128 with BN 64 or 128, BND 64,
# the pass's other tiles; halves with BM 128, BND 64, BN 32
# int4 / int8 at prefill sizes: the dequantizing tensor-core loops (default) against passes of
# experts dequantized to bf16 and the bf16 grouped GEMMs (moe_dequant.py), 32 / 16 / 64 a pass
DEQUANT = dict(dequant_min_rows=257)
INT_PREFILL_VARIANTS = [("default", {}), ("dequant", DEQUANT), ("dequant e16", dict(DEQUANT, dequant_experts=16)),
                        ("dequant e64", dict(DEQUANT, dequant_experts=64)),
                        ("dequant BN32 BC512", dict(DEQUANT, BN_dequant=32, BC_dequant=512))]


def gpu(args):
    sys.path.insert(0, os.path.dirname(__file__))
    from harness import bench, bench_graph, copy_bandwidth, kernel_span, kernel_times, rel_err, write_result

    from kimi_graph.lowering.triton import moe, moe_dequant, moe_fp8, moe_quant, moe_w4a8
    from kimi_graph.lowering.triton.codegen import PDL_ENV
    from kimi_graph.lowering.triton.targets import TARGETS, current_target
    from kimi_graph.ops.quant import quantize

    t0 = time.monotonic()
    bw = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * D ** -0.5).bfloat16()
    w2 = (torch.randn(E, D, I, device="cuda", generator=g) * I ** -0.5).bfloat16()
    cfg = TARGETS[current_target()]["configs"]["moe_gemm_q"]
    base = dict(cfg)
    caches = (moe_quant.specs, moe_quant.row_specs, moe_fp8.specs, moe_w4a8.specs, moe_dequant.dequant_spec)

    def with_config(over, fn):
        """fn() under moe_gemm_q = the target's with `over` (pdl: programmatic dependent launch on)."""
        over = dict(over)
        pdl = over.pop("pdl", False)
        cfg.clear()
        cfg.update({**base, **over})
        for c in caches:
            c.cache_clear()
        if pdl:
            os.environ[PDL_ENV] = "1"
        try:
            return fn()
        finally:
            os.environ.pop(PDL_ENV, None)
            cfg.clear()
            cfg.update(base)
            for c in caches:
                c.cache_clear()

    rows_out = []
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; E={E} top-{K} D={D} I={I}, group 128")
    print(f"{'format':>6} {'tokens':>6}  {'variant':<26}{'us':>9}{'% copy':>8}{'x bf16':>8}{'TFLOP/s':>9}{'rel err':>10}")
    decode = [int(n) for n in args.tokens.split(",")]
    for fmt in args.formats.split(","):
        q13, q2 = quantize(w13, fmt, 128)[:2], quantize(w2, fmt, 128)[:2]
        per_expert = sum(t[0].nbytes + t[1].nbytes for t in (q13, q2)) / E
        prefill = [int(n) for n in (args.prefill if fmt == "fp8" else args.int_prefill).split(",") if n]
        shapes = (decode if fmt != "fp8" else [16]) + prefill
        for N in shapes:
            rows, off = routed_rows(N, E, D, g, "cuda", torch.bfloat16)
            touched = int((off[1:] > off[:-1]).sum())
            run = lambda: moe_quant.quantized_grouped_swiglu(rows, off, *q13, *q2, fmt=fmt)  # noqa: E731
            ref = swiglu_fp64(rows, off, q13, q2, fmt, 128)
            bf16 = lambda: moe.grouped_swiglu(rows, off, w13, w2)  # noqa: E731
            # CUDA-graph replays at every size: a host-timed prefill call also counts the host's
            # set-up (tensor descriptors) before its first kernel while the GPU idles
            timer = bench_graph if N <= 16 else lambda fn: bench_graph(fn, replays=3)
            t_bf16 = timer(bf16)
            wall_bf16 = bench(bf16) if N > 16 else None
            bf16_split = kernel_times(bf16) if N > 16 else None
            bf16_span = kernel_span(bf16) if N > 16 else None
            variants = ([("default", {})] if fmt == "fp8" else DECODE_VARIANTS) if N <= 16 else \
                PREFILL_VARIANTS if fmt == "fp8" else INT_PREFILL_VARIANTS
            for name, over in variants:
                if args.budget and time.monotonic() - t0 > args.budget:
                    print(f"{fmt} {N} tokens {name}: over the time budget ({args.budget:.0f} s), not run")
                    continue
                try:
                    if with_config(over, run) is None:       # no kernel for this variant on this GPU
                        print(f"{fmt} {N} tokens {name}: no kernel fits (the reference would run)")
                        continue
                    ms, err = with_config(over, lambda: (timer(run), rel_err(run(), ref)))
                except Exception as exc:                    # one variant's failure ends no other's
                    print(f"{fmt} {N} tokens {name}: error {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                read = touched * per_expert + 2 * rows.nbytes
                flops = 2 * rows.shape[0] * D * 3 * I
                row = {"path": "grouped", "format": fmt, "tokens": N, "variant": name, "config": over, "ms": ms,
                       "bf16_ms": t_bf16, "x_bf16": t_bf16 / ms, "read_MB": read / 1e6,
                       "pct_copy_bw": 100 * read / (ms * 1e-3) / bw, "tflops": flops / (ms * 1e-3) / 1e12,
                       "rel_err": err}
                if N > 16:                                  # prefill: where the time goes, kernel by kernel
                    row["wall_ms"], row["bf16_wall_ms"] = with_config(over, lambda: bench(run)), wall_bf16
                    row["kernel_ms"] = with_config(over, lambda: kernel_times(run))
                    row["bf16_kernel_ms"] = bf16_split
                    row["span_ms"], row["bf16_span_ms"] = with_config(over, lambda: kernel_span(run)), bf16_span
                rows_out.append(row)
                print(f"{fmt:>6} {N:>6}  {name:<26}{1e3 * ms:>9.1f}{row['pct_copy_bw']:>8.1f}{row['x_bf16']:>8.2f}"
                      f"{row['tflops']:>9.1f}{err:>10.1e}", flush=True)
        if fmt != "fp8" and args.by_id:
            rows_out += by_id(fmt, q13, q2, w13, w2, per_expert, bw, g)
        if fmt == "fp8" and args.chain:
            rows_out += chain(q13, q2, w13, w2, [int(n) for n in args.prefill.split(",") if n], g)
        # after each format: a run cut short by its time limit keeps what it measured
        write_result(args.name, rows_out, {"copy_bandwidth_GBps": bw / 1e9,
                                          "shapes": {"E": E, "top_k": K, "D": D, "I": I, "group": 128}})
    if args.write_tuning:
        write_best(rows_out, base)


def best_of(rows, pick) -> tuple[str, dict, float] | None:
    """(variant, config, speed-up over the default) of the variant with the best geometric mean
    time over the rows `pick` selects (only variants measured at every such shape)."""
    import math
    sel = [r for r in rows if pick(r)]
    shapes = {(r["format"], r["tokens"]) for r in sel}
    means = {}
    for name in {r["variant"] for r in sel}:
        mine = [r for r in sel if r["variant"] == name]
        if {(r["format"], r["tokens"]) for r in mine} == shapes:
            means[name] = (math.exp(sum(math.log(r["ms"]) for r in mine) / len(mine)), mine[0]["config"])
    if not means:
        return None
    name = min(means, key=lambda n: means[n][0])
    ref = means.get("default", means[name])[0]
    return name, means[name][1], ref / means[name][0]


def write_best(rows, base):
    """Merge the best decode (int4, 1-16 tokens) and prefill (fp8; int4 / int8) variants into this device's
    tuning file where they beat the defaults by more than 3%."""
    from harness import merge_tuning
    from kimi_graph.lowering.triton.targets import load_tuning
    over, notes = {}, []
    grouped = [r for r in rows if r["path"] == "grouped"]
    for what, pick in (("int4 decode", lambda r: r["format"] == "int4" and r["tokens"] <= 16),
                       ("fp8 prefill", lambda r: r["format"] == "fp8" and r["tokens"] > 16),
                       ("int4 / int8 prefill", lambda r: r["format"] != "fp8" and r["tokens"] > 16)):
        best = best_of(grouped, pick)
        if best and best[2] > 1.03:
            over.update({k: v for k, v in best[1].items() if k != "pdl"})
            notes.append(f"{what}: {best[0]} ({best[2]:.2f}x the default)")
    if not over:
        print("no variant beat the defaults by more than 3%: tuning file unchanged")
        return
    family = dict((load_tuning(None) or {}).get("configs", {}).get("moe_gemm_q", {}))
    family.update(over)
    path = merge_tuning("moe_gemm_q", family, "bench/lowbit.py: " + "; ".join(notes))
    print(f"wrote moe_gemm_q {over} to {path}")


def chain(q13, q2, w13, w2, sizes, g):
    """The whole routed-expert layer at prefill sizes (CUDA-graph replays): fp8's chain
    (quantized_moe_experts: the tokens quantized, then sorted, their codes gathered; W8A8 GEMMs;
    the weighted un-permute), fp8 through the permuted rows (moe_permute -> grouped -> un-permute:
    the form before), and bf16's moe_experts (its fused form: no row copies)."""
    from harness import bench_graph, kernel_times, rel_err

    from kimi_graph.lowering.triton import moe, moe_permute, moe_quant
    out = []
    for N in sizes:
        x = torch.randn(N, D, generator=g, device="cuda").bfloat16()
        ids = torch.rand(N, E, generator=g, device="cuda").topk(K, -1)[1]
        w = torch.rand(N, K, generator=g, device="cuda")
        acc = torch.zeros(N, D, device="cuda", dtype=torch.bfloat16)

        def permuted():
            rows, off, order = moe_permute.moe_permute(x, ids, E)
            y = moe_quant.quantized_grouped_swiglu(rows, off, *q13, *q2, fmt="fp8")
            return moe_permute.moe_unpermute(y, order, w, acc)
        forms = {"fp8 chain": lambda: moe_quant.quantized_moe_experts(x, ids, w, *q13, *q2, acc, fmt="fp8"),
                 "fp8 permuted rows": permuted,
                 "bf16 moe_experts": lambda: moe.moe_experts(x, ids, w, w13, w2, acc)}
        want = forms["bf16 moe_experts"]().float()
        t_bf16 = bench_graph(forms["bf16 moe_experts"], replays=3)
        for name, fn in forms.items():
            ms = t_bf16 if name.startswith("bf16") else bench_graph(fn, replays=3)
            row = {"path": "chain", "format": "fp8" if name.startswith("fp8") else "bf16", "tokens": N,
                   "variant": name, "ms": ms, "bf16_ms": t_bf16, "x_bf16": t_bf16 / ms,
                   "rel_err_vs_bf16": rel_err(fn().float(), want), "kernel_ms": kernel_times(fn)}
            out.append(row)
            print(f"  chain {N:>6}  {name:<22}{1e3 * ms:>9.1f} us  x bf16 {row['x_bf16']:.2f}  "
                  f"vs bf16 {row['rel_err_vs_bf16']:.1e}", flush=True)
    return out


def by_id_fp64(x, ids, wts, q13, q2, fmt):
    """sum_j wts[n, j] SwiGLU_{ids[n, j]}(x[n]) in float64 over the dequantized experts."""
    from kimi_graph.ops.quant import dequantize
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in ids.unique().tolist():
        a = dequantize(q13[0][e], q13[1][e].double(), None, fmt, 128)
        b = dequantize(q2[0][e], q2[1][e].double(), None, fmt, 128)
        n, j = (ids == e).nonzero(as_tuple=True)
        xe = x[n].double()
        g, u = xe @ a[:I].T, xe @ a[I:].T
        out.index_add_(0, n, wts[n, j, None].double() * ((g * torch.sigmoid(g) * u) @ b.T))
    return out


def by_id(fmt, q13, q2, w13, w2, per_expert, bw, g):
    """moe_decode's entry (top-8, acc given, no shared expert) with `fmt` codes: experts by id
    (the target's loader, and int4 on moe_w4a8's loops: a8) and the permuted grouped path, against bf16
    experts by id, 1-8 tokens (CUDA graphs)."""
    from harness import bench_graph, rel_err

    from kimi_graph.lowering.triton import moe_decode
    from kimi_graph.lowering.triton.targets import TARGETS, current_target
    cfg = TARGETS[current_target()]["configs"]["moe_decode"]
    base = dict(cfg)
    quant = moe_decode.Quant(fmt, 128, q13[1], q2[1])
    out = []
    for N in (1, 2, 4, 8):
        x = torch.randn(N, D, generator=g, device="cuda").bfloat16()
        ids = torch.rand(N, E, generator=g, device="cuda").topk(K, -1)[1]
        wts = torch.rand(N, K, generator=g, device="cuda")
        acc = torch.zeros(N, D, device="cuda", dtype=torch.bfloat16)
        t_bf16 = bench_graph(lambda: moe_decode.direct(x, ids, wts, w13, w2, acc))
        ref = by_id_fp64(x, ids, wts, q13, q2, fmt)
        read = ids.unique().numel() * per_expert
        for name, over in (("by id (default)", {}), ("by id a8", {"a8": True}),
                           ("permuted grouped", {"quant_direct": False})):
            cfg.update(over)
            moe_decode.decode_specs.cache_clear()
            try:
                run = lambda: moe_decode.moe_experts(x, ids, wts, q13[0], q2[0], acc, None, quant)  # noqa: E731
                ms, err = bench_graph(run), rel_err(run(), ref)
            except Exception as exc:                    # one variant's failure ends no other's
                print(f"{fmt} {N} tokens {name}: error {type(exc).__name__}: {str(exc)[:300]}")
                continue
            finally:
                cfg.clear()
                cfg.update(base)
                moe_decode.decode_specs.cache_clear()
            out.append({"path": "by id", "format": fmt, "tokens": N, "variant": name, "ms": ms, "bf16_ms": t_bf16,
                        "x_bf16": t_bf16 / ms, "read_MB": read / 1e6, "pct_copy_bw": 100 * read / (ms * 1e-3) / bw,
                        "tflops": 2 * N * K * 3 * D * I / (ms * 1e-3) / 1e12, "rel_err": err})
            r = out[-1]
            print(f"{fmt:>6} {N:>6}  {'decode ' + name:<26}{1e3 * ms:>9.1f}{r['pct_copy_bw']:>8.1f}{r['x_bf16']:>8.2f}"
                  f"{r['tflops']:>9.1f}{err:>10.1e}   (bf16 by id {1e3 * t_bf16:.1f} us)", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="interpreter smoke run (default without a GPU)")
    ap.add_argument("--formats", default="int4,int8,fp8")
    ap.add_argument("--tokens", default="1,4,16", help="decode-sized token counts (int4 / int8)")
    ap.add_argument("--prefill", default="8192", help="prefill token counts (fp8)")
    ap.add_argument("--int-prefill", default="4096", help="prefill token counts (int4 / int8; '': none)")
    ap.add_argument("--by-id", action="store_true", help="also moe_decode's experts by id (1-8 tokens)")
    ap.add_argument("--chain", action="store_true",
                    help="also the whole fp8 expert layer (quantized_moe_experts) against bf16's at --prefill sizes")
    ap.add_argument("--name", default="lowbit", help="bench/results/NAME.json")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds after which no new variant starts (0: none)")
    ap.add_argument("--write-tuning", action="store_true",
                    help="merge the best int4 decode and fp8 prefill variants into the device's tuning file")
    args = ap.parse_args(argv)
    if args.cpu or not torch.cuda.is_available():
        cpu_smoke()
    else:
        gpu(args)


if __name__ == "__main__":
    main()
