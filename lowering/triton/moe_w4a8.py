"""Decode-sized int4 grouped SwiGLU with int8 activations (W4A8; moe_quant.py dispatches here when
`rows_kernel` is "w4a8"): the products of codes and activations are integer 4-way dot products
(dp4a: four byte products and their sum in one instruction), so a code costs about half an
instruction instead of a dequantization and an FMA.

- `qmoe_a8_x` / `qmoe_a8_h`: each row's activations quantized per quantization group (G columns): scale
  max|x| / 127, codes round(x / scale) in int8, packed four to a 32-bit word in the order the
  int4 words hold their nibbles: word j of plane "e" holds columns 8j, 8j+2, 8j+4, 8j+6 (the low
  nibbles of weight word j), plane "o" columns 8j+1, ..., 8j+7 (the high nibbles); and the sum of
  the group's codes (for the zero point). Run on the rows before gate_up and on h before down.
  With `fuse_w4a8` neither runs: gate_up and down quantize each step's groups of their row
  themselves (`_a8_quant`, the same codes; every N block of a row repeats it, from L2), two
  launches instead of four.
- `qmoe_a8_gate_up` / `qmoe_a8_down`: grid (N blocks, rows) as the per-row word kernels; each
  step reads TPS groups of BN weight rows as words (the next step's loaded before this one's are
  used), and per word
  acc = dp4a(w & 0x0F0F0F0F, e, dp4a((w >> 4) & 0x0F0F0F0F, o, 0)) sums its eight products in
  int32; a group's sum, less zero point x the activation codes' sum, is scaled once by the weight
  group's scale x the activations' scale.
Numerics: the activations' rounding (at most scale / 2 each, about 2^-8 of the group's largest)
is an approximation of the weight-only reference, as fp8's W8A8. The interpreter has no inline
assembly: there dp4a is written out in integer operations (the same values).
"""
from __future__ import annotations

import functools

import torch

from kimi_graph.ops.quant import BITS

from . import dequant
from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render
from .elementwise import ptr_type
from .targets import config

_DP4A_ASM = """
@triton.jit
def _dp4a(a, b, c):
    # c + sum_i a.byte[i] (unsigned) * b.byte[i] (signed)
    return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                     is_pure=True, pack=1)
"""

_DP4A_OPS = """
@triton.jit
def _dp4a(a, b, c):
    # c + sum_i a.byte[i] (unsigned) * b.byte[i] (signed), in integer operations (interpreter)
    s = c
    for i in tl.static_range(4):
        s += ((a >> (8 * i)) & 255) * (((b >> (8 * i)) & 255) ^ 128) - 128 * ((a >> (8 * i)) & 255)
    return s
"""

EXPERT_OF = """
@triton.jit
def _expert_of(off_ptr, r):
    # the expert e whose rows offsets[e] .. offsets[e + 1] hold row r: how many end at or before it
    e = tl.arange(0, EP)
    ends = tl.load(off_ptr + 1 + e, mask=e < E, other=0)
    return tl.sum(((ends <= r) & (e < E)).to(tl.int64), 0)
"""

_A8 = """
@triton.jit
def _a8_quant(x_ptr, g0, K: tl.constexpr, G: tl.constexpr, STEP: tl.constexpr):
    # STEP groups of G columns of the row x from group g0 (past K: zeros) -> int8 codes packed in
    # words (planes e, o: [STEP * G / 8]), the scales [STEP] and the codes' sums [STEP]
    j = tl.arange(0, G // 8)
    b = tl.arange(0, 4)
    # [STEP, G / 8, 4, 2]: column 8 j + 2 b + p of group g0 + t
    c = (g0 + tl.arange(0, STEP))[:, None, None, None] * G + 8 * j[None, :, None, None] \
        + 2 * b[None, None, :, None] + tl.arange(0, 2)[None, None, None, :]
    v = tl.load(x_ptr + c, mask=c < K, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.max(tl.max(tl.abs(v), 3), 2), 1), 1e-30) / 127.0
    q = ((v / s[:, None, None, None] + 12582912.0) - 12582912.0).to(tl.int32)     # round to nearest even
    e, o = tl.split(q)
    xe = tl.reshape(tl.sum((e & 255) << (8 * b[None, None, :]), 2), (STEP * (G // 8),))
    xo = tl.reshape(tl.sum((o & 255) << (8 * b[None, None, :]), 2), (STEP * (G // 8),))
    return xe, xo, s, tl.sum(tl.sum(e + o, 2), 1)

@triton.jit
def _a8_acts(x_ptr, xe_ptr, xo_ptr, xs_ptr, xz_ptr, g0, K: tl.constexpr, G: tl.constexpr, STEP: tl.constexpr):
    # a row's int8 activations of STEP groups from group g0 (_a8_quant's values): quantized here
    # from x (FUSE) or loaded as qmoe_a8_x / qmoe_a8_h stored them
    if FUSE:
        xe, xo, xs, xz = _a8_quant(x_ptr, g0, K, G, STEP)
    else:
        j = g0 * (G // 8) + tl.arange(0, STEP * (G // 8))
        mj = j < K // 8
        g = g0 + tl.arange(0, STEP)
        mg = g < K // G
        xe = tl.load(xe_ptr + j, mask=mj, other=0)
        xo = tl.load(xo_ptr + j, mask=mj, other=0)
        xs = tl.load(xs_ptr + g, mask=mg, other=0.0)
        xz = tl.load(xz_ptr + g, mask=mg, other=0)
    return xe, xo, xs, xz


$dp4a


@triton.jit
def _a8_load(w_ptr, n, mn, g0, K: tl.constexpr, G: tl.constexpr, STEP: tl.constexpr):
    # the words of STEP groups from group g0 of weight rows n (past K: masked off, nothing read)
    j = g0 * (G // 8) + tl.arange(0, STEP * (G // 8))
    return tl.load(w_ptr + n[:, None] * (K // 8) + j[None, :], mask=mn[:, None] & (j < K // 8)[None, :], other=0)


@triton.jit
def _a8_use(w, s_ptr, z_ptr, n, mn, xe, xo, xs, xz, g0, K: tl.constexpr, G: tl.constexpr,
            NR: tl.constexpr, STEP: tl.constexpr):
    # the loaded words w of STEP groups from group g0 dotted with the row's int8 codes (_a8_acts),
    # each group's integer sum scaled once: [NR] in fp32 (groups past K add nothing)
    xe = tl.broadcast_to(xe[None, :], (NR, STEP * (G // 8)))
    xo = tl.broadcast_to(xo[None, :], (NR, STEP * (G // 8)))
    p = _dp4a(w & 0x0F0F0F0F, xe, _dp4a((w >> 4) & 0x0F0F0F0F, xo, tl.zeros_like(w)))
    g = g0 + tl.arange(0, STEP)
    mg = g < K // G
    isum = tl.sum(tl.reshape(p, (NR, STEP, G // 8)), 2)                      # [NR, STEP]
    ws = tl.load(s_ptr + n[:, None] * (K // G) + g[None, :], mask=mn[:, None] & mg[None, :], other=0.0)
    $zero
    return tl.sum((isum - z * xz[None, :]).to(tl.float32) * ws.to(tl.float32) * xs[None, :], 1)

@triton.jit
def _a8_swiglu(x_ptr, xe_ptr, xo_ptr, xs_ptr, xz_ptr, wg_ptr, wu_ptr, s_ptr, z_ptr, rg, ru, mn):
    # silu(x wg[rg]^T) * (x wu[ru]^T) for BN weight rows of one expert (D columns, int4 words)
    # against one row's int8 activations (_a8_acts)
    acc_g = tl.zeros((BN,), tl.float32)
    acc_u = tl.zeros((BN,), tl.float32)
    wg = _a8_load(wg_ptr, rg, mn, 0, D, G1, TPS)
    wu = _a8_load(wu_ptr, ru, mn, 0, D, G1, TPS)
    for g0 in range(0, D // G1, TPS):
        # the next step's words loaded before this step's are used
        wg2 = _a8_load(wg_ptr, rg, mn, g0 + TPS, D, G1, TPS)
        wu2 = _a8_load(wu_ptr, ru, mn, g0 + TPS, D, G1, TPS)
        a_e, a_o, a_s, a_z = _a8_acts(x_ptr, xe_ptr, xo_ptr, xs_ptr, xz_ptr, g0, D, G1, TPS)
        acc_g += _a8_use(wg, s_ptr, z_ptr, rg, mn, a_e, a_o, a_s, a_z, g0, D, G1, BN, TPS)
        acc_u += _a8_use(wu, s_ptr, z_ptr, ru, mn, a_e, a_o, a_s, a_z, g0, D, G1, BN, TPS)
        wg, wu = wg2, wu2
    return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u


@triton.jit
def _a8_rows_dot(h_ptr, he_ptr, ho_ptr, hs_ptr, hz_ptr, w_ptr, s_ptr, z_ptr, n, mn, NR: tl.constexpr,
                 K: tl.constexpr, G: tl.constexpr, STEP: tl.constexpr):
    # (h w^T)[n] for NR weight rows n of w [., K] (int4 words) against one row's int8 activations
    acc = tl.zeros((NR,), tl.float32)
    w = _a8_load(w_ptr, n, mn, 0, K, G, STEP)
    for g0 in range(0, K // G, STEP):
        wn = _a8_load(w_ptr, n, mn, g0 + STEP, K, G, STEP)
        a_e, a_o, a_s, a_z = _a8_acts(h_ptr, he_ptr, ho_ptr, hs_ptr, hz_ptr, g0, K, G, STEP)
        acc += _a8_use(w, s_ptr, z_ptr, n, mn, a_e, a_o, a_s, a_z, g0, K, G, NR, STEP)
        w = wn
    return acc
"""

# moe_decode's experts by id on these loops (its `_swiglu_rows_$R` / `_rows_dot_$R` with R = "a8"):
# each program quantizes its token's row itself (FUSE)
DECODE = _A8 + """

@triton.jit
def _swiglu_rows_a8(x_ptr, wg_ptr, wu_ptr, s_ptr, z_ptr, rg, ru, mn, ROUND: tl.constexpr):
    return _a8_swiglu(x_ptr, x_ptr, x_ptr, x_ptr, x_ptr, wg_ptr, wu_ptr, s_ptr, z_ptr, rg, ru, mn)


@triton.jit
def _rows_dot_a8(h_ptr, w_ptr, s_ptr, z_ptr, n, mn, K: tl.constexpr, G: tl.constexpr):
    return _a8_rows_dot(h_ptr, h_ptr, h_ptr, h_ptr, h_ptr, w_ptr, s_ptr, z_ptr, n, mn, BND, K, G, TPSD)
"""

_KERNELS = EXPERT_OF + _A8 + """

@triton.jit
def _a8_rows(x_ptr, xe_ptr, xo_ptr, xs_ptr, xz_ptr, K: tl.constexpr, G: tl.constexpr):
    # group program_id(1) of row program_id(0) of x [., K] -> _a8_quant's words (planes e, o:
    # [., K // 8] each), scale [., K // G] and codes' sum [., K // G]
    r = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    xe, xo, xs, xz = _a8_quant(x_ptr + r * K, g, K, G, 1)
    j = r * (K // 8) + g * (G // 8) + tl.arange(0, G // 8)
    tl.store(xe_ptr + j, xe)
    tl.store(xo_ptr + j, xo)
    at = r * (K // G) + g + tl.arange(0, 1)
    tl.store(xs_ptr + at, xs)
    tl.store(xz_ptr + at, xz)


@triton.jit
def qmoe_a8_x(x_ptr, xe_ptr, xo_ptr, xs_ptr, xz_ptr):
    # grid (rows, groups): the rows before gate_up
    _a8_rows(x_ptr, xe_ptr, xo_ptr, xs_ptr, xz_ptr, D, G1)


@triton.jit
def qmoe_a8_h(x_ptr, xe_ptr, xo_ptr, xs_ptr, xz_ptr):
    # grid (rows, groups): h before down
    _a8_rows(x_ptr, xe_ptr, xo_ptr, xs_ptr, xz_ptr, I, G2)

@triton.jit
def _a8_program(off_ptr, NB: tl.constexpr, N: tl.constexpr):
    # program (N block, row r): r, r's expert, the block's NB output rows n and which lie below N
    r = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * NB + tl.arange(0, NB)
    return r, _expert_of(off_ptr, r), n, n < N

@triton.jit
def qmoe_a8_gate_up(x_ptr, xe_ptr, xo_ptr, xs_ptr, xz_ptr, off_ptr, q_ptr, s_ptr, z_ptr, h_ptr):
    # grid (I blocks, rows): h[r] = silu(x[r] w1_e^T) * (x[r] w3_e^T) for BN columns, e = r's expert
    r, ex, n, mn = _a8_program(off_ptr, BN, I)
    w13 = q_ptr + ex * W13
    h = _a8_swiglu(x_ptr + r * D, xe_ptr + r * (D // 8), xo_ptr + r * (D // 8), xs_ptr + r * (D // G1),
                   xz_ptr + r * (D // G1), w13, w13, s_ptr + ex * S13, z_ptr + ex * S13, n, n + I, mn)
    tl.store(h_ptr + r * I + n, h.to(DT), mask=mn)


@triton.jit
def qmoe_a8_down(h_ptr, he_ptr, ho_ptr, hs_ptr, hz_ptr, off_ptr, q_ptr, s_ptr, z_ptr, y_ptr):
    # grid (D blocks, rows): y[r] = h[r] w2_e^T for BND columns, e = r's expert
    r, ex, n, mn = _a8_program(off_ptr, BND, D)
    y = _a8_rows_dot(h_ptr + r * I, he_ptr + r * (I // 8), ho_ptr + r * (I // 8), hs_ptr + r * (I // G2),
                     hz_ptr + r * (I // G2), q_ptr + ex * W2, s_ptr + ex * S2, z_ptr + ex * S2, n, mn, BND, I, G2, TPSD)
    tl.store(y_ptr + r * D + n, y.to(DT), mask=mn)
"""


def _steps(groups: int, tps: int) -> int:
    """Groups a step: tps (a power of two: tl.arange), at most the next power of two of `groups`
    (a last step past K is masked off)."""
    return min(next_pow2(tps), next_pow2(groups))


def fits(fmt: str, D: int, I: int, G1: int, G2: int) -> bool:
    """int4 codes in groups of whole words, 64 columns at least, dividing the rows."""
    return fmt == "int4" and not (G1 % 64 or G2 % 64 or D % G1 or I % G2)


def _blocks(asym: bool, target: str) -> dict:
    zero = "z = tl.load(z_ptr + n[:, None] * (K // G) + g[None, :], mask=mn[:, None] & mg[None, :], other=0).to(tl.int32)" \
        if asym else f"z = {2 ** (BITS['int4'] - 1)}"
    return {"zero": zero, "dp4a": _DP4A_OPS if target == "interpret" else _DP4A_ASM}


def decode_parts(D: int, I: int, G1: int, G2: int, asym: bool, target: str) -> tuple[str, dict]:
    """moe_decode's helpers for R = "a8" (DECODE, no header) and their constants: the tiles and
    steps of this module's grouped kernels, activations quantized in the kernels."""
    cfg = config("moe_gemm_q", target)
    consts = {"BN": min(cfg["BN_w4a8"], next_pow2(I)), "BND": min(cfg["BND_w4a8"], next_pow2(D)),
              "TPS": _steps(D // G1, cfg["TPS_w4a8"]), "TPSD": _steps(I // G2, cfg.get("TPSD_w4a8", cfg["TPS_w4a8"])),
              "FUSE": True}
    src = render("", DECODE, {}, **_blocks(asym, target)).split("\n\n\n", 1)[1].strip("\n")
    return src, consts


@functools.lru_cache(maxsize=None)
def specs(fmt: str, E: int, I: int, D: int, G1: int, G2: int, asym: bool, dtype: str,
          target: str) -> tuple[KernelSpec, ...] | None:
    """(quantization of x, of h, gate_up, down) for int4 codes in groups G1 (w13) and G2 (w2), or
    None where they do not fit (int4 only; groups of whole words, 64 columns at least). With
    `fuse_w4a8` (FUSE) gate_up and down quantize their rows' groups themselves, step by step (the
    same codes: two launches instead of four; the first two specs are then not launched)."""
    if not fits(fmt, D, I, G1, G2):
        return None
    cfg = config("moe_gemm_q", target)
    consts = {"E": E, "EP": next_pow2(E), "I": I, "D": D, "G1": G1, "G2": G2,
              "BN": min(cfg["BN_w4a8"], next_pow2(I)), "BND": min(cfg["BND_w4a8"], next_pow2(D)),
              "TPS": _steps(D // G1, cfg["TPS_w4a8"]), "TPSD": _steps(I // G2, cfg.get("TPSD_w4a8", cfg["TPS_w4a8"])),
              "W13": 2 * I * D // 8, "W2": D * I // 8, "S13": 2 * I * (D // G1), "S2": D * (I // G2),
              "FUSE": bool(cfg.get("fuse_w4a8", False)), "DT": TL_DTYPES[dtype]}
    src = render(f"quantized_grouped_swiglu_w4a8_{fmt}", _KERNELS, consts, **_blocks(asym, target))
    p, z = ptr_type(dtype), "*u8" if asym else ptr_type(dtype)
    acts = {"xe_ptr": "*i32", "xo_ptr": "*i32", "xs_ptr": "*fp32", "xz_ptr": "*i32"}
    weights = {"off_ptr": "*i64", "q_ptr": "*i32", "s_ptr": p, "z_ptr": z}
    mk = lambda name, sig, w, st=1: KernelSpec(f"{name}_{fmt}", name, src, sig, w, st, consts)  # noqa: E731
    return (mk("qmoe_a8_x", {"x_ptr": p, **acts}, 1), mk("qmoe_a8_h", {"x_ptr": p, **acts}, 1),
            mk("qmoe_a8_gate_up", {"x_ptr": p, **acts, **weights, "h_ptr": p}, cfg["warps_w4a8"], cfg["stages_w4a8"]),
            mk("qmoe_a8_down", {"h_ptr": p, "he_ptr": "*i32", "ho_ptr": "*i32", "hs_ptr": "*fp32", "hz_ptr": "*i32",
                                **weights, "y_ptr": p},
               cfg.get("warps_down_w4a8", cfg["warps_w4a8"]), cfg["stages_w4a8"]))


def grouped_swiglu(rows, offsets, q13, s13, q2, s2, z13, z2, kernels):
    """y [M, D] for the rows of expert e (offsets[e]:offsets[e+1]) through `kernels` (specs)."""
    quant_x, quant_h, gate_up, down = kernels
    c = gate_up.config
    (M, D), I, G1, G2, dev = rows.shape, c["I"], c["G1"], c["G2"], rows.device
    y = torch.empty(M, D, device=dev, dtype=rows.dtype)
    if not M:
        return y
    h = torch.empty(M, I, device=dev, dtype=rows.dtype)
    x = rows.contiguous()

    def acts(K, G):
        if c["FUSE"]:           # not read: the kernels quantize their groups themselves
            return (h,) * 4
        return (torch.empty(M, K // 8, device=dev, dtype=torch.int32), torch.empty(M, K // 8, device=dev, dtype=torch.int32),
                torch.empty(M, K // G, device=dev, dtype=torch.float32), torch.empty(M, K // G, device=dev, dtype=torch.int32))
    xa, ha = acts(D, G1), acts(I, G2)
    off = offsets.to(torch.int64).contiguous()
    s13, z13, s2, z2 = dequant.scale_operands(s13, s2, z13, z2, rows.dtype)
    if not c["FUSE"]:
        launch(quant_x, (M, D // G1), x, *xa)
    launch(gate_up, (-(-I // c["BN"]), M), x, *xa, off, dequant.as_words(q13), s13, z13, h)
    if not c["FUSE"]:
        launch(quant_h, (M, I // G2), h, *ha)
    launch(down, (-(-D // c["BND"]), M), h, *ha, off, dequant.as_words(q2), s2, z2, y)
    return y
