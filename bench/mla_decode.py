"""MLA latent decode: B=32, H=32, latent 512 + rope 64, context 32k, bf16. Bytes: the latent and
rope-key caches read once (plus queries and output); rate against the copy bandwidth measured in
the same run; a torch (cuBLAS bmm + softmax) baseline in the same run. python bench/mla_decode.py"""
from __future__ import annotations

import torch
from harness import bench, copy_bandwidth, override_config, rel_err, write_result

from kimi_graph.lowering.triton import mla
from kimi_graph.ops import get_op

B, H, R, P, S = 32, 32, 512, 64, 32768
SCALE = 192 ** -0.5


def torch_latent(ql, qr, c, kr):
    s = (torch.einsum("bthr,bsr->bhts", ql, c) + torch.einsum("bthp,bsp->bhts", qr, kr)).float() * SCALE
    return torch.einsum("bhts,bsr->bthr", torch.softmax(s, -1).to(c.dtype), c)


def main():
    bw = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)
    # correctness on a ragged batch (per-sequence lengths) against fp64
    qs = torch.randint(100, 4000, (4,), device="cuda", generator=g)
    args = [mk(4, 1, H, R), mk(4, 1, H, P), mk(4, 4096, R), mk(4, 4096, P), qs]
    ref = get_op("mla_latent_attention").ref([a.double() if a.is_floating_point() else a for a in args],
                                             {"scale": SCALE})[0]
    err = rel_err(mla.mla_latent_attention(*args, scale=SCALE), ref)
    ql, qr, c, kr = mk(B, 1, H, R), mk(B, 1, H, P), mk(B, S, R), mk(B, S, P)
    nbytes = (c.numel() + kr.numel() + ql.numel() + qr.numel() + ql.numel()) * 2
    t_torch = bench(lambda: torch_latent(ql, qr, c, kr))
    rows = []
    for BS, warps, stages in ((64, 8, 2), (32, 4, 2), (32, 8, 3), (64, 4, 2), (16, 4, 3)):
        override_config("mla_decode", BS=BS, num_warps=warps, num_stages=stages)
        try:
            out = mla.mla_latent_attention(ql, qr, c, kr, scale=SCALE)
            ms = bench(lambda: mla.mla_latent_attention(ql, qr, c, kr, scale=SCALE))
        except Exception as e:      # e.g. out of shared memory for a variant
            print(f"BS={BS} warps={warps} stages={stages}: {type(e).__name__}: {str(e)[:120]}")
            continue
        rows.append({"BS": BS, "warps": warps, "stages": stages, "us": ms * 1e3,
                     "of_copy_bw": nbytes / (ms * 1e-3) / bw, "vs_torch": t_torch / ms,
                     "diff_torch": rel_err(out, torch_latent(ql, qr, c, kr))})
    write_result("mla_decode", rows, {"copy_bandwidth_GBps": bw / 1e9, "torch_us": t_torch * 1e3,
                                      "bf16_rel_err_ragged": err,
                                      "shape": f"B={B}, H={H}, R={R}, P={P}, S={S}, bf16"})


if __name__ == "__main__":
    main()
