"""Causal flash attention for prefill (mla.causal_attention) on a GPU: MLA's shapes (H=32, qk dim
192 = 128 nope + 64 rope, v dim 128, bf16), B=1 at T = 4k, 16k, 64k and 32 sequences of 1k,
keys and values laid out as the model makes them (k a concatenation, v a slice of kv_b's output).
Each variant (generated kernel forms and tiles: VARIANTS, over the target's "attention" config)
is checked against a float64 reference (first HEADS_CHECKED heads of every timed shape, and a
ragged continuation batch) and timed; TFLOP/s count the causal half (the key-query pairs a
query sees), against the bf16 cuBLAS GEMM rate measured in the same run. "before" is the
previous kernel (bench/attention_before.py: one masked loop over all key blocks, forward block
order, BM 128 x BN 64, 8 warps, 3 stages).

    python bench/attention.py                         # DEFAULT_VARIANTS, every shape: attention.json
    python bench/attention.py --variants all          # every variant in VARIANTS
    python bench/attention.py --shapes 16k,32x1k --variants base,before
    python bench/attention.py --write-tuning          # also the best (sum over --tune-shapes) into
                                                      # this GPU's tuning file
    TRITON_INTERPRET=1 python bench/attention.py --smoke   # CPU: each variant on tiny fp32 shapes
"""
from __future__ import annotations

import argparse
import contextlib
import io
import time

import torch

from harness import bench, gemm_rate, merge_tuning, override_config, rel_err, write_result

import attention_before
from kimi_graph.lowering.triton import mla

H, D, DV, NOPE = 32, 192, 128, 128
SCALE = D ** -0.5
SHAPES = {"4k": (1, 4096), "16k": (1, 16384), "64k": (1, 65536), "32x1k": (32, 1024)}
HEADS_CHECKED = 4
DEV = "cuda"
TOL = 2e-2              # bf16 inputs and p, fp32 softmax statistics and accumulation
TUNED_KEYS = ("BM", "BN", "num_warps", "num_stages", "split", "order", "fold_scale", "lazy_rescale", "tma",
              "overlap", "maxnreg")

# name -> keys over the target's config ("base": the target's own)
VARIANTS = {
    "base": {},
    "before": {},           # bench/attention_before.py: the previous kernel at its own tiles
    "forward": {"order": "forward"},
    "one-loop": {"split": False},
    "one-loop-forward": {"split": False, "order": "forward"},   # the previous form in today's kernel
    "fold": {"fold_scale": True},
    "lazy8": {"lazy_rescale": 8.0},
    "bm128-bn64-w8-s3": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3},
    "bm128-bn64-w8-s2": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 2},
    "bm128-bn64-w8-s4": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 4},
    "bm128-bn128-w8-s2": {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 2},
    "bm128-bn32-w4-s3": {"BM": 128, "BN": 32, "num_warps": 4, "num_stages": 3},
    "bm128-bn64-w4-s3": {"BM": 128, "BN": 64, "num_warps": 4, "num_stages": 3},
    "bm64-bn64-w4-s3": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
    "bm64-bn128-w4-s2": {"BM": 64, "BN": 128, "num_warps": 4, "num_stages": 2},
    "bm256-bn64-w8-s2": {"BM": 256, "BN": 64, "num_warps": 8, "num_stages": 2},
    "tma": {"tma": True},
    "tma-bm128-bn128-w8-s2": {"tma": True, "BM": 128, "BN": 128, "num_warps": 8, "num_stages": 2},
    "tma-bm128-bn64-w8-s4": {"tma": True, "BM": 128, "BN": 64, "num_warps": 8, "num_stages": 4},
    "tma-bm64-bn64-w4-s3": {"tma": True, "BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3},
    "tma-fold-lazy8": {"tma": True, "fold_scale": True, "lazy_rescale": 8.0},
    "overlap": {"overlap": True},
    "tma-overlap": {"tma": True, "overlap": True},
    "overlap-s4": {"overlap": True, "num_stages": 4},
    # BM 128 on 8 warps in <= 128 registers and <= 114 KB (BN 32; TMA, or a register cap): two
    # programs an SM
    "tma-bn32-s3": {"tma": True, "BN": 32, "num_stages": 3},
    "tma-bn32-s2": {"tma": True, "BN": 32, "num_stages": 2},
    "bn32-s3-r128": {"BN": 32, "num_stages": 3, "maxnreg": 128},
    "overlap-bn32-s3-r128": {"overlap": True, "BN": 32, "num_stages": 3, "maxnreg": 128},
    "tma-overlap-bn32-s3": {"tma": True, "overlap": True, "BN": 32, "num_stages": 3},
    "overlap-bn128-s2": {"overlap": True, "BN": 128, "num_stages": 2},
    "overlap-bn32-s4": {"overlap": True, "BN": 32, "num_stages": 4},
    "tma-overlap-bm64-bn64-w4-s2": {"tma": True, "overlap": True, "BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    # two programs an SM (shared memory <= 114 KB, 4 warps): one's softmax beside the other's MMAs
    "tma-bm64-bn64-w4-s2": {"tma": True, "BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    "tma-bm64-bn32-w4-s3": {"tma": True, "BM": 64, "BN": 32, "num_warps": 4, "num_stages": 3},
    "tma-bm64-bn32-w4-s2": {"tma": True, "BM": 64, "BN": 32, "num_warps": 4, "num_stages": 2},
    "bm64-bn64-w4-s2": {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 2},
    "bm128-bn64-w8-s3-fold-lazy8": {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3, "fold_scale": True,
                                    "lazy_rescale": 8.0},
    "bm128-bn128-w8-s2-fold-lazy8": {"BM": 128, "BN": 128, "num_warps": 8, "num_stages": 2, "fold_scale": True,
                                     "lazy_rescale": 8.0},
}

# the default run: the previous kernel, the target's config, then the forms not yet measured on an
# H200 (23:42: the loop split and heavy-first order 1.23x at 16k; tma, fold, lazy no gain there)
DEFAULT_VARIANTS = ("base", "before", "tma-bn32-s3", "tma-overlap-bn32-s3", "bn32-s3-r128", "overlap-bn32-s3-r128",
                    "overlap", "tma-overlap", "tma-bn32-s2", "overlap-s4", "overlap-bn32-s4", "tma-bm64-bn64-w4-s2",
                    "tma-overlap-bm64-bn64-w4-s2", "tma-bm64-bn32-w4-s3", "tma-bm64-bn32-w4-s2", "bm64-bn64-w4-s2",
                    "overlap-bn128-s2")


def inputs(B, T, S=None, dtype=torch.bfloat16, device=None, seed=0):
    """q [B,T,H,D]; k = nope ‖ a rope key shared by the heads [B,S,H,D] (contiguous, as the
    graph's concat makes it); v a slice of kv [B,S,H,NOPE+DV] (strided, as the graph reads it)."""
    S, device = S or T, device or DEV
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g, dtype=torch.float32).to(dtype)
    kv = r(B, S, H, NOPE + DV)
    rope = r(B, S, 1, D - NOPE)
    k = torch.cat([kv[..., :NOPE], rope.expand(B, S, H, D - NOPE)], -1)
    return r(B, T, H, D), k, kv[..., NOPE:]


def reference(q, k, v, q_start=None, chunk=1024):
    """float64 causal attention of the first HEADS_CHECKED heads [B,T,heads,DV], query chunk by chunk
    (only the keys a chunk can see): written here, apart from the op library."""
    B, T = q.shape[:2]
    S, heads = k.shape[1], HEADS_CHECKED
    qs = torch.full((B,), S - T, dtype=torch.long) if q_start is None else q_start.cpu()
    out = torch.empty(B, T, heads, v.shape[-1], dtype=torch.float64, device=q.device)
    for b in range(B):
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            end = min(S, int(qs[b]) + c1)
            qc = q[b, c0:c1, :heads].double().transpose(0, 1)                       # [h, c, D]
            kc, vc = (x[b, :end, :heads].double().transpose(0, 1) for x in (k, v))  # [h, end, *]
            s = qc @ kc.transpose(1, 2) * SCALE
            pos = int(qs[b]) + torch.arange(c0, c1, device=q.device)
            s = s.masked_fill(torch.arange(end, device=q.device)[None, :] > pos[:, None], float("-inf"))
            out[b, c0:c1] = (torch.softmax(s, -1) @ vc).transpose(0, 1)
    return out


def causal_flops(B, T, S=None, q_start=None):
    """FLOPs of the key-query pairs the queries see: 2 (D + DV) H per pair."""
    S = S or T
    starts = [S - T] * B if q_start is None else [int(x) for x in q_start]
    pairs = sum(min(S, s + t + 1) for s in starts for t in range(T)) if q_start is not None \
        else B * (T * (S - T) + T * (T + 1) // 2)
    return 2.0 * (D + DV) * H * pairs


def set_variant(base: dict, keys: dict) -> None:
    override_config("attention", **{**base, **keys})


def kernel(name: str):
    return attention_before.causal_attention if name == "before" else mla.causal_attention


def run(names, shapes, gemm, budget=0.0, save=lambda rows: None):
    """Rows of (variant, shape): ms, TFLOP/s (causal), fraction of the GEMM rate, error; no
    variant starts after `budget` seconds (0: no limit); save(rows) after each variant."""
    t0 = time.monotonic()
    from kimi_graph.lowering.triton.targets import config
    base = {k: v for k, v in config("attention").items()}
    cases = {s: inputs(*SHAPES[s], seed=i) for i, s in enumerate(shapes)}
    refs = {s: reference(*cases[s]) for s in shapes}
    # a ragged continuation batch: each sequence's T new queries after q_start cached keys; T and S
    # multiples of 16 (the JIT's specialisation of the timed shapes: one compile a variant) but of
    # no tile from 32 up
    rq, rk, rv = inputs(3, 784, S=1520, seed=9)
    rqs = torch.tensor([736, 0, 300], device=DEV)
    rref = reference(rq, rk, rv, rqs)
    rows = []
    for name in names:
        if budget and time.monotonic() - t0 > budget:
            print("over the time budget, not run:", name)
            continue
        set_variant(base, VARIANTS[name])
        attn = kernel(name)
        try:
            err_ragged = rel_err(attn(rq, rk, rv, rqs, scale=SCALE)[:, :, :HEADS_CHECKED], rref)
        except Exception as e:      # a variant that does not build or fit: reported, the rest run
            print(f"{name}: {type(e).__name__}: {str(e)[:160]}")
            rows.append({"variant": name, "shape": "-", "error": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        for s in shapes:
            q, k, v = cases[s]
            fn = lambda: attn(q, k, v, scale=SCALE)
            err = rel_err(fn()[:, :, :HEADS_CHECKED], refs[s])
            ms = bench(fn, rep=400 if SHAPES[s][1] > 16384 else 100)     # 64k: ~4 calls, not 1
            tf = causal_flops(*SHAPES[s]) / (ms * 1e-3)
            rows.append({"variant": name, "shape": s, "ms": ms, "TFLOPs": tf / 1e12, "of_gemm": tf / gemm,
                         "err": err, "err_ragged": err_ragged, "ok": max(err, err_ragged) <= TOL})
            print(rows[-1], flush=True)
        save(rows)
    set_variant(base, {})
    return rows, base


def best_variant(rows, shapes):
    """The variant with the least summed ms over `shapes`, among those within TOL at all of them
    (not "before": no config of today's kernel)."""
    sums: dict = {}
    for r in rows:
        if r.get("shape") in shapes and "ms" in r and r["variant"] != "before":
            ok, t, n = sums.get(r["variant"], (True, 0.0, 0))
            sums[r["variant"]] = (ok and r["ok"], t + r["ms"], n + 1)
    fit = {v: t for v, (ok, t, n) in sums.items() if ok and n == len(shapes)}
    return min(fit, key=fit.get) if fit else None


def summary(rows, gemm):
    print(f"\n== causal attention prefill, H={H} D={D} DV={DV} bf16 (cuBLAS bf16 GEMM {gemm / 1e12:.0f} TFLOP/s)")
    print(f"{'variant':>30} {'shape':>6} {'ms':>8} {'TFLOP/s':>8} {'of GEMM':>8} {'err':>9} {'ragged':>9}")
    for r in rows:
        if "ms" in r:
            print(f"{r['variant']:>30} {r['shape']:>6} {r['ms']:8.3f} {r['TFLOPs']:8.1f} {r['of_gemm']:8.1%} "
                  f"{r['err']:9.2e} {r['err_ragged']:9.2e}{'' if r['ok'] else '  OVER'}")
        else:
            print(f"{r['variant']:>30}   {r['error']}")
    timed = [r for r in rows if "ms" in r and r["ok"]]
    for shape in dict.fromkeys(r["shape"] for r in timed):
        at = {r["variant"]: r["ms"] for r in timed if r["shape"] == shape}
        fastest = min((v for v in at if v != "before"), key=at.get, default=None)
        if fastest and "before" in at:
            print(f"{shape}: fastest {fastest} {at[fastest]:.3f} ms, before {at['before']:.3f} ms "
                  f"({at['before'] / at[fastest]:.2f}x; 7 MLA layers: {7 * at[fastest]:.1f} vs {7 * at['before']:.1f} ms)")


def smoke(names):
    """Each variant through the CPU interpreter (or the GPU when there is one) on tiny fp32
    shapes against the float64 reference: a ragged continuation and a one-shot prefill."""
    global H, D, DV, NOPE, SCALE, HEADS_CHECKED
    H, D, DV, NOPE, HEADS_CHECKED = 2, 24, 16, 16, 2
    SCALE = D ** -0.5
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    from kimi_graph.lowering.triton.targets import config
    base = dict(config("attention"))
    seen = []
    for name in names:         # the kernel forms (the tiles are the target's: the interpreter's are tiny)
        form = {k: v for k, v in VARIANTS[name].items() if k in ("split", "order", "fold_scale", "lazy_rescale",
                                                                               "tma", "overlap")}
        if form in seen and name != "before":
            continue
        seen.append(form)
        set_variant(base, form)
        for B, T, S, qs in ((2, 21, 40, [19, 3]), (1, 19, 19, None)):
            q, k, v = inputs(B, T, S, torch.float32, dev, seed=T)
            q_start = None if qs is None else torch.tensor(qs, device=dev)
            err = rel_err(kernel(name)(q, k, v, q_start, scale=SCALE), reference(q, k, v, q_start))
            print(f"{name:>30} B={B} T={T} S={S}: err {err:.2e}")
            assert err < 1e-5, f"{name}: err {err:.2e}"
    set_variant(base, {})
    assert causal_flops(1, 4) == 2.0 * (D + DV) * H * 10
    assert causal_flops(2, 3, 5, [2, 0]) == 2.0 * (D + DV) * H * (3 + 4 + 5 + 1 + 2 + 3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="'all' or a comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--write-tuning", action="store_true",
                    help="write the best variant's keys into this GPU's tuning file (bench/results, $OUT)")
    ap.add_argument("--tune-shapes", default="16k,32x1k", help="the shapes whose summed time picks the best")
    ap.add_argument("--name", default="attention")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds after which no new variant starts (0: none)")
    ap.add_argument("--smoke", action="store_true", help="each variant on tiny fp32 shapes (CPU: TRITON_INTERPRET=1)")
    a = ap.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s]
    names = list(VARIANTS) if a.variants == "all" else [v for v in a.variants.split(",") if v]
    tune = [s for s in a.tune_shapes.split(",") if s]
    for s in shapes + tune:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; known: {', '.join(SHAPES)}")
    for v in names:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if a.write_tuning and not set(tune) <= set(shapes):
        ap.error(f"--write-tuning picks by --tune-shapes {tune}: time them (--shapes)")
    if a.smoke:
        return smoke(names)
    gemm = gemm_rate()
    extra = {"gemm_tflops": gemm / 1e12, "shape": f"H={H}, D={D} ({NOPE}+{D - NOPE}), DV={DV}, bf16, q_start 0",
             "flops": "causal half: 2 (D + DV) H per visible key-query pair", "tolerance": TOL}

    def save(rows):         # the rows so far, written quietly (a session timeout keeps them)
        with contextlib.redirect_stdout(io.StringIO()):
            write_result(a.name, rows, extra)
    rows, base = run(names, shapes, gemm, a.budget, save)
    best = best_variant(rows, tune)
    extra.update(base_config=base, best=best, best_on=tune)
    write_result(a.name, rows, extra)
    summary(rows, gemm)
    if best:
        cfg = {k: {**base, **VARIANTS[best]}[k] for k in TUNED_KEYS if k in {**base, **VARIANTS[best]}}
        print(f"best by {'+'.join(tune)}: {best} {cfg}")
        if a.write_tuning:
            path = merge_tuning("attention", cfg, f"bench/attention.py: best of {len(names)} variants by the summed "
                                                 f"time at {'+'.join(tune)} ({best})")
            print("tuning file:", path)


if __name__ == "__main__":
    main()
