"""The prefill-sized short conv and row norms on their own: time per call, the bandwidth they
reach against the copy rate measured in the same run, and a sweep of their tile keys
(targets.py "conv": BT, BC, num_warps; "norm": tile, num_warps, num_warps_wide).

Shapes are one engine prefill call of the published model: KDA's q/k/v convs (3 x 4096
channels, width 4, SiLU, a state) reading slices of the fused projection output [T, 12576];
add_rmsnorm over 2304; KDA's gated per-head norm over 128 (T x 32 rows); MLA's latent norm
over 512 read in place from kv_a's [T, 576].

    python bench/conv_norm.py                        # H200: 4096 and 16384 tokens, sweeps
    python bench/conv_norm.py --write-tuning         # and merge the winners into the tuning file
    TRITON_INTERPRET=1 python bench/conv_norm.py --smoke     # CPU: tiny shapes, two variants
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

import harness  # noqa: F401  (puts the checkout on the path)
from harness import copy_bandwidth, merge_tuning, override_config, write_result
from kimi_graph.lowering.triton import conv, norm
from kimi_graph.lowering.triton.targets import TARGETS, current_target
from kimi_graph.ops import get_op

CONV_SWEEP = [{"BT": bt, "BC": bc, "num_warps": w}
              for bt, bc, w in itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8))]
NORM_SWEEP = [{"tile": t, "num_warps": w} for t, w in itertools.product((1024, 2048, 4096, 8192), (2, 4, 8))]
WIDE_SWEEP = [{"num_warps_wide": w} for w in (4, 8, 16)]


class Shapes:
    def __init__(self, smoke: bool):
        self.dev = "cpu" if smoke else "cuda"
        self.dt = torch.float32 if smoke else torch.bfloat16
        self.C, self.D, self.H, self.K, self.R = (16, 40, 4, 8, 24) if smoke else (4096, 2304, 32, 128, 512)
        self.tokens = (13,) if smoke else (4096, 16384)
        self.sweeps = (CONV_SWEEP[:2], NORM_SWEEP[:2], WIDE_SWEEP[:1]) if smoke else (CONV_SWEEP, NORM_SWEEP,
                                                                                      WIDE_SWEEP)

    def timer(self, fn) -> float:
        if self.dev == "cuda":
            return harness.bench(fn, warmup=10, rep=50)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def cases(S: Shapes, T: int, g: torch.Generator) -> dict:
    """name -> (kernel family, fn, bytes read + written, check: fn -> relative error)."""
    r = lambda *shape: torch.randn(*shape, generator=g, device=S.dev).to(S.dt)
    C, D, H, K, R, W = S.C, S.D, S.H, S.K, S.R, 4
    fused = r(1, T, 3 * C + 2 * K + H)
    xs = [fused[..., i * C:(i + 1) * C] for i in range(3)]
    ws, sts = [r(C, 1, W) for _ in range(3)], [r(1, C, W - 1) for _ in range(3)]
    x, res, wd = r(T, D), r(T, D), r(D)
    o, gate, wk = r(T * H, K), r(T * H, K), r(K)
    kv_a, wr = r(T, R + 64), r(R)
    el = torch.tensor([], dtype=S.dt).element_size()

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    def conv_check():
        got = conv.causal_conv1d_group(xs, ws, sts, "silu")
        return max(rel(y, get_op("causal_conv1d").ref([x.float(), w.float(), st.float()], {"activation": "silu"})[0])
                   for (y, _), x, w, st in zip(got, xs, ws, sts))
    return {
        "conv_qkv": ("conv", lambda: conv.causal_conv1d_group(xs, ws, sts, "silu"),     # one launch, as the model
                     3 * 2 * T * C * el, conv_check),
        "add_rmsnorm": ("norm", lambda: norm.rmsnorm(x, wd, 1e-5, residual=res), 4 * T * D * el,
                        lambda: rel(norm.rmsnorm(x, wd, 1e-5, residual=res)[0],
                                    get_op("add_rmsnorm").ref([x.float(), res.float(), wd.float()], {"eps": 1e-5})[0])),
        "gated_rmsnorm": ("norm", lambda: norm.rmsnorm(o, wk, 1e-5, gate=gate), 3 * T * H * K * el,
                          lambda: rel(norm.rmsnorm(o, wk, 1e-5, gate=gate),
                                      get_op("gated_rmsnorm").ref([o.float(), wk.float(), gate.float()],
                                                                  {"eps": 1e-5})[0])),
        "latent_rmsnorm": ("norm", lambda: norm.rmsnorm(kv_a[:, :R], wr, 1e-6), 2 * T * R * el,
                           lambda: rel(norm.rmsnorm(kv_a[:, :R], wr, 1e-6),
                                       get_op("rmsnorm").ref([kv_a[:, :R].float(), wr.float()], {"eps": 1e-6})[0])),
    }


def sweep(S: Shapes, family: str, variants: list[dict], names: list[str], all_cases: dict, copy_bw) -> tuple:
    """Time `names` (summed over the token counts) under each variant -> (best variant, rows)."""
    base = dict(TARGETS[current_target()]["configs"][family])
    rows, totals = [], []
    for v, over in enumerate(variants):
        override_config(family, **{**base, **over})
        total, row = 0.0, {"family": family, "variant": v, "config": over}
        for (T, name), (_, fn, nbytes, _) in all_cases.items():
            if name in names:
                try:
                    ms = S.timer(fn)
                except Exception as e:        # a tile this GPU cannot build
                    print(f"{family} variant {v} {over}: {type(e).__name__} {str(e)[:80]}", flush=True)
                    ms = float("inf")
                row[f"{name}@{T}_us"] = round(ms * 1e3, 1)
                total += ms
        row["total_us"] = round(total * 1e3, 1)
        rows.append(row)
        totals.append(total)
        print(row, flush=True)
    override_config(family, **base)
    win = min(range(len(totals)), key=totals.__getitem__)
    return variants[win], rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU (TRITON_INTERPRET=1): tiny shapes, two variants")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--families", default="conv,norm", help="the sweeps to run: conv, norm or both")
    ap.add_argument("--write-tuning", action="store_true", help="merge the winners into the tuning file")
    args = ap.parse_args(argv)
    S = Shapes(args.smoke)
    g = torch.Generator(device=S.dev).manual_seed(0)
    copy_bw = copy_bandwidth() if S.dev == "cuda" else None
    all_cases = {(T, n): c for T in S.tokens for n, c in cases(S, T, g).items()}
    rows = []
    for (T, name), (family, fn, nbytes, check) in all_cases.items():
        ms = S.timer(fn)
        row = {"case": name, "tokens": T, "us": round(ms * 1e3, 1), "TBps": round(nbytes / (ms * 1e-3) / 1e12, 3),
               "rel_err": float(f"{check():.2e}")}
        if copy_bw:
            row["of_copy"] = round(nbytes / (ms * 1e-3) / copy_bw, 3)
        rows.append(row)
        print(row, flush=True)
    sweeps, best = [], {}
    if not args.no_sweep:
        conv_v, norm_v, wide_v = S.sweeps
        for family, variants, names in (("conv", conv_v, ["conv_qkv"]),
                                         ("norm", norm_v, ["gated_rmsnorm", "latent_rmsnorm"]),
                                         ("norm", wide_v, ["add_rmsnorm"])):
            if family not in args.families.split(","):
                continue
            win, part = sweep(S, family, variants, names, all_cases, copy_bw)
            best.setdefault(family, {}).update(win)
            sweeps += part
            override_config(family, **best[family])      # the next sweep of a family starts from it
        print("best:", best, flush=True)
    if S.dev == "cuda":
        write_result("conv_norm", rows, {"copy_bw_TBps": round(copy_bw / 1e12, 3), "sweep": sweeps, "best": best})
        if args.write_tuning:
            for family, cfg in best.items():
                full = {**TARGETS[current_target()]["configs"][family], **cfg}
                print("tuning file:", merge_tuning(family, full, "bench/conv_norm.py sweep at 4k/16k tokens"))


if __name__ == "__main__":
    main()
