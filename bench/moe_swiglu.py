"""MoE grouped SwiGLU on the published shapes (D=2304 -> I=1024, 256 experts, top-8), bf16.
8k tokens: FLOP rate against the bf16 GEMM rate measured in the same run; 1-16 tokens: bytes of
the expert weights actually read against the copy bandwidth. Baseline: torch per-expert
F.linear loop over the same packed rows. python bench/moe_swiglu.py"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import bench, bench_graph, copy_bandwidth, gemm_rate, override_config, rel_err, write_result

from kimi_graph.lowering.triton import moe, moe_permute

E, K, D, I = 256, 8, 2304, 1024


def torch_swiglu(rows, counts, w13, w2):
    out, s = torch.empty_like(rows), 0
    for e, n in enumerate(counts):
        if n:
            gu = F.linear(rows[s:s + n], w13[e])
            out[s:s + n] = F.linear(F.silu(gu[:, :I]) * gu[:, I:], w2[e])
            s += n
    return out


def setup(N, g):
    x = torch.randn(N, D, device="cuda", generator=g, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(N)]) if N <= 64 else \
        torch.rand(N, E, device="cuda", generator=g).topk(K, -1)[1]
    return moe_permute.moe_permute(x, ids, E)


def main():
    bw, flops = copy_bandwidth(), gemm_rate()
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * I, D, device="cuda", generator=g, dtype=torch.bfloat16) * D ** -0.5
    w2 = torch.randn(E, D, I, device="cuda", generator=g, dtype=torch.bfloat16) * I ** -0.5
    rows_out = []
    for N in (1, 4, 16, 8192):
        rows, off, _ = setup(N, g)
        counts = (off[1:] - off[:-1]).tolist()
        touched = sum(1 for c in counts if c)
        y = moe.grouped_swiglu(rows, off, w13, w2)
        ref = torch_swiglu(rows.double(), counts, w13.double(), w2.double())
        err = rel_err(y, ref)
        variants = [("default", {})]
        if N == 8192:
            variants += [("BN128_BK64_w8", dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)),
                         ("BM128_BN64_w4", dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=4))]
        else:
            variants += [("BN64_BK64", dict(BN_small=64, BK_small=64)),
                         ("BN16_BK128", dict(BN_small=16, BK_small=128))]
        base = dict(moe.config("moe_gemm"))
        t_torch = bench(lambda: torch_swiglu(rows, counts, w13, w2), rep=50)
        for name, over in variants:
            override_config("moe_gemm", **{**base, **over})
            try:
                run = lambda: moe.grouped_swiglu(rows, off, w13, w2)
                ms = bench(run)
                ms_graph = bench_graph(run) if N <= 16 else ms
            except Exception as e:
                print(name, type(e).__name__, str(e)[:100])
                continue
            wbytes = touched * (3 * I * D * 2)
            r = {"tokens": N, "variant": name, "us": ms * 1e3, "graph_us": ms_graph * 1e3,
                 "vs_torch": t_torch / ms, "rel_err": err}
            if N == 8192:
                r["of_gemm_rate"] = 6.0 * rows.shape[0] * D * I / (ms * 1e-3) / flops
            else:
                r["of_copy_bw"] = (wbytes + rows.numel() * 4) / (ms_graph * 1e-3) / bw
            rows_out.append(r)
        override_config("moe_gemm", **base)
    write_result("moe_swiglu", rows_out, {"copy_bandwidth_GBps": bw / 1e9, "bf16_gemm_TFLOPs": flops / 1e12,
                                          "shape": f"E={E}, top-{K}, D={D}, I={I}, bf16"})


if __name__ == "__main__":
    main()
