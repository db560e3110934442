"""MLA prefill attention over a long cache in key blocks (mla.prefix_attention) on a GPU: one
chunk of T queries (B=1, published width: 32 heads, latent 512, nope 128, rope 64, v 128,
bf16) after a prefix of P cached rows, its keys and values decompressed `key_block` rows at a
time. Per prefix: ms, TFLOP/s of the attention (the key-query pairs the chunk sees, qk 192 + v
128 wide) and of attention + decompression, the one-block form where it fits (P + T <= 64k),
both checked against each other, and the estimated attention time of one MLA layer over a whole
prefill of --context tokens in T-token chunks (sum over its chunks, interpolated linearly in
the prefix length from the measured prefixes).

    python bench/prefix_attention.py                       # T 16k, prefixes 0 .. 240k, 1M estimate
    python bench/prefix_attention.py --key-block 32768 --prefixes 0,131072
"""
from __future__ import annotations

import argparse

import torch

from harness import bench, rel_err, write_result

from kimi_graph.lowering.triton import mla

H, R, N, P, V = 32, 512, 128, 64, 128
SCALE = (N + P) ** -0.5


def pairs(prefix: int, T: int) -> float:
    """Key-query pairs a chunk of T queries after `prefix` rows sees (causal)."""
    return T * prefix + T * (T + 1) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--prefixes", default="0,16384,49152,114688,245760")
    ap.add_argument("--key-block", type=int, default=None, help="default: the target's attention key_block")
    ap.add_argument("--context", type=int, default=1 << 20, help="prefill whose attention time is estimated")
    args = ap.parse_args()
    dev, bf, T = "cuda", torch.bfloat16, args.chunk
    prefixes = [int(x) for x in args.prefixes.split(",") if x]
    torch.manual_seed(0)
    S_max = max(prefixes) + T
    latent = torch.randn(1, S_max, R, device=dev, dtype=bf)
    kr = torch.randn(1, S_max, P, device=dev, dtype=bf)
    w = (torch.randn(H * (N + V), R, device=dev) / R ** 0.5).to(bf)
    q = torch.randn(1, T, H, N + P, device=dev, dtype=bf)
    rows = []
    for pre in prefixes:
        S = pre + T
        qs = torch.tensor([pre], device=dev)
        run = lambda kb=args.key_block: mla.prefix_attention(q, latent[:, :S], w, kr[:, :S], qs, nope=N,  # noqa: E731
                                                             scale=SCALE, key_block=kb)
        ms = bench(run, warmup=2, rep=10)
        kb = args.key_block or mla.config("attention", mla.current_target()).get("key_block", 16384)
        attn_flop = 2 * H * (N + P + V) * pairs(pre, T)
        decomp_flop = 2 * S * R * H * (N + V)              # every cached row's k and v, once per chunk
        row = {"prefix": pre, "chunk": T, "key_block": kb, "ms": ms, "attn_TFLOPs": attn_flop / ms / 1e9,
               "all_TFLOPs": (attn_flop + decomp_flop) / ms / 1e9}
        if S <= 65536 and S > kb:
            row["err_vs_one_block"] = rel_err(run(), run(S))
        rows.append(row)
        print(row, flush=True)
    # one layer's attention over a whole prefill: chunks at prefixes 0, T, 2T, ...; the time of
    # each interpolated from the measured prefixes (time is linear in the prefix length)
    xs, ys = [r["prefix"] for r in rows], [r["ms"] for r in rows]

    def at(x: float) -> float:
        if len(xs) == 1:
            return ys[0]
        i = max(0, min(len(xs) - 2, sum(1 for v in xs if v <= x) - 1))
        return ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])
    est = sum(at(p0) for p0 in range(0, args.context, T)) / 1e3
    write_result("prefix_attention", rows, {"estimate": {"context": args.context, "chunk": T,
                                                         "one_mla_layer_s": est, "seven_mla_layers_s": 7 * est}})
    print(f"estimated attention of one MLA layer over a {args.context}-token prefill: {est:.1f} s (x7: {7 * est:.1f} s)")


if __name__ == "__main__":
    main()
