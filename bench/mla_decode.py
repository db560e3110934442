"""MLA latent decode: B=32, H=32, latent 512 + rope 64, context 32k, bf16. Bytes: the latent and
rope-key caches read once (plus queries and output); rate against the copy bandwidth measured in
the same run; a torch (cuBLAS bmm + softmax) baseline in the same run. python bench/mla_decode.py

--small: the decode shapes of one engine step (B=1 and 32 at 1k-128k context), every kernel tile
against every split count, replayed from CUDA graphs (split + merge, as decode runs them); the
best per shape is printed last and written to mla_decode_small.json.
--small --variants '[{"merge_cols": 64}, ...]' [--shapes 1x1024,1x32768] [--name NAME]: the target's
tiles with each variant's keys over them (e.g. merge_splits: the merge's splits a step; merge_cols:
the latent columns a merge program takes), against the split counts (written to NAME.json,
default mla_decode_variants)."""
from __future__ import annotations

import argparse

import torch
from harness import bench, bench_graph, copy_bandwidth, override_config, rel_err, write_result

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


SMALL_SHAPES = ((1, 1024), (1, 32768), (1, 131072), (32, 1024), (32, 32768))
SMALL_TILES = [dict(BM=bm, BM_small=bm, BS=bs, num_warps=w, num_stages=2)
               for bm in (32, 16) for bs in (64, 32) for w in (4, 8)] + \
    [dict(BM=bm, BM_small=bm, BS=64, num_warps=4, num_stages=3) for bm in (32, 16)]
SMALL_SPLITS = (None, 8, 16, 32, 66, 132, 264)      # None: mla.py's own rule


def small(shapes=SMALL_SHAPES, variants=None, name="mla_decode_small", write_tuning=False):
    """variants: the target's own tiles with each variant's keys over them, against the split counts;
    write_tuning: the variant of least summed time over the shapes at mla.py's own split rule into
    this device's tuning file (the keys it sets)."""
    bw = copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)
    from kimi_graph.lowering.triton.targets import config
    default = dict(config("mla_decode"))
    rows, base = [], {}
    tiles = SMALL_TILES if not variants else [dict(default, **v) for v in variants]
    for B, S in shapes:
        ql, qr, c, kr = mk(B, 1, H, R), mk(B, 1, H, P), mk(B, S, R), mk(B, S, P)
        nbytes = (c.numel() + kr.numel()) * 2
        ref = torch_latent(ql, qr, c, kr)
        for tile in [None] + tiles:             # None: the target's own tiles and split rule
            override_config("mla_decode", **(tile or default))
            for splits in (SMALL_SPLITS if tile else (None,)):
                call = lambda: mla.mla_latent_attention(ql, qr, c, kr, scale=SCALE, splits=splits)
                try:
                    err = rel_err(call(), ref)
                    us = bench_graph(call) * 1e3
                except Exception as e:      # e.g. out of shared memory for a tile
                    print(B, S, tile, splits, type(e).__name__, str(e)[:100])
                    continue
                row = {"B": B, "S": S, **(tile or {"BM": "default"}), "splits": splits or "auto", "us": us,
                       "of_copy_bw": nbytes / (us * 1e-6) / bw, "err_vs_torch": err}
                if variants and tile:
                    row["variant"] = tiles.index(tile)
                rows.append(row)
                if tile is None:
                    base[(B, S)] = us
        del ql, qr, c, kr
    best = {}
    for r in rows:
        k = (r["B"], r["S"])
        if k not in best or r["us"] < best[k]["us"]:
            best[k] = r
    write_result(name, rows, {"copy_bandwidth_GBps": bw / 1e9,
                                            "best": [dict(v, default_us=base.get(k, 0)) for k, v in best.items()]})
    if variants:
        auto = {}
        for r in rows:
            if "variant" in r and r["splits"] == "auto":
                auto[r["variant"]] = auto.get(r["variant"], 0.0) + r["us"]
        for i, us in sorted(auto.items()):
            print(f"variant {variants[i]}: {us:.1f} us summed over the shapes (default {sum(base.values()):.1f})")
        win = min(auto, key=auto.get)
        if write_tuning and auto[win] < sum(base.values()):
            from harness import merge_tuning
            print("tuning file:", merge_tuning("mla_decode", variants[win], f"bench/mla_decode.py --small: the least "
                                               f"summed time over {shapes} of {len(variants)} variants"))
    for k, v in best.items():
        print(f"B={k[0]} S={k[1]}: default {base.get(k, 0):.1f} us, best {v['us']:.1f} us "
              f"({v['of_copy_bw']:.0%} of copy) with "
              f"{dict((x, v.get(x)) for x in ('BM', 'BM_small', 'BS', 'num_warps', 'num_stages', 'splits', 'merge_splits', 'merge_cols'))}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the engine's decode shapes, tiles x split counts")
    ap.add_argument("--shapes", default=None, help="--small's shapes, BxS,... (default: all)")
    ap.add_argument("--variants", default=None, help="--small with the target's tiles and each of these key "
                    "sets over them (a JSON list of objects)")
    ap.add_argument("--name", default=None, help="--small's result name")
    ap.add_argument("--write-tuning", action="store_true", help="--variants: the best into the tuning file")
    a = ap.parse_args()
    if a.small:
        import json
        shapes = tuple(tuple(int(v) for v in sh.split("x")) for sh in a.shapes.split(",")) if a.shapes else SMALL_SHAPES
        variants = json.loads(a.variants) if a.variants else None
        small(shapes, variants, a.name or ("mla_decode_variants" if variants else "mla_decode_small"), a.write_tuning)
    else:
        main()
