"""The routed experts of a decode-sized batch, read by their top-k ids (no permutation).

For up to `max_pairs` token copies (N tokens x top_k) the expert rows are read directly, one
(token, expert) pair per program column: no sort, no tile map, no un-permute; three kernels:
    moe_decode_gate_up   h[p] = silu(x[p // K] w1_e^T) * (x[p // K] w3_e^T), e = ids[p]
    moe_decode_down      y[p] = h[p] w2_e^T
    moe_combine          out[n] = acc[n] + sum_j weights[n, j] y[n K + j]   (moe_permute's)
The rounding is the permuted path's: h and each expert's output y are rounded to the data
dtype, the weighted sum runs in fp32 in the order j = 0..K-1 onto acc. A shared expert of the
layer can take acc's place: its gate/up rows and its down rows are one more program column per
token in each kernel (its output, rounded, is the combine's acc). Both projections run one
program per (BN or BND output rows, pair): at B=1, top-8 plus the shared expert and D = 2304,
BND = 16 gives 144 x 9 programs, so a single token's ~42 MB of down weights is read by the
whole GPU rather than by one program per D block looping over the experts.
Larger batches take moe.moe_experts; `moe_experts` chooses.
"""
from __future__ import annotations

import functools

import torch

from . import moe, moe_permute
from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render
from .elementwise import ir_dtype, ptr_type
from .targets import config, current_target

_DECODE = """
@triton.jit
def _swiglu_rows(x_ptr, wg_ptr, wu_ptr, n, mn, ROUND: tl.constexpr):
    # silu(x wg[n]^T) * (x wu[n]^T) for the BN rows n of one expert (D columns); ROUND: gate
    # and up rounded to the data dtype first (as separate linears give them)
    dk = tl.arange(0, BK)
    acc_g = tl.zeros((BN,), tl.float32)
    acc_u = tl.zeros((BN,), tl.float32)
    for k0 in range(0, D, BK):
        mk = k0 + dk < D
        x = tl.load(x_ptr + k0 + dk, mask=mk, other=0.0).to(tl.float32)
        m2 = mn[:, None] & mk[None, :]
        wg = tl.load(wg_ptr + n[:, None] * D + k0 + dk[None, :], mask=m2, other=0.0).to(tl.float32)
        wu = tl.load(wu_ptr + n[:, None] * D + k0 + dk[None, :], mask=m2, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * x[None, :], 1)
        acc_u += tl.sum(wu * x[None, :], 1)
    if ROUND:
        acc_g = acc_g.to(DT).to(tl.float32)
        acc_u = acc_u.to(DT).to(tl.float32)
    return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u


@triton.jit
def _rows_dot(h_ptr, w_ptr, n, mn, K: tl.constexpr):
    # (h w^T)[n] for the BND rows n of w [., K], in fp32
    dk = tl.arange(0, BKD)
    y = tl.zeros((BND,), tl.float32)
    for k0 in range(0, K, BKD):
        mk = k0 + dk < K
        h = tl.load(h_ptr + k0 + dk, mask=mk, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None] * K + k0 + dk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        y += tl.sum(w.to(tl.float32) * h[None, :], 1)
    return y


@triton.jit
def moe_decode_gate_up(x_ptr, ids_ptr, w13_ptr, h_ptr, wg_ptr, wu_ptr, hs_ptr, pairs):
    # grid (I blocks, pairs + shared rows): one expert's BN gate and up rows against one token's
    # x; programs past the pairs do the shared expert of token p - pairs
    p = tl.program_id(1)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    if p < pairs:
        ex = tl.load(ids_ptr + p)
        wb = w13_ptr + ex * (2 * I * D)
        mn = n < I
        h = _swiglu_rows(x_ptr + (p // TOPK).to(tl.int64) * D, wb, wb + I * D, n, mn, False)
        tl.store(h_ptr + p.to(tl.int64) * I + n, h.to(DT), mask=mn)
    else:
        tok = (p - pairs).to(tl.int64)
        mn = n < IS
        h = _swiglu_rows(x_ptr + tok * D, wg_ptr, wu_ptr, n, mn, True)
        tl.store(hs_ptr + tok * IS + n, h.to(DT), mask=mn)


@triton.jit
def moe_decode_down(h_ptr, ids_ptr, w2_ptr, hs_ptr, wd_ptr, y_ptr, pairs):
    # grid (D blocks, pairs + shared rows): y[p] = round(h[p] w2_{ids[p]}^T) for BND of its D
    # rows; programs past the pairs do the shared expert of token p - pairs (y's row p)
    p = tl.program_id(1)
    n = tl.program_id(0) * BND + tl.arange(0, BND)
    mn = n < D
    if p < pairs:
        ex = tl.load(ids_ptr + p)
        y = _rows_dot(h_ptr + p.to(tl.int64) * I, w2_ptr + ex * (D * I), n, mn, I)
    else:
        y = _rows_dot(hs_ptr + (p - pairs).to(tl.int64) * IS, wd_ptr, n, mn, IS)
    tl.store(y_ptr + p.to(tl.int64) * D + n, y.to(DT), mask=mn)
"""


@functools.lru_cache(maxsize=None)
def decode_specs(I, D, top_k, dtype, wdt, shared_i, target):
    """(gate_up, down, combine) kernels of the direct path; shared_i: the shared expert's width
    (0: none)."""
    cfg = config("moe_decode", target)
    wide = max(I, shared_i)
    consts = {"I": I, "IS": max(shared_i, 1), "D": D, "TOPK": top_k,
              "BN": min(cfg["BN"], next_pow2(wide)), "BK": min(cfg["BK"], next_pow2(D)),
              "BND": min(cfg["BND"], next_pow2(D)), "BKD": min(cfg["BKD"], next_pow2(wide)),
              "DT": TL_DTYPES[dtype]}
    src = render("moe_decode", _DECODE, consts)
    p, stages = ptr_type(dtype), cfg["num_stages"]
    return (KernelSpec("moe_decode_gate_up", "moe_decode_gate_up", src,
                       {"x_ptr": p, "ids_ptr": "*i64", "w13_ptr": p, "h_ptr": p, "wg_ptr": p, "wu_ptr": p,
                        "hs_ptr": p, "pairs": "i32"}, cfg["num_warps"], stages, consts),
            KernelSpec("moe_decode_down", "moe_decode_down", src,
                       {"h_ptr": p, "ids_ptr": "*i64", "w2_ptr": p, "hs_ptr": p, "wd_ptr": p, "y_ptr": p,
                        "pairs": "i32"}, cfg.get("warps_down", cfg["num_warps"]), stages, consts),
            *moe_permute.combine_specs(D, top_k, dtype, wdt, target))


def _check(x, ids, weights, w13, w2, acc, shared):
    E, I2, D = w13.shape
    ok = ids.shape == weights.shape and ids.shape[:-1] == x.shape[:-1] and x.shape[-1] == D \
        and w2.shape == (E, D, I2 // 2) and ids.dtype == torch.int64 and (acc is None or acc.shape == x.shape)
    if shared is not None:
        wg, wu, wd = shared
        ok = ok and wg.shape == wu.shape and wg.shape[1:] == (D,) and wd.shape == (D, wg.shape[0])
    if not ok or (acc is None) == (shared is None):
        raise ValueError(f"x {tuple(x.shape)}, ids {tuple(ids.shape)} {ids.dtype}, weights {tuple(weights.shape)}, "
                         f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, acc {None if acc is None else tuple(acc.shape)}"
                         f", shared {None if shared is None else [tuple(t.shape) for t in shared]} do not fit "
                         "(give acc or a shared expert, not both)")


def direct(x, ids, weights, w13, w2, acc=None, shared=None):
    """acc + sum_j weights[..., j] SwiGLU_{ids[..., j]}(x), reading experts by id; with `shared`
    = (w_gate, w_up, w_down), the shared expert's SwiGLU(x) takes acc's place."""
    _check(x, ids, weights, w13, w2, acc, shared)
    E, I2, D = w13.shape
    I, k = I2 // 2, ids.shape[-1]
    dt = x.dtype
    IS = 0 if shared is None else shared[0].shape[0]
    gate_up, down, _ = decode_specs(I, D, k, ir_dtype(x), ir_dtype(weights), IS, current_target())
    c = gate_up.config
    pairs = ids.numel()
    N = pairs // k if k else 0
    if not pairs:
        return shared_swiglu(x, *shared) if IS else acc.clone()
    rows = pairs + (N if IS else 0)          # the shared expert's rows after the pairs
    h = torch.empty(pairs, I, device=x.device, dtype=dt)
    y = torch.empty(rows, D, device=x.device, dtype=dt)
    hs = torch.empty(N, IS, device=x.device, dtype=dt) if IS else h
    wg, wu, wd = (t.to(dt).contiguous() for t in shared) if IS else (h, h, h)
    ids_c, xc = ids.contiguous(), x.contiguous()
    launch(gate_up, (-(-max(I, IS) // c["BN"]), rows), xc, ids_c, w13.to(dt).contiguous(), h, wg, wu, hs, pairs)
    launch(down, (-(-D // c["BND"]), rows), h, ids_c, w2.to(dt).contiguous(), hs, wd, y, pairs)
    return moe_permute.moe_combine(y[:pairs], weights, y[pairs:].view(x.shape) if IS else acc.to(dt))


def shared_swiglu(x, wg, wu, wd):
    """The shared expert through torch (moe.moe_experts' accumulator)."""
    import torch.nn.functional as F
    return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def takes_direct(ids: torch.Tensor) -> bool:
    return ids.numel() <= config("moe_decode", current_target())["max_pairs"]


def moe_experts(x, ids, weights, w13, w2, acc=None, shared=None):
    """The routed experts (and a shared one): by id for a decode-sized batch, else moe.moe_experts
    after the shared expert through torch."""
    if takes_direct(ids):
        return direct(x, ids, weights, w13, w2, acc, shared)
    _check(x, ids, weights, w13, w2, acc, shared)
    if shared is not None:
        acc = shared_swiglu(x, *(t.to(x.dtype) for t in shared))
    return moe.moe_experts(x, ids, weights, w13, w2, acc)


def specs_for(kind, ins, outs, attrs, target, shared_i: int = 0):
    """Both paths' kernels (moe_experts runs either), for AOT builds."""
    x, ids, w, w13, w2 = ins[:5]
    E, I2, D = w13.shape
    return (list(decode_specs(I2 // 2, D, ids.shape[-1], x.dtype, w.dtype, shared_i, target))
            + moe.specs_for("moe_experts", ins[:5] + [x], outs, attrs, target))
