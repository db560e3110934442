"""KDA chunk prefill on a GPU, in one run: bf16 error against an fp64 recurrence, then time
against fla-core's chunk_kda with the same fusions (gate, beta sigmoid, q/k L2 norm in the
kernel) and against the previous kernels (bench/kda_chunk_before.py: A/B), with the per-kernel
split; a short table last. H=32, D=128, bf16, initial states everywhere; B=1 at T = 4k, 16k,
64k and packed ragged batches (cu_seqlens) of 8x4k, 64x512, 256x128 (lengths drawn around
the mean, summing to the same total).

    python bench/kda_chunk.py            # check + timing + split (a few minutes with fla's autotune)
    python bench/kda_chunk.py --sweep    # also the tile sweep for this GPU: writes its tuning file
    python bench/kda_chunk.py --sweep-only    # the sweep and its tuning file alone (no fla-core)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import kda_chunk_before as before
import torch
from harness import bench, kernel_times, merge_tuning, override_config, rel_err, write_result

from kimi_graph.lowering.triton import kda
from kimi_graph.lowering.triton.targets import config
from kimi_graph.ops.kda import kda_gate, kda_recurrence
from kimi_graph.ops.norm import l2_normalize

H, D = 32, 128
DEV = "cuda"
TOL = 5e-3
SHAPES = (("4k", [4096]), ("16k", [16384]), ("64k", [65536]), ("8x4k", (8, 4096)), ("64x512", (64, 512)),
          ("256x128", (256, 128)))


def lengths(spec, seed=0):
    """A list of lengths: [T] for B=1, else n ragged lengths (mean L, from L/4 to 7L/4) summing
    to n*L."""
    if isinstance(spec, list):
        return spec
    n, L = spec
    g = torch.Generator().manual_seed(seed)
    lens = (torch.rand(n, generator=g) * 1.5 * L + L / 4).long().clamp(min=1)
    lens[-1] += n * L - int(lens.sum())
    while lens[-1] < 1:                      # keep the total: take from the longest
        i = int(lens[:-1].argmax())
        lens[i] -= 1 - lens[-1]
        lens[-1] = 1
    return lens.tolist()


def inputs(lens, dtype=torch.bfloat16, seed=0):
    """Packed q, k, v, f, b [1, T, H, *], gate parameters, cu_seqlens and initial states."""
    T = sum(lens)
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)
    q, k, v = (r(1, T, H, D).to(dtype) for _ in range(3))
    f = (0.5 * r(1, T, H, D)).to(dtype)
    b = r(1, T, H).to(dtype)
    A_log = torch.log(torch.empty(H, device=DEV).uniform_(1, 16, generator=g))
    dt_bias = torch.log(torch.expm1(torch.empty(H * D, device=DEV).uniform_(1e-3, 0.1, generator=g)))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV, dtype=torch.int32)
    state = 0.1 * r(len(lens), H, D, D)
    return (q, k, v, f, b, A_log, dt_bias), cu, state


def reference(args, state, cu):
    """fp64 token recurrence per packed sequence."""
    q, k, v, f, b, A_log, dt_bias = args
    outs, states = [], []
    A = A_log.view(1, 1, H, 1).double()
    for i in range(len(cu) - 1):
        s, e = int(cu[i]), int(cu[i + 1])
        sl = lambda t: t[:, s:e].double()
        g = kda_gate(sl(f).flatten(2), A, dt_bias.double(), torch.float64)
        o, S = kda_recurrence(l2_normalize(sl(q), 1e-6), l2_normalize(sl(k), 1e-6), sl(v), g,
                              torch.sigmoid(sl(b)), state[i:i + 1].double(), D ** -0.5)
        outs.append(o)
        states.append(S)
    return torch.cat(outs, 1), torch.cat(states, 0)


def fla_fn(args, cu, state):
    from fla.ops.kda import chunk_kda
    q, k, v, f, b, A_log, dt_bias = args
    return lambda: chunk_kda(q, k, v, f, b, scale=D ** -0.5, initial_state=state, output_final_state=True,
                             use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                             use_beta_sigmoid_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                             cu_seqlens=cu.long())


def impls(args, cu, state, with_fla=True):
    """name -> fn() -> (o, state): ours, the previous kernels, fla-core (when importable)."""
    fns = {"ours": lambda: kda.kda_chunk(*args, D ** -0.5, state=state, cu_seqlens=cu),
           "before": lambda: before.kda_chunk(*args, D ** -0.5, state=state, cu_seqlens=cu)}
    if with_fla:
        try:
            import fla.ops.kda  # noqa: F401
            fns["fla"] = fla_fn(args, cu, state)
        except ImportError as e:
            print("fla-core not importable:", e)
    return fns


def check(cases=([1000], [300, 1, 700, 64, 129]), dtype=torch.bfloat16):
    rows = []
    for lens in cases:
        args, cu, state = inputs(lens, dtype, seed=len(lens))
        ro, rs = reference(args, state, cu)
        fns = impls(args, cu, state)
        fns["step"] = lambda: kda.kda_step(*args, D ** -0.5, state=state, cu_seqlens=cu)
        for name, fn in fns.items():
            o, s = fn()
            e_o, e_s = rel_err(o, ro), rel_err(s, rs)
            rows.append({"impl": name, "seqs": len(lens), "T": sum(lens), "err_o": e_o, "err_state": e_s,
                         "ok": max(e_o, e_s) <= TOL})
    return rows


def timing(names=None):
    rows = []
    for name, spec in SHAPES:
        if names and name not in names:
            continue
        lens = lengths(spec)
        args, cu, state = inputs(lens)
        fns = impls(args, cu, state)
        with torch.no_grad():
            outs = {k: fn()[0] for k, fn in fns.items()}
            ms = {k: bench(fn) for k, fn in fns.items()}
        row = {"shape": name, "seqs": len(lens), "T": sum(lens), **{f"{k}_ms": v for k, v in ms.items()}}
        if "fla" in ms:
            row.update(speedup=ms["fla"] / ms["ours"], before_vs_fla=ms["fla"] / ms["before"],
                       diff_vs_fla=rel_err(outs["ours"], outs["fla"]))
        rows.append(row)
        print(row)
        del args, fns, outs
        torch.cuda.empty_cache()
    return rows


def split(shape="16k", with_fla=True):
    """CUDA time per kernel (ms per call) of each implementation at one shape."""
    args, cu, state = inputs(lengths(dict(SHAPES)[shape]))
    rows = []
    for impl, fn in impls(args, cu, state, with_fla).items():
        times = kernel_times(fn)
        for name, ms in list(times.items())[:8]:
            rows.append({"shape": shape, "impl": impl, "kernel": name[:44], "ms": ms})
        rows.append({"shape": shape, "impl": impl, "kernel": "SUM", "ms": sum(times.values())})
    return rows


def conv_timing(shapes=(("16k", 1, 16384), ("32x1k", 32, 1024)), width=4):
    """KDA's q/k/v convs (width 4, SiLU, carried conv states) and the chunk prefill as a model
    prefill runs them: the conv group (one launch, its outputs stored) then kda_chunk, against
    kda_chunk_conv (the convs inside the prep kernel); q, k, v, b read as slices of one fused
    projection [B, T, 3*H*D + 288] as the model's; the fused path's error against the other.
    -> (rows, per-kernel split rows)."""
    from kimi_graph.lowering.triton import conv
    rows, split_rows = [], []
    for name, B, T in shapes:
        C = H * D
        g = torch.Generator(device=DEV).manual_seed(1)
        r = lambda *s: torch.randn(*s, device=DEV, generator=g)
        proj = r(B, T, 3 * C + 2 * D + H).to(torch.bfloat16)
        xs = [proj[..., i * C:(i + 1) * C] for i in range(3)]
        b = proj[..., 3 * C + D:3 * C + D + H]
        f = (0.5 * r(B, T, C)).to(torch.bfloat16)
        ws = [(0.5 * r(C, 1, width)).to(torch.bfloat16) for _ in range(3)]
        cs = [r(B, C, width - 1).to(torch.bfloat16) for _ in range(3)]
        A_log = torch.log(torch.empty(H, device=DEV).uniform_(1, 16, generator=g))
        dt_bias = torch.log(torch.expm1(torch.empty(C, device=DEV).uniform_(1e-3, 0.1, generator=g)))
        st = 0.1 * r(B, H, D, D)

        def unfused():
            outs = conv.causal_conv1d_group(xs, ws, cs, "silu")
            q, k, v = (y.view(B, T, H, D) for y, _ in outs)
            o, s = kda.kda_chunk(q, k, v, f.view(B, T, H, D), b, A_log, dt_bias, D ** -0.5, state=st)
            return o, s, [c for _, c in outs]

        def fused():
            return kda.kda_chunk_conv(xs, ws, cs, f, b, A_log, dt_bias, D ** -0.5, H, state=st)
        with torch.no_grad():
            (ro, rs, rc), (o, s, c) = unfused(), fused()
            row = {"shape": name, "B": B, "T": T, "unfused_ms": bench(unfused), "fused_ms": bench(fused),
                   "conv_ms": bench(lambda: conv.causal_conv1d_group(xs, ws, cs, "silu")),
                   "err_o": rel_err(o, ro), "err_state": rel_err(s, rs),
                   "conv_states_equal": all(torch.equal(a, e) for a, e in zip(c, rc))}
            for form, fn in (("unfused", unfused), ("fused", fused)):
                times = kernel_times(fn)
                split_rows += [{"shape": name, "form": form, "kernel": k[:44], "ms": ms} for k, ms in times.items()]
                split_rows.append({"shape": name, "form": form, "kernel": "SUM", "ms": sum(times.values())})
        row["speedup"] = row["unfused_ms"] / row["fused_ms"]
        rows.append(row)
        print(row)
        del proj, f, xs, b
        torch.cuda.empty_cache()
    return rows, split_rows


# one at a time over the target's config (sm_90 since the 2026-12-01 03:31 sweep: token-parallel
# diagonal blocks, 8 heads a program on 2 warps, column stores; the scan of many programs 128
# columns wide on 8 warps; exp2, beta k G in bf16, prep 4 rows a step, BT=32), the likelier first
# (a time budget may stop the sweep early): each segment's scan beside the next segment's kernels
# (16 chunks: the error check's 42 run in segments too), k G_L/G from the intra kernel (prep's
# second pass gone), the diagonal blocks row by row (lost on 8
# and 4 warps), prep a whole chunk a step (lost), the scan's other tiles, then each kernel's warps
# and tiles, BT 64 and the other layouts
VARIANTS = ({}, {"scan_seg": 128}, {"prep_kg": "intra"}, {"scan_seg": 64}, {"scan_seg": 256}, {"scan_seg": 16},
            {"diag": "block", "diag_form": "rows", "diag_warps": 2}, {"BH": 16}, {"diag_warps": 1},
            {"scan_many": 1024, "BV_many": 64, "warps_many": 8}, {"scan_many": 4096}, {"scan_many": 512},
            {"prep_kg": "inline"}, {"scan_ks": 64}, {"diag": "intra", "intra_warps": 4},
            {"diag": "block", "diag_warps": 8}, {"diag": "block", "diag_form": "rows", "diag_warps": 4},
            {"diag": "intra", "diag_form": "rows", "intra_warps": 4}, {"diag": "prep", "diag_form": "rows"},
            {"diag_store": "row"}, {"prep_rows": 2}, {"prep_rows": 8}, {"bkg_fp32": True}, {"ftz_exp": False},
            {"prep_kg": "prepass"}, {"intra_warps": 4}, {"wu": "split"}, {"KH": 64}, {"BW": 64}, {"prep_warps": 8},
            {"BV": 16}, {"BV": 64}, {"num_warps": 8}, {"num_stages": 3}, {"BT": 64}, {"diag": "levels"})
TUNED_KEYS = ("BT", "BC", "BV", "KH", "BW", "BH", "diag", "diag_unroll", "diag_store", "wu", "num_warps", "num_stages",
              "prep_warps", "prep_rows", "prep_kg", "bkg_fp32", "ftz_exp", "diag_warps", "intra_warps", "intra_stages",
              "wu_warps", "wu_stages", "diag_form", "scan_ks", "scan_many", "BV_many", "warps_many", "scan_seg",
              "scan_seg_min", "BV_seg", "warps_seg", "stages_seg")


def sweep(shapes=("16k", "64x512"), budget=0.0, keys=(), variants=VARIANTS):
    """Tile variants of ours, one at a time over the target's config, then the variants that
    beat it merged greedily; the best by the sum of the times at `shapes` among those within TOL
    of the fp64 recurrence (5 ragged sequences); no single variant starts after `budget` seconds
    (0: no limit); `keys`: only the variants that set one of them; `variants`: these in place of
    VARIANTS (the base first). -> (rows, best config)."""
    from kimi_graph.lowering.triton.targets import TARGETS, current_target
    cases = {s: inputs(lengths(dict(SHAPES)[s])) for s in shapes}
    e_args, e_cu, e_state = inputs([300, 1, 700, 64, 129], seed=5)
    e_ref = reference(e_args, e_state, e_cu)
    base = dict(TARGETS[current_target()]["configs"]["kda_chunk"])
    rows, timed = [], []
    t0 = time.monotonic()

    def run(name, variant, late=False):
        if budget and time.monotonic() - t0 > budget and not late:
            print("over the time budget, not run:", name)
            return
        cfg = {**base, **variant}
        override_config("kda_chunk", **cfg)
        try:
            o, sn = kda.kda_chunk(*e_args, D ** -0.5, state=e_state, cu_seqlens=e_cu)
            err = max(rel_err(o, e_ref[0]), rel_err(sn, e_ref[1]))
            ms = {s: bench(lambda: kda.kda_chunk(*a, D ** -0.5, state=st, cu_seqlens=cu), rep=50)
                  for s, (a, cu, st) in cases.items()}
        except Exception as e:      # a variant that does not build or fit: report it
            print(name, type(e).__name__, str(e)[:120])
            return
        rows.append({"variant": name, **{f"{s}_ms": v for s, v in ms.items()}, "err": err, "ok": err <= TOL})
        print(rows[-1])
        if err <= TOL:
            timed.append((sum(ms.values()), variant))

    for variant in ({},) + tuple(v for v in variants if v):
        if not keys or not variant or variant.keys() & set(keys):
            run(str(variant) if variant else "base", variant)
    # merged greedily: from the best variant, each one that beat the base (the better first) is
    # added when it sets no key already set and the sum gets faster (a later variant's layout,
    # e.g. diag "block", can void an earlier one's key, e.g. diag_store); past the budget too,
    # up to budget / 3 more seconds
    base_ms = next((t for t, v in timed if not v), float("inf"))
    better = sorted(((t, v) for t, v in timed if v and t < base_ms), key=lambda x: x[0])
    best_t, merged = better[0] if better else (base_ms, {})
    for _, v in better[1:]:
        if v.keys() & merged.keys() or (budget and time.monotonic() - t0 > budget * 4 / 3):
            continue
        n = len(timed)
        run("merged " + str({**merged, **v}), {**merged, **v}, late=True)
        if len(timed) > n and timed[-1][0] < best_t:
            best_t, merged = timed[-1]
    best = {**base, **min(timed, key=lambda x: x[0])[1]} if timed else base
    override_config("kda_chunk", **best)
    return rows, best


def compile_variants(target="sm_90"):
    """Each swept variant's kernels built for `target` without a GPU, pointers 16-byte aligned
    as the JIT specialises the bench's tensors: registers a thread and spilled bytes per kernel
    (cuobjdump from Triton's bundle), so a variant that spills is seen before a GPU run; each
    kernel once, under the first variant that builds it."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kimi_graph.lowering.triton.codegen import jit_function
    from kimi_graph.lowering.triton.targets import TARGETS
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cfgs = TARGETS[target]["configs"]
    base, rows, built = dict(cfgs["kda_chunk"]), [], {}
    try:
        for v in VARIANTS:
            cfgs["kda_chunk"] = {**base, **v}
            kda.chunk_specs.cache_clear()
            for sp in kda.chunk_specs(H, D, D, "bf16", True, D ** -0.5, 1e-6, True, target):
                if sp.hash in built:
                    continue
                attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sp.signature.values()) if t[0] == "*"}
                ck = triton.compile(ASTSource(jit_function(sp), dict(sp.signature), {}, attrs),
                                    target=GPUTarget("cuda", TARGETS[target]["arch"], 32),
                                    options={"num_warps": sp.num_warps, "num_stages": sp.num_stages})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(ck.asm["cubin"])
                    f.flush()
                    use = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
                reg, stack = (re.search(rf"{k}:(\d+)", use) for k in ("REG", "STACK"))
                built[sp.hash] = {"variant": str(v) if v else "base", "kernel": sp.name, "warps": sp.num_warps,
                                  "regs": int(reg[1]) if reg else None, "spill_bytes": int(stack[1]) if stack else None}
                rows.append(built[sp.hash])
                print(rows[-1])
    finally:
        cfgs["kda_chunk"] = base
        kda.chunk_specs.cache_clear()
    return rows


def summary(checks, times):
    print("\n== KDA chunk prefill, H=32 D=128 bf16, initial states (ms; speedup = fla / ours)")
    worst = max(max(r["err_o"], r["err_state"]) for r in checks if r["impl"] == "ours")
    print(f"max rel. error vs fp64 (ours): {worst:.2e}  ({'ok' if worst <= TOL else 'OVER'} <= {TOL})")
    print(f"{'shape':>8} {'ours':>8} {'before':>8} {'fla':>8} {'speedup':>8} {'before':>8}")
    for r in times:
        print(f"{r['shape']:>8} {r['ours_ms']:8.3f} {r['before_ms']:8.3f} {r.get('fla_ms', float('nan')):8.3f} "
              f"{r.get('speedup', float('nan')):7.2f}x {r.get('before_vs_fla', float('nan')):7.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="sweep tile variants first; write the tuning file")
    ap.add_argument("--sweep-only", action="store_true", help="the sweep and its tuning file, nothing else")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds after which the sweep starts no new variant")
    ap.add_argument("--keys", default="", help="sweep only the variants that set one of these comma-separated keys")
    ap.add_argument("--sweep-shapes", default="16k,64x512", help="the shapes whose summed time the sweep ranks by")
    ap.add_argument("--variants", default="", help="a JSON list of configs to sweep in place of VARIANTS, "
                    "e.g. '[{\"scan_seg\": 256, \"scan_seg_min\": 1024}]'")
    ap.add_argument("--split-only", action="store_true",
                    help="the per-kernel split alone (ours, the previous kernels, fla-core) at --split-shapes")
    ap.add_argument("--split-shapes", default="16k,64x512", help="the shapes of the per-kernel split")
    ap.add_argument("--conv", action="store_true",
                    help="q/k/v convs + chunk prefill: the conv kernel then ours, against the convs inside prep")
    ap.add_argument("--no-fla", action="store_true", help="the split without fla-core")
    ap.add_argument("--config", default="", help="a JSON dict of kda_chunk keys over the target's config for "
                    "everything this run times (a tuning file in KIMI_GRAPH_TRITON_TUNING still applies over it)")
    ap.add_argument("--name", default="", help="suffix of the result files (kda_chunk_split-NAME.json, ...)")
    ap.add_argument("--shapes", default="", help="comma-separated subset of " + ",".join(s for s, _ in SHAPES))
    ap.add_argument("--smoke", action="store_true", help="the check alone, tiny and in fp32 (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--smoke-variants", action="store_true",
                    help="--smoke, and each swept variant checked the same way")
    ap.add_argument("--compile-variants", action="store_true",
                    help="build each swept variant for sm_90 without a GPU: registers and spills per kernel")
    a = ap.parse_args()
    if a.smoke or a.smoke_variants:
        return smoke(a.smoke_variants)
    if a.compile_variants:
        return compile_variants()
    extra, sfx = {}, f"-{a.name}" if a.name else ""
    split_shapes = [s for s in a.split_shapes.split(",") if s]
    if a.config:
        override_config("kda_chunk", **json.loads(a.config))
    if a.conv:
        rows, split_rows = conv_timing()
        write_result("kda_chunk_conv_split" + sfx, split_rows)
        write_result("kda_chunk_conv" + sfx, rows, {"config": config("kda_chunk")})
        return
    if a.split_only:
        write_result("kda_chunk_split" + sfx, [r for s in split_shapes for r in split(s, not a.no_fla)],
                     {"config": config("kda_chunk")})
        return
    if a.sweep or a.sweep_only:
        variants = tuple(json.loads(a.variants)) if a.variants else VARIANTS
        rows, cfg = sweep(tuple(a.sweep_shapes.split(",")), a.budget, tuple(k for k in a.keys.split(",") if k),
                          variants)
        write_result("kda_chunk_sweep" + sfx, rows)
        merge_tuning("kda_chunk", {k: cfg[k] for k in TUNED_KEYS},
                     f"best of bench/kda_chunk.py --sweep at {a.sweep_shapes}")
        extra["config"] = cfg
        print("best:", {k: cfg[k] for k in TUNED_KEYS})
        if a.sweep_only:
            return
    checks = check()
    write_result("kda_chunk_check", checks, {"tolerance": f"bf16 inputs, fp32 state: rel err <= {TOL}"})
    write_result("kda_chunk_split" + sfx, [r for s in split_shapes for r in split(s)])
    times = timing([s for s in a.shapes.split(",") if s])
    write_result("kda_chunk", times, {"shape": f"H={H}, D={D}, bf16, fused gate/beta/l2norm, initial states",
                                      "baseline": "fla-core chunk_kda, same fusions, same run; before: "
                                                  "bench/kda_chunk_before.py", **extra})
    summary(checks, times)


def smoke(variants=False):
    """The check on tiny heads in fp32, on the CPU through the Triton interpreter when there is
    no GPU: the bench's own code paths, without timing; `variants`: each swept variant too."""
    global H, D, DEV
    H, D, DEV = 2, 16, "cuda" if torch.cuda.is_available() else "cpu"
    rows = check(([40], [19, 1, 33, 5]), torch.float32)
    for r in rows:
        print(r)
    assert lengths((8, 4096))[-1] >= 1 and sum(lengths((256, 128))) == 256 * 128
    assert all(r["err_o"] < 1e-4 and r["err_state"] < 1e-4 for r in rows), "smoke check over 1e-4"
    if variants:        # every swept variant builds and agrees, on this target's tiles
        from kimi_graph.lowering.triton.targets import TARGETS, current_target
        base = dict(TARGETS[current_target()]["configs"]["kda_chunk"])
        args, cu, state = inputs([19, 1, 33, 5], torch.float32, seed=4)
        ro, rs = reference(args, state, cu)
        for v in VARIANTS:
            override_config("kda_chunk", **{**base, **v})
            o, st = kda.kda_chunk(*args, D ** -0.5, state=state, cu_seqlens=cu)
            err = max(rel_err(o, ro), rel_err(st, rs))
            print("variant", v, f"err {err:.2e}")
            assert err < 1e-4, f"variant {v}: err {err:.2e}"
        override_config("kda_chunk", **base)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "0")
    main()
