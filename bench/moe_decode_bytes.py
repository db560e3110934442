"""Does a one-token MoE decode kernel's time follow the bytes it reads? The direct routed (+
shared) experts (lowering/triton/moe_decode.py) at B=1 on the published shapes (256 experts, D
2304, I 1024), with 1-8 routed experts and with / without the shared expert: each kernel's time
(torch.profiler, CUDA-graph-replayed calls) against its weight bytes, and a least-squares line
time = fixed + bytes / rate per kernel. A large `fixed` (and a `rate` near the copy rate) says
the kernel is bound by its latency, not by DRAM bytes: reading fewer bytes (an L2 prefetch, the
shared expert elsewhere) then buys little.

    python bench/moe_decode_bytes.py          # GPU: table + bench/results/moe_decode_bytes.json (--name)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

E, D, I = 256, 2304, 1024


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept us, bytes per us) of the least-squares line us = a + bytes / rate."""
    n = len(points)
    mx, my = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (t - my) for b, t in points) / sxx
    return my - slope * mx, 1.0 / slope


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="moe_decode_bytes", help="bench/results/NAME.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("moe_decode_bytes: needs a GPU")
    sys.path.insert(0, os.path.dirname(__file__))
    from harness import bench_graph, copy_bandwidth, kernel_times, write_result

    from kimi_graph.lowering.triton import moe_decode
    bw = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: (torch.randn(*s, device="cuda", generator=g) * s[-1] ** -0.5).bfloat16()  # noqa: E731
    w13, w2, shared = r(E, 2 * I, D), r(E, D, I), (r(I, D), r(I, D), r(D, I))
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


if __name__ == "__main__":
    main()
