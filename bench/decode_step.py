"""One decode step on the GPU, its kernels and its memory floor, with the fused decode path and
the previous one side by side (bf16, random weights, pipeline "default", backend "triton").

For each model (a published-width slice, the full 27 layers) and batch: kernels per step and
kernel time per step (torch.profiler, eager and CUDA-graph replay), ms per step as generation
runs it under CUDA graphs (the step, the draw, the tokens read back), and the memory floor:
the bytes the step must read (bench/e2e.floor_bytes) over the copy bandwidth measured here.
"previous" turns the decode fusions off: routed experts through the permutation at every
batch size (moe_decode max_pairs 0), the router in two kernels and the pipeline without the
passes in FUSION_PASSES.
First, a tile sweep of the direct MoE kernels alone against the grouped path (published
shapes, B = 1, 2, 8), best tiles per token bucket (moe_decode token_tiles), in each of the
`--forms` of the bf16 K loops. Variants (VARIANTS): "fused" (the defaults, plain launches),
"previous", "one-tile" (the direct MoE's base tiles at every batch), "router-2k" (the router's
two kernels where it would run as one launch), "pdl" (fused, with dependent launches),
"pdl-wait" (the same, each kernel letting the next launch only once its own wait has passed:
one kernel ahead), "router-k512" / "router-k256-w2" (the one-launch router in fewer K splits,
K tiles of 512 / of 256 on 2 warps; "router-noprefetch" / "router-prefetch": its weight tiles
loaded in turn / a step ahead), "kda-early" (the one-launch KDA step's state and f_b / g_b rows
loaded before its convs), "kda-fused" / "kda-plain" (KDA's decode step in one launch
or three, kda_decode.py; "kda-fused-w4" on 4 warps), "packed" (the router's packed-key top-k), "tile-unroll"
(the bf16 experts' tile accumulators, unrolled K loops), "packed-tile-unroll" (both), "norm-route" (the add_rmsnorm feeding the router inside its
launch), "packed-norm" (the router's two).

    python bench/decode_step.py                       # 4-layer slice and 27 layers, B=1,32, both paths
    python bench/decode_step.py --layers 4 --batches 1 --variants fused
    python bench/decode_step.py --layers 27 --batches 1,32 --variants fused,one-tile,router-2k --no-sweep
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

import harness  # noqa: F401  (puts the checkout on the path)
import kimi_graph
from e2e import decode_step_fn, floor_bytes, routed_expert_bytes, slice_dict
from harness import copy_bandwidth, kernel_events, per_name, write_result
from kimi_graph.config import KimiLinearConfig
from kimi_graph.passes import DEFAULT_PIPELINE
from kimi_graph.runtime import Engine

FUSION_PASSES = ("fuse-linears",)        # passes of the default pipeline that "previous" leaves out

# variant -> the tile keys it sets (over the target's, or the sweep's best with --use-best)
VARIANTS = {
    "fused": {},
    "previous": {"moe_decode": {"max_pairs": 0}, "moe_route": {"fused_max": 0}},  # + the pipeline without FUSION_PASSES
    "one-tile": {"moe_decode": {"token_tiles": []}},                # the direct MoE's tiles whatever the batch
    "router-2k": {"moe_route": {"fused_max": 0}},                   # the router in two kernels at every batch
    "pdl": {"launch": {"pdl": True}},                               # fused, with dependent launches
    "pdl-wait": {"launch": {"pdl": True, "pdl_trigger": "wait"}},   # ... each triggering after its own wait
    # at one token: the GEMV projections launched dependently, their W lines prefetched into L2
    # while the kernel before them (KDA's step, MLA's merge) runs; every other kernel built to let
    # them start early; "pdl-all-1": every kernel launched dependently
    "pdl-gemv": {"launch": {"pdl_rows": 1, "pdl_kernels": ["gemv_rows"]}},
    "pdl-all-1": {"launch": {"pdl_rows": 1}},
    "packed": {"moe_route": {"select": "packed"}},                  # the router's one-reduction-a-pick top-k
    "tile-unroll": {"moe_decode": {"acc": "tile", "unroll": True}},  # the bf16 experts' K loops (moe_decode.FORMS)
    "packed-tile-unroll": {"moe_route": {"select": "packed"}, "moe_decode": {"acc": "tile", "unroll": True}},
    "norm-route": {"moe_route": {"norm_inline": True}},             # the norm feeding the router in its launch
    "packed-norm": {"moe_route": {"select": "packed", "norm_inline": True}},
    # the one-launch router at decode sizes with fewer K splits (fewer programs, fewer partials to sum)
    "router-k512": {"moe_route": {"BK_small": 512}},
    "router-k256-w2": {"moe_route": {"BK_small": 256, "num_warps_small": 2}},
    "router-noprefetch": {"moe_route": {"prefetch": False}},      # the router's weight tiles loaded in turn
    "router-prefetch": {"moe_route": {"prefetch": True}},          # ... a step ahead (off on sm_90 until timed)
    "kda-early": {"kda_recurrent": {"decode_early_rows": 16}},     # the one-launch KDA step's early loads
    "kda-fused": {"kda_recurrent": {"fused_decode": 256}},          # KDA's convs, f_b / g_b and step in one launch
    "kda-plain": {"kda_recurrent": {"fused_decode": 0}},
    "kda-fused-w4": {"kda_recurrent": {"fused_decode": 256, "decode_warps": 4}},
    # KDA's one-launch step with each head's V columns over 2 / 4 programs (up to 8 sequences)
    "kda-split2": {"kda_recurrent": {"decode_split": 2, "decode_split_rows": 8}},
    "kda-split4": {"kda_recurrent": {"decode_split": 4, "decode_split_rows": 8}},
    "kda-split4-w4": {"kda_recurrent": {"decode_split": 4, "decode_split_rows": 8, "decode_split_warps": 4}},
    "kda-split8-w4": {"kda_recurrent": {"decode_split": 8, "decode_split_rows": 8, "decode_split_warps": 4}},
    # int4 experts of one-token steps by id (W4A8 loops, the shared expert in the same launches)
    "int4-id": {"moe_decode": {"quant_direct_tokens": {"int4": 1}}},
    "int4-id-a8": {"moe_decode": {"quant_direct_tokens": {"int4": 1}, "a8": True}},
    "int4-id-a8-n16": {"moe_decode": {"quant_direct_tokens": {"int4": 1}, "a8": True},
                       "moe_gemm_q": {"BN_w4a8": 16, "BND_w4a8": 16}},
    "int4-id-a8-n8": {"moe_decode": {"quant_direct_tokens": {"int4": 1}, "a8": True},
                      "moe_gemm_q": {"BN_w4a8": 8, "BND_w4a8": 8}},
    # low-bit experts by id: the shared (bf16) expert's rows of a block over 2 / 4 programs a token
    "shared-split2": {"moe_decode": {"shared_split": 2}},
    "shared-split4": {"moe_decode": {"shared_split": 4}},
    "int4-id-a8-sh4": {"moe_decode": {"quant_direct_tokens": {"int4": 1}, "a8": True, "shared_split": 4}},
    # weights into L2 beside the latency-bound steps (prefetch.py): up to 32 / 16 MB before each
    "l2-prefetch": {"l2_prefetch": {"enabled": True}},
    "l2-prefetch-16": {"l2_prefetch": {"enabled": True, "max_bytes": 16 << 20}},
    # ... with the shared expert's programs first in the MoE kernels (read before the routed stream)
    "l2-prefetch-sf": {"l2_prefetch": {"enabled": True}, "moe_decode": {"shared_first": True}},
    "int4-id-a8-n16-w2": {"moe_decode": {"quant_direct_tokens": {"int4": 1}, "a8": True},
                          "moe_gemm_q": {"BN_w4a8": 16, "BND_w4a8": 16, "warps_w4a8": 2}},
    # the one-token MoE tiles moe_decode_bytes.py --forms timed fastest (its result file; resolved at start)
    "forms-best": None,
    # the shared expert on a side stream beside the router at one token (moe_decode shared_beside;
    # on in sm_90's defaults), or folded into the routed kernels
    "shared-beside": {"moe_decode": {"shared_beside": 1}},
    "shared-folded": {"moe_decode": {"shared_beside": 0}},
}
_BASE_KEYS: dict = {}


def forms_best() -> dict:
    """moe_decode with the one-token tiles `moe_decode_bytes.py --forms` timed fastest."""
    from moe_decode_bytes import best_tiles, one_token

    from kimi_graph.lowering.triton.targets import config
    return {"moe_decode": {"token_tiles": one_token(config("moe_decode"), best_tiles())["token_tiles"]}}


def variant_setup(name: str) -> str:
    """Configure the kernels for a variant; returns its pipeline."""
    from harness import override_config
    from kimi_graph.lowering.triton.targets import config
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    for fam, keys in ((f, k) for over in VARIANTS.values() if over for f, k in over.items()):
        base = _BASE_KEYS.setdefault(fam, {})
        cfg = config(fam)
        base.update({k: cfg[k] for k in keys if k not in base})
    for fam, keys in _BASE_KEYS.items():
        override_config(fam, **{**keys, **VARIANTS[name].get(fam, {})})
    if name == "previous":
        return ",".join(p for p in DEFAULT_PIPELINE.split(",") if p.split("{")[0] not in FUSION_PASSES)
    return "default"


def profile_step(step, reps: int) -> tuple[float, float, dict]:
    """(kernels per step, kernel ms per step, {kernel: [ms, launches] per step}, largest first)."""
    events = kernel_events(step, reps)
    counts: dict = {}
    for name, _ in events:
        counts[name] = counts.get(name, 0) + 1
    top = {k[:60]: [round(v, 4), counts[k] // reps] for k, v in per_name(events, reps).items()}
    return len(events) / reps, sum(ms for _, ms in events) / reps, top


def timed_ms(step, steps: int) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def run_model(layers: int, variant: str, args, bw: float, rows: list) -> None:
    pipeline = variant_setup(variant)
    cfg = KimiLinearConfig.from_dict(slice_dict("kimi-linear-48b-a3b", layers))
    model = kimi_graph.load(cfg, dtype=torch.bfloat16, device="cuda", pipeline=pipeline, backend="triton",
                            **({"experts": args.experts} if args.experts else {}))
    expert_elem = routed_expert_bytes(model)
    for B in args.batches:
        row = {"layers": layers, "variant": variant, "B": B, "experts": args.experts or "bf16",
               "floor_ms": floor_bytes(cfg, B, args.context, expert_elem=expert_elem)["total"] / bw * 1e3}
        for graphs in (False, True):
            engine = Engine(model, max_batch=B, max_len=args.context + args.steps + 32, cuda_graphs=graphs)
            slots = engine.cache.allocate(B)
            engine.fill_context(slots, args.context)
            step = decode_step_fn(engine, slots)
            key = "graph" if graphs else "eager"
            n, kms, top = profile_step(step, 3 if graphs else 2)
            row[f"kernels_{key}"], row[f"kernel_ms_{key}"] = n, kms
            if graphs:
                row["ms"] = timed_ms(step, args.steps)
                row["floor_frac"] = row["floor_ms"] / row["ms"]
                row["kernels_per_step"] = top
            engine.cache.free(slots)
            del engine, step
            gc.collect()
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


# tile variants of the direct MoE kernels, swept in pairs (gate_up i with down i); each kernel's
# best is chosen apart by its own kernel time: gate_up (BN, BK, num_warps), down (BND, BKD, warps_down)
# (the H200 tuning file's bests first: a sweep cut with --sweep-tiles still meets them)
GATE_UP_TILES = [(4, 1024, 2), (8, 256, 2), (8, 512, 4), (16, 256, 4), (8, 512, 2), (4, 512, 4), (16, 512, 4),
                 (32, 256, 8), (8, 1024, 4), (8, 512, 8), (8, 256, 4)]
DOWN_TILES = [(8, 512, 2), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (8, 1024, 2), (4, 1024, 4), (16, 512, 4),
              (32, 256, 4), (16, 1024, 4), (4, 512, 2), (8, 256, 4)]


# the bf16 K loops' forms (moe_decode.FORMS): name -> (acc, unroll)
FORMS = {"row": ("row", False), "tile": ("tile", False), "row-unroll": ("row", True), "tile-unroll": ("tile", True)}


def sweep_moe_tiles(bw: float, rows: list, batches=(1, 2, 8), buckets=(2,), shape=(256, 8, 2304, 1024),
                    device="cuda", dtype=torch.bfloat16, forms=("row",), tiles: int | None = None) -> dict:
    """The direct routed + shared experts at each batch size on the published shapes (256
    experts, top-8, D 2304, I 1024) per tile variant, and the grouped path ("grouped"),
    graph-replayed; bw_frac: the distinct experts' bytes over the time, against the copy
    bandwidth; rel_err: against the grouped path's result; gate_up_us, down_us, combine_us: each
    kernel's time (profiler). Returns the best tiles (least summed kernel time over the batches
    of a token bucket, per kernel): the batches above every bound in `buckets` give the base
    tiles, the others their bucket's `token_tiles` entry; merged into this device's tuning file."""
    from harness import bench_graph, kernel_times, merge_tuning, override_config, rel_err
    from kimi_graph.lowering.triton import moe, moe_decode
    from kimi_graph.lowering.triton.targets import config
    E, K, D, I = shape
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g, dtype=dtype) * s[-1] ** -0.5
    w13, w2, shared = r(E, 2 * I, D), r(E, D, I), (r(I, D), r(I, D), r(D, I))
    base = config("moe_decode")
    bucketing = {"token_tiles": [[b, {}] for b in sorted(buckets)]}
    score_gu: dict = {}                 # (bucket, tile) -> summed kernel us
    score_down: dict = {}
    for B in batches:
        bucket = moe_decode.bucket_of(bucketing, B)
        x = r(B, D)
        ids = torch.stack([torch.randperm(E, device=device, generator=g)[:K] for _ in range(B)])
        w = torch.rand(B, K, device=device, generator=g)
        nbytes = (len(ids.unique()) + 1) * 3 * D * I * w13.element_size()
        ref = moe.moe_experts(x, ids, w, w13, w2, moe_decode.shared_swiglu(x, *shared)).float()
        pairs = list(zip(GATE_UP_TILES, DOWN_TILES))[:tiles]
        for gu, dn in [(g_ + (f,), d_ + (f,)) for f in forms for g_, d_ in pairs] + [(None, None)]:
            if gu is None:              # the grouped path (permutation) with the shared expert in torch
                run, name = lambda: moe.moe_experts(x, ids, w, w13, w2, moe_decode.shared_swiglu(x, *shared)), "grouped"
            else:
                acc, unroll = FORMS[gu[3]]
                override_config("moe_decode", BN=gu[0], BK=gu[1], num_warps=gu[2], BND=dn[0], BKD=dn[1],
                                warps_down=dn[2], token_tiles=[], acc=acc, unroll=unroll)
                run = lambda: moe_decode.direct(x, ids, w, w13, w2, None, shared)
                name = "gu {}/{}/w{} down {}/{}/w{} {}".format(*gu[:3], *dn[:3], gu[3])
            ms = bench_graph(run)
            row = {"B": B, "bucket": bucket or "base", "tiles": name, "us": ms * 1e3,
                   "bw_frac": nbytes / (ms * 1e-3) / bw}
            if gu is not None:
                row["rel_err"] = rel_err(run(), ref)       # against the grouped path (bf16 rounding apart)
                kt = kernel_times(run, 5)
                row.update({f"{k}_us": kt.get(kernel, 0.0) * 1e3 for k, kernel in
                            (("gate_up", "moe_decode_gate_up"), ("down", "moe_decode_down"), ("combine", "moe_unpermute"))})
                score_gu[bucket, gu] = score_gu.get((bucket, gu), 0.0) + row["gate_up_us"]
                score_down[bucket, dn] = score_down.get((bucket, dn), 0.0) + row["down_us"]
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    override_config("moe_decode", **base)

    def best_of(bucket):
        gu = min((t for b, t in score_gu if b == bucket), key=lambda t: score_gu[bucket, t])
        dn = min((t for b, t in score_down if b == bucket), key=lambda t: score_down[bucket, t])
        best = dict(zip(("BN", "BK", "num_warps", "BND", "BKD", "warps_down"), gu[:3] + dn[:3]))
        if gu[3] != dn[3]:              # the forms are one pair of keys for both kernels: the gate/up's wins
            print(f"moe_decode forms: gate_up best {gu[3]}, down best {dn[3]}; taking {gu[3]}", flush=True)
        return {**best, **dict(zip(("acc", "unroll"), FORMS[gu[3]]))}
    swept = {b for b, _ in score_gu}
    best = best_of(None) if None in swept else {k: base[k] for k in moe_decode.TILE_KEYS if k != "num_stages"}
    best["token_tiles"] = [[b, best_of(b)] for b in sorted(buckets) if b in swept]
    print(f"best moe_decode tiles (least kernel time summed over the batches of each token bucket): {best}", flush=True)
    merge_tuning("moe_decode", best, "bench/decode_step.py: best of the swept direct MoE tiles (per kernel, "
                 f"per token bucket; batches {', '.join(map(str, batches))})")
    return best


def choose_pdl(rows: list) -> None:
    """Dependent launches into this device's tuning file when they made every measured step
    faster than the same kernels launched plainly."""
    from harness import merge_tuning
    ms = {(r["layers"], r["B"], r["variant"]): r["ms"] for r in rows if "ms" in r}
    pairs = [(ms[k[:2] + ("pdl",)], v) for k, v in ms.items() if k[2] == "fused" and k[:2] + ("pdl",) in ms]
    faster = bool(pairs) and all(p < f for p, f in pairs)
    merge_tuning("launch", {"pdl": faster}, "bench/decode_step.py: dependent launches when faster at every size")
    print(f"dependent launches {'on' if faster else 'off'}: (pdl ms, plain ms) {pairs}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="4,27", help="published-width slices (27: the whole model; '': the sweep "
                    "alone)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default="fused,previous", help=f"any of {', '.join(VARIANTS)} (pdl: fused, "
                    "with dependent launches)")
    ap.add_argument("--name", default="decode_step")
    ap.add_argument("--experts", default=None, choices=("int4", "int8", "fp8"),
                    help="low-bit routed experts (load's experts=; the floor counts their bytes)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the direct MoE kernels' tile sweep")
    ap.add_argument("--use-best", action="store_true", help="run the models with the sweep's best tiles "
                    "(else the target's defaults)")
    ap.add_argument("--sweep-batches", default="1,2,8", help="batch sizes of the direct MoE tile sweep")
    ap.add_argument("--token-buckets", default="2", help="moe_decode token_tiles bounds the sweep picks tiles for "
                    "(batches above every bound pick the base tiles)")
    ap.add_argument("--forms", default="row", help=f"the bf16 K loops' forms the sweep tries (any of "
                    f"{', '.join(FORMS)})")
    ap.add_argument("--sweep-tiles", type=int, default=None, help="the first N tile pairs only")
    a = ap.parse_args(argv)
    for v in a.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if "forms-best" in a.variants.split(","):
        VARIANTS["forms-best"] = forms_best()
    a.batches = [int(b) for b in a.batches.split(",")]
    bw = copy_bandwidth()
    rows: list = []
    tiles: list = []
    forms = a.forms.split(",")
    if set(forms) - set(FORMS):
        ap.error(f"unknown forms {sorted(set(forms) - set(FORMS))}; known: {', '.join(FORMS)}")
    best = {} if a.no_sweep else sweep_moe_tiles(bw, tiles, [int(b) for b in a.sweep_batches.split(",")],
                                                [int(b) for b in a.token_buckets.split(",") if b], forms=forms,
                                                tiles=a.sweep_tiles)
    extra = {"copy_tb_s": bw / 1e12, "context": a.context, "moe_decode_tiles": tiles, "moe_decode_best": best}
    if tiles:                               # the sweep's rows kept even when no model runs after it
        write_result(a.name, rows, extra)
    if best and a.use_best:                 # the whole-model runs with the sweep's best tiles
        from harness import override_config
        override_config("moe_decode", **best)
    for layers in [int(n) for n in a.layers.split(",") if n]:
        for variant in a.variants.split(","):
            try:
                run_model(layers, variant, a, bw, rows)
            except Exception as e:          # noqa: BLE001 (the other models still run; the error is kept)
                rows.append({"layers": layers, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
                print(rows[-1], flush=True)
                gc.collect()
                torch.cuda.empty_cache()
            write_result(a.name, rows, extra)
    if a.use_best and {"fused", "pdl"} <= set(a.variants.split(",")):
        choose_pdl(rows)
    keys = ("layers", "variant", "B", "kernels_eager", "kernels_graph", "kernel_ms_eager", "kernel_ms_graph", "ms",
            "floor_ms", "floor_frac")
    print("\nsummary (kernels and kernel ms per step; ms per step graph-replayed; floor at the copy bandwidth)")
    print("  ".join(f"{k[:14]:>14}" for k in keys))
    for r in rows:
        print("  ".join(f"{(f'{v:.3f}' if isinstance(v, float) else str(v))[:14]:>14}" for v in
                        (r.get(k, "-") for k in keys)))


if __name__ == "__main__":
    main()
