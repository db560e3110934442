"""MoE grouped SwiGLU on the published shapes (D=2304 -> I=1024, 256 experts, top-8), bf16.

    python bench/moe_swiglu.py      # 8k tokens: FLOP rate against the bf16 GEMM rate measured in
        # the same run; 1-16 tokens: bytes of the expert weights read against the copy bandwidth;
        # baseline: torch per-expert F.linear loop over the same packed rows
    python bench/moe_swiglu.py --sweep --budget 100 [--write-tuning]
        # prefill: the fused grouped GEMMs (gate_up + down, rows read by index) at 4k, 16k, 32k
        # tokens for each variant of "moe_gemm" keys in SWEEP: ms, TFLOP/s, against the current
        # tiles and cuBLAS on dense GEMMs of the same shapes and FLOPs, rel err against fp32 on a
        # few experts' rows; the best per tile class ("mid": 4k, "large": 16k + 32k) into this
        # device's tuning file
    TRITON_INTERPRET=1 python bench/moe_swiglu.py --sweep --smoke     # CPU: tiny shapes, wall clock
    python bench/moe_swiglu.py --compile-variants     # no GPU: each variant built for sm_90"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from harness import bench, bench_graph, copy_bandwidth, gemm_rate, merge_tuning, override_config, rel_err, \
    write_result

from kimi_graph.lowering.triton import moe, moe_permute, moe_route
from kimi_graph.lowering.triton.targets import TARGETS, TUNING_ENV

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


# "moe_gemm" variants for prefill, each applied to the tile class of every size it is timed at;
# unset keys keep the current tiles. The likely-safe first, warp specialization last
SWEEP = {
    "current": {},
    "host_half": {"tma": "host", "half": True},
    "host_half_s4": {"tma": "host", "half": True, "num_stages": 4, "num_stages_down": 4},
    "host_half_down256": {"tma": "host", "half": True, "BN_down": 256},
    "half": {"half": True},
    "host": {"tma": "host"},
    "stages4": {"num_stages": 4, "num_stages_down": 4},
    "device_half": {"tma": "device", "half": True},
    "host_half_down256_s4": {"tma": "host", "half": True, "BN_down": 256, "num_stages": 4, "num_stages_down": 4},
    "bm64_w4_host": {"BM": 64, "num_warps": 4, "num_warps_down": 4, "tma": "host", "num_stages": 4,
                     "num_stages_down": 4},
    "bm256_bn64_host_half": {"BM": 256, "BN": 64, "BN_down": 128, "tma": "host", "half": True},
    "host_half2": {"tma": "host", "half": 2},
    "host_half_bn64_w4": {"tma": "host", "half": True, "BN": 64, "num_warps": 4, "num_warps_down": 4},
    "host_half_bk128": {"tma": "host", "half": True, "BK": 128, "num_stages": 2, "BK_down": 128,
                        "num_stages_down": 3},
    "host_persist": {"tma": "host", "persistent": 1},
    "host_persist_s4": {"tma": "host", "persistent": 1, "num_stages": 4, "num_stages_down": 4},
    "host_bn64_w4_persist2": {"tma": "host", "persistent": 2, "BN": 64, "num_warps": 4, "num_warps_down": 4},
    "host_persist_ws": {"tma": "host", "persistent": 1, "ws": True},
    "host_half_pdown": {"tma": "host", "half": True, "persistent_down": 1},
    "host_half_pdown_s4": {"tma": "host", "half": True, "persistent_down": 1, "num_stages_down": 4},
    "host_half_ws": {"tma": "host", "half": True, "ws": True},
    "device_half_ws": {"tma": "device", "half": True, "ws": True},
}
KEYS = ("BM", "BN", "BK", "num_warps", "num_stages", "BN_down", "BK_down", "num_warps_down", "num_stages_down",
        "tma", "half", "ws", "persistent", "persistent_down")
SFX = {"mid": "_mid", "large": ""}
TOL = 2e-2              # bf16 products against fp32 (measured ~4e-3)


def variant_tiles(current: dict, over: dict) -> dict:
    """A class's tiles under a variant: `persistent` reaches the down GEMM too unless it says otherwise."""
    tiles = {**current, **over}
    if "persistent" in over and "persistent_down" not in over:
        tiles["persistent_down"] = over["persistent"]
    return tiles


def sweep_case(N, g, E, K, D, dev, dt):
    """Routed inputs for N tokens (router on random weights, as a prefill layer) and their sort."""
    x = torch.randn(N, D, device=dev, generator=g).to(dt)
    gate = (torch.randn(E, D, device=dev, generator=g) * D ** -0.5).to(dt)
    ids, _ = moe_route.moe_route(x, gate, torch.randn(E, device=dev, generator=g) * 0.01, top_k=K, n_group=1,
                                 topk_group=1, renormalize=True, scaling=2.446, weights="official")
    off, order = moe_permute.moe_sort(ids, E)
    return x, ids, off, order


def reference_rows(x, off, order, w13, w2, K, checked):
    """fp32 (no TF32) SwiGLU of the first `checked` experts' rows: (their slots, values)."""
    I, out, slots = w2.shape[2], [], []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    for e in range(checked):
        o = order[off[e]:off[e + 1]]
        gu = F.linear(x[o // K].float(), w13[e].float())
        out.append(F.linear(F.silu(gu[:, :I]) * gu[:, I:], w2[e].float()))
        slots.append(o)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.cat(slots), torch.cat(out)


def sweep(tokens, budget, smoke=False, names=None):
    """Time the fused grouped GEMMs for each SWEEP variant at each token count (no variant starts
    after `budget` s) over the target's own tiles (a tuning file's are set aside: it would override
    the variants); -> (rows, best variant per class, the config with the winners)."""
    dev, dt = ("cpu", torch.float32) if smoke else ("cuda", torch.bfloat16)
    E_, K_, D_, I_ = (4, 4, 64, 32) if smoke else (E, K, D, I)
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = (torch.randn(E_, 2 * I_, D_, device=dev, generator=g) * D_ ** -0.5).to(dt)
    w2 = (torch.randn(E_, D_, I_, device=dev, generator=g) * I_ ** -0.5).to(dt)
    target = moe.current_target()
    os.environ.pop(TUNING_ENV, None)         # a tuning file's moe_gemm keys would override the variants
    held = TARGETS[target]["configs"]["moe_gemm"]
    base = dict(held)
    current = {size: moe.gemm_tiles(size, target) for size in SFX}
    cases = {}
    for N in tokens:
        x, ids, off, order = sweep_case(N, g, E_, K_, D_, dev, dt)
        size = moe.gemm_size(ids.numel(), E_, target)
        if size not in SFX:
            raise ValueError(f"{N} tokens take the {size!r} tiles: not a prefill size")
        M, flops = ids.numel(), 6.0 * ids.numel() * D_ * I_
        a, hh = torch.randn(M, D_, device=dev).to(dt), torch.randn(M, I_, device=dev).to(dt)
        t = (lambda fn: (lambda s: (fn(), (time.perf_counter() - s) * 1e3)[1])(time.perf_counter())) if smoke else bench
        dense = t(lambda: a @ w13[0].T) + t(lambda: hh @ w2[0].T)
        cases[N] = (x, off, order, M, size, flops, dense, reference_rows(x, off, order, w13, w2, K_, min(8, E_)), t)
    names = ["current"] + [n for n in names or SWEEP if n != "current"]       # the reference, first
    unknown = [n for n in names if n not in SWEEP]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(SWEEP)}")
    rows, t0 = [], time.monotonic()
    for name in names:
        if budget and time.monotonic() - t0 > budget:
            print("over the time budget, not run:", name)
            continue
        for N, (x, off, order, M, size, flops, dense, (slots, ref), t) in cases.items():
            tiles = variant_tiles(current[size], SWEEP[name])
            held.clear()
            override_config("moe_gemm", **{**base, **{k + SFX[size]: tiles[k] for k in KEYS}})
            run = lambda: moe._swiglu_launch(x, off, w13, w2, M, order, K_)
            try:
                err = rel_err(run()[slots], ref)
                ms = t(run)
            except Exception as e:         # a variant this GPU or Triton cannot build: reported, the rest run
                print(f"{name} at {N} tokens: {type(e).__name__}: {str(e)[:200]}", flush=True)
                rows.append({"variant": name, "tokens": N, "class": size, "ms": float("inf"), "err": float("nan"),
                             "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                break
            rows.append({"variant": name, "tokens": N, "class": size, "ms": ms, "TFLOPs": flops / ms / 1e9,
                         "vs_current": None, "vs_dense": dense / ms, "err": err, "ok": err <= TOL,
                         "tiles": {k: tiles[k] for k in KEYS}})
            print(f"{name:>24} {N:>6} tok  {ms:8.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  dense cuBLAS "
                  f"{dense:.3f} ms ({dense / ms:.2f}x)  err {err:.2g}", flush=True)
    held.clear()
    override_config("moe_gemm", **base)
    ref_ms = {r["tokens"]: r["ms"] for r in rows if r["variant"] == "current"}
    for r in rows:
        if r["tokens"] in ref_ms and "TFLOPs" in r:
            r["vs_current"] = ref_ms[r["tokens"]] / r["ms"]
    best, cfg = {}, dict(base)
    for size in SFX:
        sizes = {N for N, c in cases.items() if c[4] == size}
        total: dict = {}
        for r in rows:
            if r["tokens"] in sizes:
                ok, ms, n = total.get(r["variant"], (True, 0.0, 0))
                total[r["variant"]] = (ok and r["ok"], ms + r["ms"], n + 1)
        fit = {v: ms for v, (ok, ms, n) in total.items() if ok and n == len(sizes)}
        if fit:
            best[size] = min(fit, key=fit.get)
            tiles = variant_tiles(current[size], SWEEP[best[size]])
            cfg.update({k + SFX[size]: tiles[k] for k in KEYS})
    return rows, best, cfg


def compile_variants(names=None, target="sm_90"):
    """Each SWEEP variant's two fused GEMM kernels ("large" tiles, rows by index, aligned tensors)
    built for `target` without a GPU: registers a thread, spilled bytes, shared memory, or the
    error that stops the build, so a variant that cannot build or spills is seen before a GPU run."""
    import re
    import subprocess
    import tempfile

    import triton
    from kimi_graph.lowering.triton.aot import compile_spec
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    held = TARGETS[target]["configs"]["moe_gemm"]
    base, rows = dict(held), []
    try:
        for name in names or SWEEP:
            held.update({**base, **SWEEP[name]})
            moe.gemm_specs.cache_clear()
            for sp in moe.gemm_specs(E, I, D, "bf16", "large", target, True, K, True)[1:]:
                row = {"variant": name, "kernel": sp.name, "warps": sp.num_warps, "stages": sp.num_stages}
                try:
                    ck = compile_spec(sp, target)
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(ck.asm["cubin"])
                        f.flush()
                        use = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                             text=True).stdout
                    reg, stack = (re.search(rf"{k}:(\d+)", use) for k in ("REG", "STACK"))
                    row.update(regs=int(reg[1]) if reg else None, spill_bytes=int(stack[1]) if stack else None,
                               shared_kb=ck.metadata.shared / 1024)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}"
                rows.append(row)
                print(row, flush=True)
            held.clear()
            held.update(base)
    finally:
        held.clear()
        held.update(base)
        moe.gemm_specs.cache_clear()
    return rows


def sweep_main(args):
    tokens = [int(n) for n in args.tokens.split(",")] if not args.smoke else [70, 260]     # mid, large
    names = args.variants.split(",") if args.variants else ["current", "host_half"] if args.smoke else None
    rows, best, cfg = sweep(tokens, args.budget, args.smoke, names)
    print(f"\n{'variant':>24} {'tokens':>6} {'ms':>8} {'TFLOP/s':>8} {'vs cur':>7} {'vs dense':>8} {'err':>8}")
    for r in rows:
        if "TFLOPs" in r:
            print(f"{r['variant']:>24} {r['tokens']:>6} {r['ms']:8.3f} {r['TFLOPs']:8.0f} {r['vs_current'] or 0:7.3f} "
                  f"{r['vs_dense']:8.3f} {r['err']:8.2g}{'' if r['ok'] else '  (err over ' + str(TOL) + ')'}")
    for size, name in best.items():
        print(f"best {size} tiles: {name} {SWEEP[name]}")
    if args.smoke:
        return
    write_result(args.result, [{k: v for k, v in r.items() if k != "tiles"} for r in rows],
                 {"best": best, "config": cfg, "variants": SWEEP, "shape": f"E={E}, top-{K}, D={D}, I={I}, bf16"})
    if args.write_tuning and best:
        merge_tuning("moe_gemm", cfg, "bench/moe_swiglu.py --sweep: best grouped GEMM variant per class ("
                     + ", ".join(f"{s} {n}" for s, n in best.items()) + f") at {args.tokens} tokens")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="prefill variants of the grouped GEMMs (SWEEP)")
    ap.add_argument("--tokens", default="4096,16384,32768", help="token counts the sweep times (top-8 copies each)")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds after which no variant starts (0: none)")
    ap.add_argument("--write-tuning", action="store_true", help="the best per class into the tuning file")
    ap.add_argument("--variants", default="", help="comma-separated SWEEP names (default: all, in order)")
    ap.add_argument("--result", default="moe_gemm_sweep", help="name of the JSON in bench/results")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1), wall clock")
    ap.add_argument("--compile-variants", action="store_true",
                    help="build each SWEEP variant for sm_90 without a GPU: registers, spills, shared memory")
    args = ap.parse_args()
    compile_variants(args.variants.split(",") if args.variants else None) if args.compile_variants else sweep_main(args) if args.sweep else main()
