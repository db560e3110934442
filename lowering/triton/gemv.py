"""Dense projections at decode sizes: y = x W^T for up to `max_rows` rows of x (W [N, K], fp32
accumulation), optionally with the RMSNorm (or residual add + RMSNorm) that feeds it computed
inline, so the norm's launch and its output's round trip go away.

    gemv_rows   grid (N blocks of BN, K splits): each program streams BN rows of W over its
                share of K in BK-wide tiles. A norm runs inline in one of two ways (`norm_pass`):
                "one" sums (x nw)[m, k] w[n, k] and x[m, k]^2 in the same pass and scales the
                fp32 sums by rstd (the splits' square sums go with their partials): W streams
                from the first instruction, and the product differs from the norm kernel's
                (normalised row rounded to the data dtype) by that rounding; "two" first reads
                its rows of x whole for rstd (a few KB, from L2), then normalises each tile as
                rmsnorm_rows does (rounded, times the norm weight, rounded), so the product sees
                the norm kernel's output up to the last bit of its fp32 rstd. With a residual, the
                programs of the first N block store x + r.
Short rows go fewer programs than the GPU has, so K is split until about `programs` programs
run (from N and K alone, never from the row count); each split stores its fp32 partial, takes a
ticket of its N block (codegen.tickets), and the last to arrive sums the partials in split order
and rounds once: deterministic, one launch.
A product of few rows is W-bound: fewer than `dot_min_rows` rows take fp32 FMAs and a row sum,
more take tl.dot on a 16-row tile (rows past M masked). A row's result depends on its own values
and the rows' bucket only (the path and tiles: `token_tiles` bound, dot or not), so it is bitwise
the same in any batch of its bucket; across buckets, the bf16 rounding of differently ordered
fp32 sums apart. Larger batches, a switched-off target and anything unsupported take cuBLAS
through torch (`takes`). The switch: the `gemv` family's `enabled` (per target), overridden by
$KIMI_GRAPH_TRITON_GEMV=1/0.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kimi_graph.dtypes import DTYPE_BYTES

from .codegen import TL_DTYPES, KernelSpec, dot_precision, launch, next_pow2, render, row_view, tickets
from .elementwise import ir_dtype, ptr_type
from .moe_decode import bucket_config, bucket_of
from .norm import rmsnorm
from .prefetch import PREFETCH_L2
from .targets import config, current_target, interpreting

ENV = "KIMI_GRAPH_TRITON_GEMV"
TILE_KEYS = ("BN", "BK", "num_warps", "num_stages", "programs", "max_split", "dot_min_rows", "norm_pass", "BN_heads",
             "BK_heads", "x_load")

_GEMV = PREFETCH_L2 + """

@triton.jit
def _x_tile(x_ptr, r_ptr, m64, mm, k, xs, rs):
    # [BM, BK] of x's rows (plus the residual's, summed in the data dtype as add_rmsnorm does)
    m2 = mm[:, None] & (k < K)[None, :]
    x = tl.load(x_ptr + m64[:, None] * xs + k[None, :], mask=m2, other=0.0)
    if RESIDUAL:
        x = x + tl.load(r_ptr + m64[:, None] * rs + k[None, :], mask=m2, other=0.0)
    return x


@triton.jit
def _norm_row(nw_ptr, xm64, k, mk):
    # the norm weight at columns k, broadcast over x's tile ([BN, BK] under XT, else [1, BK])
    if XT:
        v = tl.load(nw_ptr + xm64[:, None] * 0 + k[None, :], mask=mk[None, :], other=0.0)
    else:
        v = tl.load(nw_ptr + k, mask=mk, other=0.0)[None, :]
    return v


@triton.jit
def gemv_rows(x_ptr, r_ptr, nw_ptr, w_ptr, y_ptr, s_ptr, part_ptr, tickets_ptr, x1_ptr, w1_ptr, y1_ptr, M, xs, rs):
    # y[m, n] = sum_k xn[m, k] w[n, k]: BN columns n a program, the KS columns k of split
    # program_id(1); accumulators [BN, BM] in fp32. NORM 1: a first pass for rstd, then the
    # normalised tiles; NORM 2: one pass, sum_k (x nw)[m, k] w[n, k] and sum_k x[m, k]^2 together,
    # rstd applied to the sums (the splits' square sums stored after their partials); NORM 3:
    # gated_rmsnorm's per-group norm of each tile times sigmoid(gate) (the gate at r_ptr).
    # PAIR: program_id(2) 1 computes a second product of the same shape, x1 w1^T -> y1
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    if PAIR:
        if tl.program_id(2) == 1:
            x_ptr = x1_ptr
            w_ptr = w1_ptr
            y_ptr = y1_ptr
            part_ptr = part_ptr + SPLIT * (M * N + tl.num_programs(0) * BM)
            tickets_ptr = tickets_ptr + tl.num_programs(0)
    n = pn * BN + tl.arange(0, BN)
    mn = n < N
    m = tl.arange(0, BM)
    mm = m < M
    m64 = m.to(tl.int64)
    if XT:                              # one row: x (and the norm's vectors) read in W's [BN, BK]
        xm64 = tl.zeros((BN,), tl.int64)        # shape (row 0 in every row, from L1): no layout change
        xmm = xm64 < M
    else:
        xm64 = m64
        xmm = mm
    wrow = w_ptr + n.to(tl.int64)[:, None] * K
    if PDL_EARLY:                       # launched dependently: this program's W lines into L2 first
        j = ps * KS + tl.arange(0, KL) * LINE
        ok = mn[:, None] & ((j < K) & (j < ps * KS + KS))[None, :]
        _prefetch_l2(tl.where(ok, wrow + j[None, :], w_ptr))
    # pdl: wait
    ss = tl.zeros((XR,), tl.float32)
    if NORM == 1:
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            xk = _x_tile(x_ptr, r_ptr, xm64, xmm, k, xs, rs)
            if RESIDUAL:
                if (pn == 0) & (ps == 0):
                    tl.store(s_ptr + xm64[:, None] * K + k[None, :], xk, mask=xmm[:, None] & (k < K)[None, :])
            xf = xk.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
        rstd = 1.0 / tl.sqrt(ss / K + EPS)
    acc = tl.zeros((BN, BM), tl.float32)
    acc1 = tl.zeros((BN, BK), tl.float32)     # one row: products summed across K once, at the end
    ss1 = tl.zeros((XR, BK), tl.float32)      # (and NORM 2's squares)
    for k0 in range(ps * KS, ps * KS + KS, BK):
        k = k0 + tl.arange(0, BK)
        xk = _x_tile(x_ptr, r_ptr, xm64, xmm, k, xs, rs)
        if NORM == 1:
            nw = _norm_row(nw_ptr, xm64, k, k < K).to(tl.float32)
            xk = ((xk.to(tl.float32) * rstd[:, None]).to(DT).to(tl.float32) * nw).to(DT)
        if NORM == 3:                   # gated, per group of G columns (whole groups per tile)
            xg = tl.reshape(xk.to(tl.float32), (XR, BK // G, G))
            rg = 1.0 / tl.sqrt(tl.sum(xg * xg, 2) / G + EPS)
            xn = tl.reshape(xg * rg[:, :, None], (XR, BK)).to(DT).to(tl.float32)
            xn = xn * _norm_row(nw_ptr, xm64, k % G, k < K).to(tl.float32)
            gate = tl.load(r_ptr + xm64[:, None] * rs + k[None, :], mask=xmm[:, None] & (k < K)[None, :], other=0.0)
            xk = (xn * tl.sigmoid(gate.to(tl.float32))).to(DT)
        if NORM == 2:
            if RESIDUAL:
                if pn == 0:
                    tl.store(s_ptr + xm64[:, None] * K + k[None, :], xk, mask=xmm[:, None] & (k < K)[None, :])
            xf = xk.to(tl.float32)
            if BM == 1:
                ss1 += xf * xf
            else:
                ss += tl.sum(xf * xf, 1)
            xk = (xf * _norm_row(nw_ptr, xm64, k, k < K).to(tl.float32)).to(DT)
        if EVEN:
            w = tl.load(wrow + k[None, :])
        else:
            w = tl.load(wrow + k[None, :], mask=mn[:, None] & (k < K)[None, :], other=0.0)
        if DOT:
            acc += tl.dot(w, tl.trans(xk), input_precision=PREC)
        elif BM == 1:
            acc1 += w.to(tl.float32) * xk.to(tl.float32)
        else:
            acc += tl.sum(w.to(tl.float32)[:, None, :] * xk.to(tl.float32)[None, :, :], 2)
    if BM == 1:
        if not DOT:
            acc = tl.sum(acc1, 1)[:, None]
    if NORM == 2:
        if BM == 1:
            ss = tl.sum(ss1, 1)
    if XT:                              # the square sums' BN equal copies -> one row's
        ss = tl.max(ss, 0) + tl.zeros((BM,), tl.float32)
    yo = m64[None, :] * N + n[:, None]
    my = mn[:, None] & mm[None, :]
    if SPLIT == 1:
        if NORM == 2:
            acc = acc * (1.0 / tl.sqrt(ss / K + EPS))[None, :]
        tl.store(y_ptr + yo, acc.to(DT), mask=my)
    else:
        tl.store(part_ptr + ps * M * N + yo, acc, mask=my)
        ssp = part_ptr + SPLIT * M * N + pn * SPLIT * BM + m
        if NORM == 2:
            tl.store(ssp + ps * BM, ss)
        tl.debug_barrier()              # every thread's partials stored before the ticket
        ticket = tickets_ptr + pn
        if tl.atomic_add(ticket, 1, sem="acq_rel") == SPLIT - 1:
            tl.store(ticket, 0)
            tot = tl.zeros((BN, BM), tl.float32)
            st = tl.zeros((BM,), tl.float32)
            for s in range(SPLIT):
                tot += tl.load(part_ptr + s * M * N + yo, mask=my, other=0.0, cache_modifier=".cg")
                if NORM == 2:
                    st += tl.load(ssp + s * BM, cache_modifier=".cg")
            if NORM == 2:
                tot = tot * (1.0 / tl.sqrt(st / K + EPS))[None, :]
            tl.store(y_ptr + yo, tot.to(DT), mask=my)
"""

_HEADS = """
@triton.jit
def gemv_heads(x_ptr, w_ptr, y_ptr, M, xs, xh, wh, wn):
    # y[m, h, r] = sum_n x[m, h, n] w[h, n, r] (head_matmul): BR columns r of head program_id(1)
    # a program, W read in [BK, BR] tiles along its contiguous r (w's heads wh apart, rows wn:
    # absorbed weights are views of kv_b_proj)
    pr = tl.program_id(0)
    h = tl.program_id(1)
    r = pr * BR + tl.arange(0, BR)
    mr = r < R
    m = tl.arange(0, BM)
    mm = m < M
    m64 = m.to(tl.int64)
    wp = w_ptr + h.to(tl.int64) * wh
    xrow = x_ptr + m64[:, None] * xs + h * xh
    acc = tl.zeros((BM, BR), tl.float32)
    acc1 = tl.zeros((BK, BR), tl.float32)     # one row: products summed across n once, at the end
    for k0 in range(0, NI, BK):
        k = k0 + tl.arange(0, BK)
        mk = k < NI
        xk = tl.load(xrow + k[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        w = tl.load(wp + k[:, None] * wn + r[None, :], mask=mk[:, None] & mr[None, :], other=0.0)
        if DOT:
            acc += tl.dot(xk, w, input_precision=PREC)
        else:
            acc1 += tl.trans(xk).to(tl.float32) * w.to(tl.float32)
    if not DOT:
        acc = tl.sum(acc1, 0)[None, :]
    tl.store(y_ptr + (m64[:, None] * H + h) * R + r[None, :], acc.to(DT), mask=mm[:, None] & mr[None, :])
"""


def enabled(target: str | None = None) -> bool:
    env = os.environ.get(ENV)
    if env is not None:
        return env not in ("", "0")
    return bool(config("gemv", target or current_target())["enabled"])


def splits(N: int, K: int, BN: int, BK: int, programs: int, max_split: int) -> tuple[int, int]:
    """(K splits, K columns per split, a multiple of BK) from the shape alone: enough programs
    to reach `programs`, at most `max_split` splits and one BK tile per split."""
    tiles = -(-K // BK)
    want = max(1, min(max_split, tiles, -(-programs // -(-N // BN))))
    ks = -(-tiles // want) * BK
    return -(-K // ks), ks


@functools.lru_cache(maxsize=None)
def gemv_spec(N: int, K: int, rows: int, dtype: str, norm: str | None, eps: float, target: str,
              group: int = 0, pair: bool = False) -> KernelSpec:
    """The kernel for `rows` rows of x [., K] against W [N, K]; norm: None, "rmsnorm",
    "add_rmsnorm" or "gated_rmsnorm" (over groups of `group` columns, a power of two dividing K):
    the prologue; pair: two products of that shape in one launch (no norm); tiles from the
    `gemv` family (its `token_tiles` bucket)."""
    cfg = config("gemv", target)
    cfg = bucket_config(cfg, bucket_of(cfg, rows), TILE_KEYS, "gemv")
    dot = rows >= cfg["dot_min_rows"]
    BM = max(16, next_pow2(rows)) if dot else next_pow2(rows)
    BN = max(16 if dot else 1, min(cfg["BN"], next_pow2(N)))
    BK = max(16 if dot else 1, group, min(cfg["BK"], next_pow2(K)))
    split, ks = splits(N, K, BN, BK, cfg["programs"], cfg["max_split"])
    if norm == "gated_rmsnorm" and (group != next_pow2(group) or K % group):
        raise ValueError(f"gated norm groups of {group} do not tile K={K} (a power of two dividing K)")
    # one pass rounds x * nw unnormalised to the data dtype: fp16's range takes the two-pass form
    line = 128 // DTYPE_BYTES[dtype]          # W elements a 128-byte line (codegen.with_pdl's early prefetch)
    mode = {None: 0, "gated_rmsnorm": 3}.get(norm, 1 if dtype == "f16" else {"two": 1, "one": 2}[cfg["norm_pass"]])
    consts = {"N": N, "K": K, "BM": BM, "BN": BN, "BK": BK, "KS": ks, "SPLIT": split,
              "EVEN": N % BN == 0 and K % ks == 0 and ks % BK == 0, "DOT": dot, "PREC": dot_precision(dtype),
              "NORM": mode, "RESIDUAL": norm == "add_rmsnorm", "G": max(group, 1), "EPS": float(eps) if norm else 0.0,
              "PAIR": pair and norm is None, "DT": TL_DTYPES[dtype],
              "PDL_EARLY": False, "LINE": line, "KL": next_pow2(-(-ks // line)),
              "XT": BM == 1 and not dot and cfg.get("x_load", "vector") == "tile"}
    consts["XR"] = BN if consts["XT"] else BM       # x tile's rows
    p = ptr_type(dtype)
    sig = {"x_ptr": p, "r_ptr": p, "nw_ptr": p, "w_ptr": p, "y_ptr": p, "s_ptr": p, "part_ptr": "*fp32",
           "tickets_ptr": "*i32", "x1_ptr": p, "w1_ptr": p, "y1_ptr": p, "M": "i32", "xs": "i32", "rs": "i32"}
    name = "gemv" + (f"_{norm}" if norm else "_pair" if pair else "")
    return KernelSpec(name, "gemv_rows", render(name, _GEMV, consts), sig, cfg["num_warps"], cfg["num_stages"],
                      consts)


@functools.lru_cache(maxsize=None)
def heads_spec(H: int, NI: int, R: int, rows: int, dtype: str, target: str) -> KernelSpec:
    """head_matmul's kernel for `rows` rows of x [., H, NI] against w [H, NI, R]: one row takes
    FMAs, more tl.dot on a 16-row tile; tiles BN_heads x BK_heads of the `gemv` family."""
    cfg = config("gemv", target)
    cfg = bucket_config(cfg, bucket_of(cfg, rows), TILE_KEYS, "gemv")
    dot = rows > 1
    consts = {"H": H, "NI": NI, "R": R, "BM": max(16, next_pow2(rows)) if dot else 1,
              "BR": max(16, min(cfg["BN_heads"], next_pow2(R))), "BK": max(16, min(cfg["BK_heads"], next_pow2(NI))),
              "DOT": dot, "PREC": dot_precision(dtype), "DT": TL_DTYPES[dtype]}
    p = ptr_type(dtype)
    return KernelSpec("gemv_heads", "gemv_heads", render("gemv_heads", _HEADS, consts),
                      {"x_ptr": p, "w_ptr": p, "y_ptr": p, "M": "i32", "xs": "i32", "xh": "i32", "wh": "i32",
                       "wn": "i32"},
                      cfg["num_warps"], cfg["num_stages"], consts)


def heads(x, w):
    """head_matmul through the kernel: x [..., H, NI] (rows of one stride, NI contiguous) against
    w [H, NI, R] (R contiguous; heads and rows at any stride) -> [..., H, R]."""
    H, NI, R = w.shape
    if x.dim() < 2 or tuple(x.shape[-2:]) != (H, NI) or x.dtype != w.dtype:
        raise ValueError(f"heads: x {tuple(x.shape)} {x.dtype} does not fit weight {tuple(w.shape)} {w.dtype}")
    try:
        xv = x.view(-1, H, NI)
    except RuntimeError:
        xv = x.reshape(-1, H, NI)
    if xv.stride(2) != 1:
        xv = xv.contiguous()
    if w.stride(2) != 1:
        w = w.contiguous()
    rows = xv.shape[0]
    spec = heads_spec(H, NI, R, rows, ir_dtype(x), current_target())
    y = torch.empty(x.shape[:-1] + (R,), device=x.device, dtype=x.dtype)
    if rows:
        launch(spec, (-(-R // spec.config["BR"]), H), xv, w, y, rows, xv.stride(0), xv.stride(1), w.stride(0),
               w.stride(1))
    return y


def op_head_matmul(args, attrs):
    """The backend's head_matmul: the kernel for decode-sized rows, else the op's torch form."""
    x, w = args
    rows = x.numel() // max(1, x.shape[-1] * x.shape[-2]) if x.dim() == 4 else 0
    if w.dim() == 3 and x.dim() == 4 and x.dtype == w.dtype and _decode_rows(x, rows, list(w.shape)):
        return [heads(x, w)]
    return [torch.einsum("bthn,hnr->bthr", x, w.to(x.dtype))]


def _decode_rows(x, rows: int, shape: list) -> bool:
    """Rows the kernel takes: decode-sized, float, on CUDA (or the interpreter), the target on,
    the weight's shape not left to cuBLAS."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not (x.is_cuda or interpreting()):
        return False
    target = current_target()
    cfg = config("gemv", target)
    return 0 < rows <= cfg["max_rows"] and shape not in cfg["cublas_shapes"] and enabled(target)


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Does the kernel run x W^T (else cuBLAS through torch)? Decode-sized rows, one float dtype,
    a CUDA tensor (or the interpreter), the target switched on, a weight shape not among the
    target's `cublas_shapes`."""
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype:
        return False
    return _decode_rows(x, x.numel() // max(1, x.shape[-1]), list(w.shape))


def linear(x, w, norm_weight=None, eps: float = 1e-6, residual=None, gate=None):
    """x W^T through the kernel (see `takes`); with `norm_weight`, rmsnorm(x [+ residual]) W^T,
    returning (y, x + residual) when a residual is given; with a `gate` (x's shape), the
    gated_rmsnorm of each group of norm_weight.numel() columns times sigmoid(gate), then W^T."""
    K, N = w.shape[1], w.shape[0]
    G = 0 if norm_weight is None or gate is None else norm_weight.numel()
    if x.shape[-1] != K or (residual is not None and gate is not None) \
            or any(t is not None and (norm_weight is None or t.shape != x.shape) for t in (residual, gate)) \
            or (norm_weight is not None and tuple(norm_weight.shape) != ((G,) if gate is not None else (K,))):
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(w.shape)}, norm weight "
                         f"{None if norm_weight is None else tuple(norm_weight.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)}, gate "
                         f"{None if gate is None else tuple(gate.shape)} do not fit")
    xc, xs = row_view(x)
    rows = xc.shape[0]
    norm = None if norm_weight is None else "add_rmsnorm" if residual is not None \
        else "gated_rmsnorm" if gate is not None else "rmsnorm"
    spec = gemv_spec(N, K, rows, ir_dtype(x), norm, float(eps), current_target(), G)
    c = spec.config
    y = torch.empty(x.shape[:-1] + (N,), device=x.device, dtype=x.dtype)
    s = torch.empty(x.shape, device=x.device, dtype=x.dtype) if residual is not None else y
    other = residual if residual is not None else gate
    rc, rs = row_view(other.to(x.dtype)) if other is not None else (xc, xs)
    nw = norm_weight.to(x.dtype).contiguous() if norm_weight is not None else xc
    blocks = -(-N // c["BN"])
    if rows:
        wc = w.contiguous()
        launch(spec, (blocks, c["SPLIT"]), xc, rc, nw, wc, y, s, _partials(c, rows, N, blocks, x),
               tickets(x.device, blocks), xc, wc, y, rows, xs, rs)
    return (y, s) if residual is not None else y


def _partials(c: dict, rows: int, N: int, blocks: int, x, products: int = 1):
    """fp32 scratch of the split programs: per product, the partials, then the square sums."""
    n = c["SPLIT"] * (rows * N + blocks * c["BM"]) * products if c["SPLIT"] > 1 else 1
    return torch.empty(n, device=x.device, dtype=torch.float32)


def pair(x0, w0, x1, w1):
    """(x0 w0^T, x1 w1^T) in one launch: weights of one shape, x0 and x1 rows of one stride
    (e.g. two last-dim slices of one tensor); two launches where the strides differ."""
    if w0.shape != w1.shape or x0.shape != x1.shape or x0.dtype != x1.dtype or x0.shape[-1] != w0.shape[1]:
        raise ValueError(f"pair: x {tuple(x0.shape)} / {tuple(x1.shape)}, weights {tuple(w0.shape)} / "
                         f"{tuple(w1.shape)} are not two products of one shape")
    (a, sa), (b, sb) = row_view(x0), row_view(x1)
    if sa != sb:
        return linear(x0, w0), linear(x1, w1)
    N, K = w0.shape
    rows = a.shape[0]
    spec = gemv_spec(N, K, rows, ir_dtype(x0), None, 0.0, current_target(), 0, True)
    c = spec.config
    y0, y1 = (torch.empty(x0.shape[:-1] + (N,), device=x0.device, dtype=x0.dtype) for _ in range(2))
    blocks = -(-N // c["BN"])
    if rows:
        launch(spec, (blocks, c["SPLIT"], 2), a, a, a, w0.contiguous(), y0, y0, _partials(c, rows, N, blocks, x0, 2),
               tickets(x0.device, 2 * blocks), b, w1.contiguous(), y1, rows, sa, sa)
    return y0, y1


def op_linear(args, attrs):
    """The backend's linear: the kernel where it `takes` the shapes, else the op's torch form."""
    x, w = args
    return [linear(x, w) if takes(x, w) else F.linear(x, w.to(x.dtype))]


@dataclass
class NormLinear:
    """An rmsnorm, add_rmsnorm or gated_rmsnorm (then a reshape merging its groups) whose
    normalised output only one linear reads (a weight that is a parameter): one step at the
    norm's place, the norm inline in the product at decode sizes (`linear`), else the norm
    kernel then the linear."""
    ops: list                 # [norm, (reshape,) linear]
    inputs: list[str]         # the norm's operands, then the linear's weight
    outputs: list[str]        # the linear's output, then (add_rmsnorm) the sum


def _only_user(g, v: str, kind: str):
    users = g.users(v) if v not in g.outputs else []
    return users[0] if len(users) == 1 and users[0].kind == kind and users[0].inputs[0] == v else None


def norm_linears(g, order: list, covered) -> dict[int, NormLinear]:
    """norm op id -> its step, for each norm whose output only a linear reads (through a reshape
    of its groups into rows, for gated_rmsnorm, whose groups must be a power of two)."""
    out = {}
    for op in order:
        if op.kind not in ("rmsnorm", "add_rmsnorm", "gated_rmsnorm") or not covered(g, op):
            continue
        chain, v = [op], op.outputs[0]
        if op.kind == "gated_rmsnorm":
            resh, t = _only_user(g, v, "reshape"), g.types[v]
            if resh is None or not isinstance(t.shape[-1], int) or t.shape[-1] != next_pow2(t.shape[-1]) \
                    or g.types[resh.outputs[0]].shape != t.shape[:-2] + (t.shape[-2] * t.shape[-1],):
                continue
            chain, v = chain + [resh], resh.outputs[0]
        lin = _only_user(g, v, "linear")
        if lin is None or lin.inputs[1] not in g.params or g.types[lin.inputs[1]].dtype != g.types[v].dtype:
            continue
        out[op.id] = NormLinear(chain + [lin], list(op.inputs) + [lin.inputs[1]], lin.outputs + op.outputs[1:])
    return out


def run_norm_linear(item: NormLinear, args: list, eps: float) -> list:
    """A NormLinear step's outputs from its inputs (see NormLinear.inputs)."""
    norm = item.ops[0].kind
    x, w = args[0], args[-1]
    residual = args[1] if norm == "add_rmsnorm" else None
    nw = args[2] if norm == "add_rmsnorm" else args[1]
    gate = args[2] if norm == "gated_rmsnorm" else None
    if gate is not None:                # the groups merged into rows, as the reshape does
        rows = lambda t: t.reshape(t.shape[:-2] + (t.shape[-2] * t.shape[-1],))
        if takes(rows(x), w):
            return [linear(rows(x), w, nw, eps, gate=rows(gate))]
        return [F.linear(rows(rmsnorm(x, nw, eps, gate=gate)), w.to(x.dtype))]
    if takes(x, w):
        out = linear(x, w, nw, eps, residual)
        return list(out) if residual is not None else [out]
    out = rmsnorm(x, nw, eps, residual=residual)
    xn, rest = (out[0], [out[1]]) if residual is not None else (out, [])
    return [F.linear(xn, w.to(xn.dtype))] + rest


@dataclass
class LinearPair:
    """Two linears with weights (parameters) of one shape whose inputs are last-dim slices of one
    value (KDA's f_b and g_b of the fused projection's f_a and g_a): one step at the first's
    place, one launch at decode sizes (`pair`), else two."""
    ops: list                 # the two linears
    slices: list              # each one's input slice
    inputs: list[str]         # the sliced value, then the two weights
    outputs: list[str]


def linear_pairs(g, order: list, folded: set) -> dict[int, LinearPair]:
    """first linear's op id -> its pair (linears taken in order, two at a time, per sliced value
    and shape)."""
    groups: dict[tuple, list] = {}
    for op in order:
        sl = g.defining_op(op.inputs[0]) if op.kind == "linear" and op.id not in folded else None
        if sl is None or sl.kind != "slice" or op.inputs[1] not in g.params \
                or sl.attrs["dim"] % g.types[sl.outputs[0]].rank != g.types[sl.outputs[0]].rank - 1 \
                or not all(isinstance(sl.attrs[k], int) for k in ("start", "end")):
            continue
        key = (sl.inputs[0], g.types[op.inputs[0]], g.types[op.inputs[1]])
        groups.setdefault(key, []).append((op, sl))
    return {a.id: LinearPair([a, b], [sa, sb], [sa.inputs[0], a.inputs[1], b.inputs[1]], a.outputs + b.outputs)
            for members in groups.values() for (a, sa), (b, sb) in zip(members[0::2], members[1::2])}


def run_pair(item: LinearPair, v, w0, w1) -> list:
    """A LinearPair step's outputs from the sliced value and the weights."""
    x0, x1 = (v.narrow(-1, sl.attrs["start"], sl.attrs["end"] - sl.attrs["start"]) for sl in item.slices)
    if takes(x0, w0):
        return list(pair(x0, w0, x1, w1))
    return [F.linear(x0, w0.to(x0.dtype)), F.linear(x1, w1.to(x1.dtype))]


def specs_for(N: int, K: int, dtype: str, norm: str | None, eps: float, target: str,
              group: int = 0, paired: bool = False) -> list[KernelSpec]:
    """The kernels of every row bucket up to `max_rows` (AOT builds); none where switched off."""
    if not enabled(target):
        return []
    rows = [r for r in range(1, config("gemv", target)["max_rows"] + 1)]
    return list({s.hash: s for s in (gemv_spec(N, K, r, dtype, norm, eps, target, group, paired)
                                     for r in rows)}.values())


def heads_specs_for(H: int, NI: int, R: int, dtype: str, target: str) -> list[KernelSpec]:
    """head_matmul's kernels of every row bucket up to `max_rows` (AOT builds)."""
    if not enabled(target):
        return []
    rows = range(1, config("gemv", target)["max_rows"] + 1)
    return list({s.hash: s for s in (heads_spec(H, NI, R, r, dtype, target) for r in rows)}.values())


# the backend's ops these kernels run at decode sizes (the op's torch form otherwise)
IMPLS = {"linear": op_linear, "head_matmul": op_head_matmul}
