"""Prefill-sized int4 / int8 grouped SwiGLU through dequantized weights (moe_quant.py dispatches
here from `dequant_min_rows` rows when the config sets it): the experts are taken
`dequant_experts` at a time; each pass writes those experts' weights in the activation dtype to
a scratch buffer (`dequant_experts`, one memory-bound pass over their codes; an expert with no
rows is skipped) and runs moe.py's bf16 grouped GEMMs over their rows, into one output.

A pass reads the codes once and the scratch once more in the GEMMs, where the dequantizing
main loop (moe_quant.specs) converts each weight tile once per row tile and N block; the scratch
holds `dequant_experts` experts (32 at the published widths: 453 MB in bf16). The weights are
the op library's `dequantize` to the bit: (code - zero point) x scale in fp32, rounded once to
the activation dtype."""
from __future__ import annotations

import functools

import torch

from kimi_graph.ops.quant import BITS, group_of

from . import dequant, moe
from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render
from .elementwise import ir_dtype, ptr_type
from .targets import config

_DEQUANT = """
@triton.jit
def _weight(c, n, col, mask, s_ptr, z_ptr, base):
    # (code - zero point) x the group's scale, in fp32
    g = base + n[:, None] * NG + col[None, :] // G
    s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
    if ASYM:
        z = tl.load(z_ptr + g, mask=mask, other=0).to(tl.float32)
    else:
        z = ZERO
    return (c.to(tl.float32) - z) * s


@triton.jit
def dequant_experts(q_ptr, s_ptr, z_ptr, off_ptr, e0, w_ptr):
    # grid (experts of the pass, N blocks): expert e0 + program 0's [N, K] weight in DT, its code
    # columns BC at a time (int4: a byte's low nibble is column 2j, its high one 2j + 1)
    e = tl.program_id(0)
    ge = e0 + e
    if tl.load(off_ptr + ge + 1) == tl.load(off_ptr + ge):
        return
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    mn = n < N
    row0 = ge.to(tl.int64) * N
    base = row0 * NG
    out = w_ptr + (e.to(tl.int64) * N + n[:, None]) * K
    for k0 in range(0, KC, BC):
        kc = k0 + tl.arange(0, BC)
        m2 = mn[:, None] & (kc < KC)[None, :]
        c = tl.load(q_ptr + (row0 + n[:, None]) * KC + kc[None, :], mask=m2, other=0).to(tl.int32)
        if INT4:
            lo = _weight(c & 15, n, 2 * kc, m2, s_ptr, z_ptr, base)
            hi = _weight((c >> 4) & 15, n, 2 * kc + 1, m2, s_ptr, z_ptr, base)
            tl.store(out + 2 * kc[None, :], lo.to(DT), mask=m2)
            tl.store(out + 2 * kc[None, :] + 1, hi.to(DT), mask=m2)
        else:
            tl.store(out + kc[None, :], _weight(c, n, kc, m2, s_ptr, z_ptr, base).to(DT), mask=m2)
"""


@functools.lru_cache(maxsize=None)
def dequant_spec(fmt: str, N: int, K: int, group_size: int, asym: bool, dtype: str, target: str) -> KernelSpec:
    """The kernel writing experts' [N, K] weights in `dtype` from their `fmt` codes ([E, N, K/2]
    bytes for int4, [E, N, K] for int8), scales [E, N, K/G] and zero points (u8, if asymmetric)."""
    if fmt not in BITS:
        raise ValueError(f"dequant_experts: int4 or int8 codes, not {fmt!r}")
    cfg = config("moe_gemm_q", target)
    G = group_of(fmt, K, group_size)
    KC = K // 2 if fmt == "int4" else K
    consts = {"N": N, "K": K, "KC": KC, "G": G, "NG": K // G, "INT4": fmt == "int4", "ASYM": asym,
              "ZERO": 2.0 ** (BITS[fmt] - 1), "BN": cfg["BN_dequant"],
              "BC": min(cfg["BC_dequant"], next_pow2(KC)), "DT": TL_DTYPES[dtype]}
    p = ptr_type(dtype)
    return KernelSpec(f"dequant_experts_{fmt}", "dequant_experts", render(f"dequant_experts_{fmt}", _DEQUANT, consts),
                      {"q_ptr": "*u8", "s_ptr": p, "z_ptr": "*u8" if asym else p, "off_ptr": "*i64", "e0": "i32",
                       "w_ptr": p}, cfg["warps_dequant"], 1, consts)


def dequant_specs(fmt: str, I: int, D: int, group_size: int, asym: bool, dtype: str, target: str) -> list[KernelSpec]:
    """The kernels writing w13 [2I, D] and w2 [D, I]."""
    return [dequant_spec(fmt, n, k, group_size, asym, dtype, target) for n, k in ((2 * I, D), (D, I))]


def specs(fmt: str, E: int, I: int, D: int, group_size: int, asym: bool, dtype: str, target: str) -> list[KernelSpec]:
    """The dequantizing kernels and the grouped GEMMs of a pass (and of the last, shorter one),
    for AOT builds."""
    step = min(E, config("moe_gemm_q", target)["dequant_experts"])
    passes = {step, E % step} - {0}
    return dequant_specs(fmt, I, D, group_size, asym, dtype, target) \
        + [s for n in sorted(passes) for size in moe.SIZES for s in moe.gemm_specs(n, I, D, dtype, size, target)]


def grouped_swiglu(rows, offsets, q13, s13, q2, s2, z13, z2, *, fmt: str, group_size: int, I: int, target: str):
    """quantized_grouped_swiglu over dequantized weights, `dequant_experts` experts a pass."""
    E, M, D = q13.shape[0], rows.shape[0], rows.shape[1]
    dt, step = rows.dtype, min(E, config("moe_gemm_q", target)["dequant_experts"])
    d13, d2 = dequant_specs(fmt, I, D, group_size, z13 is not None, ir_dtype(rows), target)
    w13 = torch.empty(step, 2 * I, D, device=rows.device, dtype=dt)
    w2 = torch.empty(step, D, I, device=rows.device, dtype=dt)
    y = torch.empty(M, D, device=rows.device, dtype=dt)
    h = torch.empty(M, I, device=rows.device, dtype=dt)
    if not M:
        return y
    off = offsets.to(torch.int64).contiguous()
    s13, z13, s2, z2 = dequant.scale_operands(s13, s2, z13, z2, dt)
    q13, q2 = q13.contiguous(), q2.contiguous()
    for e0 in range(0, E, step):
        n = min(step, E - e0)
        launch(d13, (n, -(-2 * I // d13.config["BN"])), q13, s13, z13, off, e0, w13)
        launch(d2, (n, -(-D // d2.config["BN"])), q2, s2, z2, off, e0, w2)
        # the pass's rows by expert (absolute rows: the GEMMs read and write only those); tiles
        # sized for its share of the rows
        moe.swiglu_into(rows, off[e0:e0 + n + 1], w13[:n], w2[:n], y, h, M * n // E)
    return y
