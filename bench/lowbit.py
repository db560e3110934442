"""Low-bit expert kernels (lowering/triton/moe_quant.py) on the published shapes (D=2304 ->
I=1024, 256 experts, top-8), against our bf16 grouped SwiGLU (lowering/triton/moe.py) in the
same run:

- int4 (group 128) and int8 at 1 / 4 / 16 tokens (decode; CUDA-graph replays): the per-row
  kernels over 32-bit words (`rows ...`, lowering/triton/dequant.py) beside the grouped dot
  kernels' small tiles (`dot ...`, rows_max 0: the previous path); pct_copy_bw: the low-bit
  bytes read (codes + scales of the experts touched, read_MB) per second against the copy
  bandwidth measured here; x_bf16: our bf16 grouped SwiGLU's time over this one;
- the same formats through moe_decode's experts by id (the decode step's path, 1-8 tokens at
  top-8, with the combine): the word loader and the per-element one (`dequant` key) against the
  bf16 experts by id;
- fp8 (128 x 128 blocks) at 8k tokens (prefill): fp8 tensor cores (activations in e4m3 per
  row and K tile) and weight-only (codes converted to bf16), against bf16.
Errors: against a float64 SwiGLU over the dequantized weights.

    python bench/lowbit.py              # GPU: table + bench/results/lowbit.json
    python bench/lowbit.py --cpu        # no GPU: the same kernels on small shapes through the
                                        # Triton interpreter (errors only, no timing)
"""
from __future__ import annotations

import argparse
import os
import sys

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


def gpu(args):
    sys.path.insert(0, os.path.dirname(__file__))
    from harness import bench, bench_graph, copy_bandwidth, rel_err, write_result

    from kimi_graph.lowering.triton import moe, moe_quant
    from kimi_graph.lowering.triton.targets import TARGETS, current_target
    from kimi_graph.ops.quant import quantize

    bw = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * D ** -0.5).bfloat16()
    w2 = (torch.randn(E, D, I, device="cuda", generator=g) * I ** -0.5).bfloat16()
    cfg = TARGETS[current_target()]["configs"]["moe_gemm_q"]
    base = dict(cfg)

    def with_config(over, fn):
        cfg.clear()
        cfg.update({**base, **over})
        moe_quant.specs.cache_clear()
        moe_quant.row_specs.cache_clear()
        try:
            return fn()
        finally:
            cfg.clear()
            cfg.update(base)
            moe_quant.specs.cache_clear()
            moe_quant.row_specs.cache_clear()

    rows_out = []
    rows = lambda bn, bk, w=4: dict(BN_rows=bn, BK_rows=bk, BND_rows=bn, BKD_rows=bk, warps_rows=w)  # noqa: E731
    decode_variants = [("default", {}), ("rows BN32_BK256", rows(32, 256)), ("rows BN8_BK512", rows(8, 512)),
                       ("rows serial", dict(prefetch_rows=False)),
                       ("dot BN64", dict(rows_max=0, BN_small=64)),
                       ("dot BN32_BK128_w2", dict(rows_max=0, BN_small=32, BK_small=128, num_warps=2))]
    for fmt in args.formats.split(","):
        q13, q2 = quantize(w13, fmt, 128)[:2], quantize(w2, fmt, 128)[:2]
        per_expert = sum(t[0].nbytes + t[1].nbytes for t in (q13, q2)) / E
        shapes = [n for n in (1, 4, 16)] if fmt != "fp8" else [16, 8192]
        for N in shapes:
            rows, off = routed_rows(N, E, D, g, "cuda", torch.bfloat16)
            touched = int((off[1:] > off[:-1]).sum())
            run = lambda: moe_quant.quantized_grouped_swiglu(rows, off, *q13, *q2, fmt=fmt)  # noqa: E731
            ref = swiglu_fp64(rows, off, q13, q2, fmt, 128)
            bf16 = lambda: moe.grouped_swiglu(rows, off, w13, w2)  # noqa: E731
            timer = bench_graph if N <= 16 else bench
            t_bf16 = timer(bf16)
            variants = decode_variants if N <= 16 else [("fp8 dot" if cfg["fp8_dot"] else "default", {}),
                                                          ("weight-only", {"fp8_dot": False})]
            for name, over in variants:
                if fmt == "fp8" and name.startswith("rows"):     # int4 / int8 only
                    continue
                if with_config(over, run) is None:       # no kernel for this variant on this GPU
                    print(f"{fmt} {N} tokens {name}: no kernel fits (the reference would run)")
                    continue
                ms, err = with_config(over, lambda: (timer(run), rel_err(run(), ref)))
                read = touched * per_expert + 2 * rows.nbytes
                flops = 2 * rows.shape[0] * D * 3 * I
                rows_out.append({"path": "grouped", "format": fmt, "tokens": N, "variant": name, "ms": ms,
                                 "bf16_ms": t_bf16, "x_bf16": t_bf16 / ms, "read_MB": read / 1e6,
                                 "pct_copy_bw": 100 * read / (ms * 1e-3) / bw,
                                 "tflops": flops / (ms * 1e-3) / 1e12, "rel_err": err})
        if fmt != "fp8":
            rows_out += by_id(fmt, q13, q2, w13, w2, per_expert, bw, g)
        # after each format: a run cut short by its time limit keeps what it measured
        write_result("lowbit", rows_out, {"copy_bandwidth_GBps": bw / 1e9,
                                          "shapes": {"E": E, "top_k": K, "D": D, "I": I, "group": 128}})


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
    """moe_decode's experts by id (top-8, acc given, no shared expert) with `fmt` codes: the word
    loader (default) and the per-element one against bf16 experts, 1-8 tokens (CUDA graphs)."""
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
        for name, over in (("words", {"dequant": "words"}), ("elements", {"dequant": "elements"}),
                           ("words serial", {"dequant": "words", "prefetch": False}),
                           ("words BN8_BK1024", {"dequant": "words", "quant_tiles": {"BN": 8, "BK": 1024, "BND": 8,
                                                                                      "BKD": 1024}}),
                           ("words BN32_BK512", {"dequant": "words", "quant_tiles": {"BN": 32, "BK": 512, "BND": 32,
                                                                                      "BKD": 512}})):
            cfg.update(over)
            moe_decode.decode_specs.cache_clear()
            try:
                run = lambda: moe_decode.direct(x, ids, wts, q13[0], q2[0], acc, None, quant)  # noqa: E731
                ms, err = bench_graph(run), rel_err(run(), ref)
            finally:
                cfg.clear()
                cfg.update(base)
                moe_decode.decode_specs.cache_clear()
            out.append({"path": "by id", "format": fmt, "tokens": N, "variant": name, "ms": ms, "bf16_ms": t_bf16,
                        "x_bf16": t_bf16 / ms, "read_MB": read / 1e6, "pct_copy_bw": 100 * read / (ms * 1e-3) / bw,
                        "tflops": 2 * N * K * 3 * D * I / (ms * 1e-3) / 1e12, "rel_err": err})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="interpreter smoke run (default without a GPU)")
    ap.add_argument("--formats", default="int4,int8,fp8")
    args = ap.parse_args(argv)
    if args.cpu or not torch.cuda.is_available():
        cpu_smoke()
    else:
        gpu(args)


if __name__ == "__main__":
    main()
