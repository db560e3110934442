"""Decode-sized int4 / int8 grouped SwiGLU on tensor cores (moe_quant.py dispatches here when
`rows_kernel` is "dot"): each expert's weights are read and dequantized once for all its rows.

Grid (N blocks, rows): the program of row r runs when r leads a block of BR rows of its expert
(r - offsets[e] a multiple of BR; the others return at once) and takes those rows together, so
the codes of an expert's N block are read once for up to BR rows (BR >= 16: the rows are the
MMA's N side, padded with masked rows). Per K tile (BK columns inside one quantization group)
the codes are read as 32-bit words, [BN, BK / NPW]; the NPW codes of a word are NPW "planes",
plane i holding input columns NPW j + i. Each plane is dequantized to (code - zero point) exactly
in the data dtype by the 2^23 mantissa trick (dequant.py) and multiplied by tl.dot with the
matching columns of the rows (read strided: a small gather, shared by gate and up); the NPW
products of a tile sum into one fp32 tile that the group's scale multiplies once per weight row. Nothing multiplies a code by an
activation on the CUDA cores and no code goes through an int->float conversion. TPS tiles are
loaded together per step (more bytes in flight per program).
"""
from __future__ import annotations

import functools

from kimi_graph.ops.quant import BITS

from . import dequant
from .codegen import TL_DTYPES, KernelSpec, next_pow2, render
from .elementwise import ptr_type
from .targets import config

_KERNELS = """
@triton.jit
def _expert_rows(off_ptr, r):
    # (expert e of row r, offsets[e], offsets[e + 1])
    e = tl.arange(0, EP)
    ends = tl.load(off_ptr + 1 + e, mask=e < E, other=0)
    ex = tl.sum(((ends <= r) & (e < E)).to(tl.int32), 0)
    return ex, tl.load(off_ptr + ex), tl.load(off_ptr + ex + 1)


$tile_dot


@triton.jit
def qdot_gate_up(x_ptr, off_ptr, q_ptr, s_ptr, z_ptr, h_ptr):
    # grid (I blocks, rows): h = silu(x w1^T) * (x w3^T) for the BR rows from row r of its expert
    r = tl.program_id(1)
    ex, lo, hi = _expert_rows(off_ptr, r)
    if (r - lo) % BR == 0:
        rr = r + tl.arange(0, BR)
        mrr = rr < hi
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = n < I
        wg = q_ptr + ex.to(tl.int64) * W13 + n[:, None] * (D // NPW)
        pg = ex * S13 + n * (D // G1)
        acc_g = tl.zeros((BN, BR), tl.float32)
        acc_u = tl.zeros((BN, BR), tl.float32)
        for k0 in range(0, D, BK * TPS):
            for t in tl.static_range(TPS):
                g, u = _tile_dot2(x_ptr, rr, mrr, D, k0 + t * BK, G1, BN, wg, s_ptr + pg, z_ptr + pg, mn,
                                  wg + I * (D // NPW), s_ptr + pg + I * (D // G1), z_ptr + pg + I * (D // G1), mn)
                acc_g += g
                acc_u += u
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h_ptr + rr[None, :] * I + n[:, None], h.to(DT), mask=mrr[None, :] & mn[:, None])


@triton.jit
def qdot_down(h_ptr, off_ptr, q_ptr, s_ptr, z_ptr, y_ptr):
    # grid (D blocks, rows): y = h w2^T for the BR rows from row r of its expert
    r = tl.program_id(1)
    ex, lo, hi = _expert_rows(off_ptr, r)
    if (r - lo) % BR == 0:
        rr = r + tl.arange(0, BR)
        mrr = rr < hi
        n = tl.program_id(0) * BND + tl.arange(0, BND)
        mn = n < D
        w = q_ptr + ex.to(tl.int64) * W2 + n[:, None] * (I // NPW)
        p = ex * S2 + n * (I // G2)
        acc = tl.zeros((BND, BR), tl.float32)
        for k0 in range(0, I, BK * TPSD):
            for t in tl.static_range(TPSD):
                acc += _tile_dot1(h_ptr, rr, mrr, I, k0 + t * BK, G2, BND, w, s_ptr + p, z_ptr + p, mn)
        tl.store(y_ptr + rr[None, :] * D + n[:, None], acc.to(DT), mask=mrr[None, :] & mn[:, None])
"""


def _tile_dot(fmt: str, asym: bool, mats: int) -> str:
    """`_tile_dot{mats}(x_ptr, rr, mrr, K, k0, G, NR, w, s_ptr, z_ptr, mn, ...)`: one K tile (BK
    columns from k0, inside one group) of the codes of NR weight rows (word pointers w [NR, 1]; for
    each of `mats` matrices: w, s_ptr, z_ptr, mn) times the rows rr of x ([., K]): [NR, BR] in
    fp32 per matrix, the group's scale (and zero point) applied per weight row."""
    b = BITS[fmt]
    mask, zero = (1 << b) - 1, 2.0 ** (b - 1)
    # the constant 2^23 kept in a register (see dequant._words_use)
    lines = ["j = tl.arange(0, BK // NPW)", "mgc = tl.program_id(2) + MAGIC"]
    for m in range(mats):
        lines += [f"c{m} = tl.load(w{m} + k0 // NPW + j[None, :], mask=mn{m}[:, None], other=0)",
                  f"hi{m} = c{m} >> 16",
                  f"z{m} = tl.load(z_ptr{m} + k0 // G, mask=mn{m}, other=0).to(tl.float32)[:, None]" if asym
                  else f"z{m} = {zero!r}",
                  f"acc{m} = tl.zeros((NR, BR), tl.float32)"]
    for i, (src, p) in enumerate(dequant._positions(fmt)):
        # plane i: columns NPW j + i of the rows, and of each matrix's codes
        lines.append(f"xi = tl.load(x_ptr + rr[None, :] * K + k0 + NPW * j[:, None] + {i}, mask=mrr[None, :], "
                     "other=0.0)")
        for m in range(mats):
            f = f"((({'c' if src == 'w' else 'hi'}{m}) & {mask << p}) | mgc).to(tl.float32, bitcast=True)"
            code = f"{f} * {2.0 ** -p!r} - ({2.0 ** (23 - p)!r} + z{m})" if p else f"{f} - ({2.0 ** 23!r} + z{m})"
            lines.append(f"acc{m} = tl.dot(({code}).to(DT), xi, acc{m}, input_precision=PREC)")
    outs = [f"acc{m} * tl.load(s_ptr{m} + k0 // G, mask=mn{m}, other=0.0).to(tl.float32)[:, None]"
            for m in range(mats)]
    args = ", ".join(f"w{m}, s_ptr{m}, z_ptr{m}, mn{m}" for m in range(mats))
    body = "\n".join("    " + ln for ln in lines + ["return " + ", ".join(outs)])
    return (f"@triton.jit\ndef _tile_dot{mats}(x_ptr, rr, mrr, K: tl.constexpr, k0, G: tl.constexpr, NR: tl.constexpr, "
            f"{args}):\n    # {fmt} codes{' with zero points' if asym else ''}\n{body}")


def _steps(K: int, BK: int, tps: int) -> int:
    """Tiles a step: at most tps, dividing K // BK."""
    return max(t for t in range(1, tps + 1) if (K // BK) % t == 0)


@functools.lru_cache(maxsize=None)
def specs(fmt: str, E: int, I: int, D: int, G1: int, G2: int, asym: bool, dtype: str,
          target: str) -> tuple[KernelSpec, KernelSpec] | None:
    """(gate_up, down) for `fmt` codes in groups G1 (w13) and G2 (w2), or None where they do not
    fit: K tiles of BK_dot columns (the group when smaller) inside one group, whole words, and
    MMA shapes (BK / NPW >= 16)."""
    if fmt not in ("int4", "int8"):
        return None
    cfg = config("moe_gemm_q", target)
    npw = dequant.words_per_code(fmt)
    BK = min(dequant.word_tile(fmt, cfg["BK_dot"]), G1, G2)
    if not (D % BK == 0 and I % BK == 0 and G1 % BK == 0 and G2 % BK == 0 and BK // npw >= 16
            and dequant.words_fit(fmt, [(D, G1, BK), (I, G2, BK)])):
        return None
    consts = {"E": E, "EP": next_pow2(E), "I": I, "D": D, "G1": G1, "G2": G2, "NPW": npw, "BK": BK,
              "BR": cfg["BR_dot"], "BN": min(cfg["BN_dot"], next_pow2(I)), "BND": min(cfg["BND_dot"], next_pow2(D)),
              "TPS": _steps(D, BK, cfg["TPS_dot"]), "TPSD": _steps(I, BK, cfg["TPS_dot"]),
              "W13": 2 * I * D // npw, "W2": D * I // npw, "S13": 2 * I * (D // G1), "S2": D * (I // G2),
              "DT": TL_DTYPES[dtype], "PREC": "ieee" if dtype == "f32" else "tf32"}
    src = render(f"quantized_grouped_swiglu_dot_{fmt}", _KERNELS, consts, tile_dot="MAGIC = tl.constexpr(%d)\n\n\n" % dequant.MAGIC + _tile_dot(fmt, asym, 1)
                 + "\n\n\n" + _tile_dot(fmt, asym, 2))
    p, z = ptr_type(dtype), "*u8" if asym else ptr_type(dtype)
    mk = lambda name, sig: KernelSpec(f"{name}_{fmt}", name, src, sig, cfg["warps_dot"],  # noqa: E731
                                      cfg["stages_dot"], consts)
    return (mk("qdot_gate_up", {"x_ptr": p, "off_ptr": "*i64", "q_ptr": "*i32", "s_ptr": p, "z_ptr": z, "h_ptr": p}),
            mk("qdot_down", {"h_ptr": p, "off_ptr": "*i64", "q_ptr": "*i32", "s_ptr": p, "z_ptr": z, "y_ptr": p}))
