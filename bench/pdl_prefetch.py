"""Dependent launches with a kernel's weights prefetched into L2 before its wait: does a
memory-bound GEMV that follows a latency-bound kernel (KDA's step, the router) gain when its
weight reads start while the predecessor still runs? And a GEMV after a GEMV (down after
gate/up)?

Chains of `--pairs` (predecessor -> GEMV of N x 4096 bf16 weights) replayed in one CUDA graph:
  plain      ordinary launches
  pdl        dependent launches, each kernel waiting first, then letting its successor launch
  pdl-l2     the same, each GEMV program's weight lines prefetched into L2 before its wait
  pdl-regs   the same, each GEMV program's weight tile loaded into registers before its wait
Predecessors: "busy" (32 programs of dependent FMAs, ~the length of a latency-bound kernel) or
"gemv" (another GEMV of the same shape). Prints us per pair, and each kernel alone (its own chain
in one graph; the first recorded run, 36815fd, timed those from host launches instead).

    python bench/pdl_prefetch.py [--pairs 26] [--iters 1500]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from harness import bench_graph, copy_bandwidth, rel_err, write_result

K = 4096
BN = 4


@triton.jit
def _wait_then_release(PDL: tl.constexpr):
    if PDL:
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def busy(x_ptr, out_ptr, ITERS: tl.constexpr, PDL: tl.constexpr):
    # 32 programs x 128 values of a serial FMA chain: a short kernel bound by latency, not bytes
    _wait_then_release(PDL)
    offs = tl.program_id(0) * 128 + tl.arange(0, 128)
    v = tl.load(x_ptr + offs).to(tl.float32)
    for _ in range(ITERS):
        v = v * 0.9990234375 + 0.0009765625
    tl.store(out_ptr + offs, v.to(tl.bfloat16))


@triton.jit
def gemv(x_ptr, w_ptr, y_ptr, K: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):
    # y[n] = sum_k x[k] w[n, k] for BN rows a program; MODE 0 plain, 1 PDL, 2 PDL + L2 prefetch, 3 PDL + registers
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.arange(0, K)
    wp = w_ptr + n[:, None] * K + k[None, :]
    if MODE == 2:                       # one prefetch per 128-byte line of this program's rows
        line = tl.arange(0, K // 64)
        addr = (w_ptr + n[:, None] * K + line[None, :] * 64).to(tl.int64, bitcast=True)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [addr], dtype=tl.int32,
                                  is_pure=False, pack=1)
    if MODE == 3:
        w = tl.load(wp)
    _wait_then_release(MODE > 0)
    if MODE != 3:
        w = tl.load(wp)
    x = tl.load(x_ptr + k)
    y = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
    tl.store(y_ptr + n, y.to(tl.bfloat16))


def chain(pred: str, mode: int, ws, w0, bufs, iters: int):
    """The launches of one replay: per pair its predecessor, then the GEMV."""
    pdl = mode > 0
    N = ws[0].shape[0]

    def run():
        x = bufs[0]
        for i, w in enumerate(ws):
            h = bufs[1 + (i % 2)]
            if pred == "busy":
                busy[(32,)](x, h, ITERS=iters, PDL=pdl, num_warps=4, launch_pdl=pdl)
            else:
                gemv[(K // BN,)](x, w0, h, K=K, BN=BN, MODE=mode, num_warps=4, launch_pdl=pdl)
            gemv[(N // BN,)](h, w, x, K=K, BN=BN, MODE=mode, num_warps=4, launch_pdl=pdl)
        return x
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=26)
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--rows", default="2304,4608", help="GEMV output rows (weights N x 4096 bf16)")
    a = ap.parse_args()
    copy = copy_bandwidth()
    rows = []
    for N in (int(r) for r in a.rows.split(",")):
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(a.pairs)]
        w0 = torch.randn(K, K, device="cuda", dtype=torch.bfloat16) / 64
        bufs = [torch.randn(max(N, K), device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        # correctness of every form against torch
        x = torch.randn(K, device="cuda", dtype=torch.bfloat16)
        ref = (ws[0].double() @ x.double())
        for mode in range(4):
            y = torch.empty(N, device="cuda", dtype=torch.bfloat16)
            gemv[(N // BN,)](x, ws[0], y, K=K, BN=BN, MODE=mode, num_warps=4, launch_pdl=mode > 0)
            err = rel_err(y, ref)
            assert err < 1e-2, (mode, err)
        alone = bench_graph(lambda: [gemv[(N // BN,)](bufs[0], w, bufs[1], K=K, BN=BN, MODE=0, num_warps=4)
                                     for w in ws], 1) / a.pairs
        busy_ms = bench_graph(lambda: [busy[(32,)](bufs[0], bufs[1], ITERS=a.iters, PDL=False, num_warps=4)
                                       for _ in range(a.pairs)], 1) / a.pairs
        for pred in ("busy", "gemv"):
            for mode, form in enumerate(("plain", "pdl", "pdl-l2", "pdl-regs")):
                ms = bench_graph(chain(pred, mode, ws, w0, bufs, a.iters), 1) / a.pairs
                rows.append({"N": N, "pred": pred, "form": form, "ms_per_pair": ms,
                             "gemv_alone_ms": alone, "busy_alone_ms": busy_ms,
                             "weight_mb": N * K * 2 / 1e6})
                print(f"N={N} {pred:>4} {form:<9} {ms * 1e3:8.2f} us/pair  (gemv alone {alone * 1e3:.2f} us = "
                      f"{N * K * 2 / (alone * 1e-3) / copy:.0%} of copy, busy alone {busy_ms * 1e3:.2f} us)", flush=True)
    write_result("pdl_prefetch", rows, {"copy_tb_s": copy / 1e12, "pairs": a.pairs, "iters": a.iters})
    base = {(r["N"], r["pred"]): r["ms_per_pair"] for r in rows if r["form"] == "plain"}
    print("N     pred  form       us/pair  vs plain")
    for r in rows:
        print(f"{r['N']:<5} {r['pred']:<5} {r['form']:<9} {r['ms_per_pair'] * 1e3:8.2f}  "
              f"{base[(r['N'], r['pred'])] / r['ms_per_pair']:.3f}x")


if __name__ == "__main__":
    main()
