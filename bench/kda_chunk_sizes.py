"""KDA chunk prefill at each chunk size the Triton kernels run (chunk-kda{chunk-size=N} reaches
them): bf16 error against the fp64 recurrence and time at T = 16k, B = 1, H = 32, D = 128,
next to the target's own tile. Run on a GPU: python bench/kda_chunk_sizes.py"""
from __future__ import annotations

import torch
from harness import bench, override_config, rel_err, write_result
from kda_chunk import D, inputs, reference

from kimi_graph.lowering.triton import kda
from kimi_graph.lowering.triton.targets import config


def main():
    rows = []
    args, cu, state = inputs([700, 1, 1299], seed=1)
    ro, rs = reference(args, state, cu)
    big, _, _ = inputs([16384])
    override_config("kda_chunk", op_chunk=True)     # each chunk size as asked (sm_90 runs its own BT)
    for chunk in (None,) + kda.CHUNK_SIZES:
        o, s = kda.kda_chunk(*args, D ** -0.5, state=state, cu_seqlens=cu, chunk=chunk)
        with torch.no_grad():
            ms = bench(lambda: kda.kda_chunk(*big, D ** -0.5, chunk=chunk))
        rows.append({"chunk": chunk or f"target ({config('kda_chunk')['BT']})", "err_o": rel_err(o, ro),
                     "err_state": rel_err(s, rs), "ms_16k": ms})
        print(rows[-1])
    return rows


if __name__ == "__main__":
    write_result("kda_chunk_sizes", main(), {"tolerance": "bf16 inputs, fp32 state: rel err <= 1e-2"})
