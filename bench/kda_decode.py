"""KDA decode step (in-place fp32 state) at B = 1, 32, 256, H=32, D=128, bf16 activations:
time against the copy bandwidth measured in the same run (bytes: state read + written, plus
q, k, v, f, b read and o written). Run on a GPU: python bench/kda_decode.py"""
from __future__ import annotations

import torch
from harness import bench, bench_graph, copy_bandwidth, merge_tuning, override_config, rel_err, write_result
from kda_chunk import D, H, inputs, reference

from kimi_graph.lowering.triton import kda


def main():
    bw = copy_bandwidth()
    rows = []
    for B in (1, 32, 256):
        q, k, v, f, b, A_log, dt_bias = inputs(B, 1)
        state = torch.randn(B, H, D, D, device="cuda") * 0.1
        ro, rs = reference(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), f.transpose(0, 1),
                           b.transpose(0, 1), A_log, dt_bias, state, list(range(B + 1)))
        o, s = kda.kda_step(q, k, v, f, b, A_log, dt_bias, D ** -0.5, state=state.clone())
        err = max(rel_err(o.transpose(0, 1), ro), rel_err(s, rs))
        st = state.clone()
        step = lambda: kda.kda_step(q, k, v, f, b, A_log, dt_bias, D ** -0.5, state=st, inplace=True)
        ms, ms_graph = bench(step), bench_graph(step)
        nbytes = 2 * st.numel() * 4 + sum(t.numel() * t.element_size() for t in (q, k, v, f, b)) + o.numel() * 2
        rows.append({"B": B, "us": ms * 1e3, "graph_us": ms_graph * 1e3, "GB/s": nbytes / ms_graph / 1e6,
                     "of_copy_bw": nbytes / (ms_graph * 1e-3) / bw, "rel_err": err})
    # sweep the decode kernel's tile at B=256 and keep the best for this device
    sweep = []
    for BV in (16, 32, 64):
        for warps in (1, 2, 4, 8):
            override_config("kda_recurrent", BV=BV, num_warps=warps)
            ms = bench(lambda: kda.kda_step(q, k, v, f, b, A_log, dt_bias, D ** -0.5, state=st, inplace=True))
            sweep.append((ms, BV, warps))
            rows.append({"B": 256, "us": ms * 1e3, "graph_us": "-", "GB/s": nbytes / ms / 1e6,
                         "of_copy_bw": nbytes / (ms * 1e-3) / bw, "rel_err": f"BV={BV} w={warps}"})
    ms, BV, warps = min(sweep)
    merge_tuning("kda_recurrent", {"BV": BV, "num_warps": warps},
                 f"B=256 decode step {ms * 1e3:.1f} us, {nbytes / (ms * 1e-3) / bw:.1%} of copy bandwidth")
    write_result("kda_decode", rows, {"copy_bandwidth_GBps": bw / 1e9, "shape": f"H={H}, D={D}"})


if __name__ == "__main__":
    main()
