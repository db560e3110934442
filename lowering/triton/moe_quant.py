"""The quantized grouped SwiGLU (quantized_grouped_swiglu, formats in kimi_graph/ops/quant.py):
weights stay in their low-bit codes in memory and are dequantized to the activation dtype
inside the main loop, one K tile at a time.

Grid (N blocks, experts): a program takes one expert's rows (offsets[e]:offsets[e+1]), BM at a
time, for BN output columns; experts with no rows return at once. K tiles never straddle a
quantization group (BK divides G), so a tile's scale (and zero point) is one value per
column and multiplies the tile's dot product instead of every weight:
- int4: each byte holds k = 2j (low nibble) and 2j+1; the tile is two dots, even input
  columns with the low nibbles and odd ones with the high, each (code - zero point) exact
  in bf16;
- int8: one dot over (code - zero point);
- fp8: on targets with fp8 tensor cores (sm_89, sm_90) and prefill-sized tiles, the
  activations are quantized too, per row and K tile (scale = max|x| / 448, e4m3), and the
  dot runs in fp8 (W8A8: an approximation of the weight-only reference, about 2^-4 relative
  per activation): `fp8_dot` "w8a8" takes moe_fp8.py's kernels (activations quantized
  outside the main loops, a device-side tile map), True quantizes each activation tile
  inside this kernel's loop; otherwise the codes are converted to the activation dtype
  (weight-only).
The gate and up projections share one pass (SiLU * up in the epilogue), then the down
projection, as the bf16 kernel in moe.py.

Decode-sized calls (at most `rows_max` rows: 16 tokens at top-8) of int4 / int8 take `row_specs`
instead: one program per (N block, row), the row's expert found in the offsets, its weight rows
streamed as 32-bit words and dotted with the row (dequant.py, the loops of moe_decode's experts
by id): the weights of the few experts touched are spread over all SMs rather than over one
program per expert and N block, and no code is converted by an int->float instruction.
"""
from __future__ import annotations

import functools

import torch

from kimi_graph.ops.quant import BITS, group_of, weight_shape

from . import dequant, moe_dequant, moe_fp8, moe_permute, moe_w4a8
from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render
from .elementwise import ir_dtype, ptr_type
from .targets import TARGETS, config, current_target

_GEMM = """
@triton.jit
def qmoe_gate_up(x_ptr, off_ptr, q_ptr, s_ptr, z_ptr, h_ptr):
    # grid (I blocks, experts): h = silu(x w1^T) * (x w3^T) for expert e's rows
    $head_gate_up
    for r0 in range(lo, hi, BM):
        r = r0 + tl.arange(0, BM)
        mr = r < hi
        acc_g = tl.zeros((BM, BN), tl.float32)
        acc_u = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, D, BK):
            $gate_up
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h_ptr + r[:, None] * I + n[None, :], h.to(DT), mask=mr[:, None] & mn[None, :])


@triton.jit
def qmoe_down(h_ptr, off_ptr, q_ptr, s_ptr, z_ptr, y_ptr):
    # grid (D blocks, experts): y = h w2^T for expert e's rows
    $head_down
    for r0 in range(lo, hi, BM):
        r = r0 + tl.arange(0, BM)
        mr = r < hi
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, I, BK2):
            $down
        tl.store(y_ptr + r[:, None] * D + n[None, :], acc.to(DT), mask=mr[:, None] & mn[None, :])
"""


def _head(N: str, codes_per_expert: str, scales_per_expert: str) -> str:
    """Expert e's row range, the program's N columns and its weights' base pointers."""
    return "\n".join([
        "ex = tl.program_id(1)", "lo = tl.load(off_ptr + ex)", "hi = tl.load(off_ptr + ex + 1)",
        "n = tl.program_id(0) * BN + tl.arange(0, BN)", f"mn = n < {N}",
        f"qb = q_ptr + ex.to(tl.int64) * ({codes_per_expert})",
        f"sb = s_ptr + ex.to(tl.int64) * {scales_per_expert}",
        f"zb = z_ptr + ex.to(tl.int64) * {scales_per_expert}"])


def _x_loads(a: str, K: int, BK: int, fmt: str, fp8_act: bool) -> list[str]:
    """Load the activation tile(s) of one K step from `a`_ptr ([M, K] row-major)."""
    if fmt == "int4":
        return [f"dk = tl.arange(0, {BK // 2})",
                f"xe = tl.load({a}_ptr + r[:, None] * {K} + k0 + 2 * dk[None, :], mask=mr[:, None], other=0.0)",
                f"xo = tl.load({a}_ptr + r[:, None] * {K} + k0 + 2 * dk[None, :] + 1, mask=mr[:, None], other=0.0)"]
    lines = [f"dk = tl.arange(0, {BK})",
             f"x = tl.load({a}_ptr + r[:, None] * {K} + k0 + dk[None, :], mask=mr[:, None], other=0.0)"]
    if fp8_act:     # per row and tile: x = xq * xs
        lines += ["xs = tl.maximum(tl.max(tl.abs(x.to(tl.float32)), 1), 1e-30) / 448.0",
                  "xq = (x.to(tl.float32) / xs[:, None]).to(tl.float8e4nv)"]
    return lines


def _w_step(acc: str, rows: str, K: int, G: int, fmt: str, asym: bool, fp8_act: bool) -> list[str]:
    """Accumulate one K tile of weight rows `rows` (the columns of the output) into `acc`."""
    if fmt == "fp8":
        nkb = -(-K // G)
        lines = [f"c = tl.load(qb + {rows}[None, :] * {K} + k0 + dk[:, None], mask=mn[None, :], other=0.0)",
                 f"s = tl.load(sb + ({rows} // {G}) * {nkb} + k0 // {G}, mask=mn, other=0.0).to(tl.float32)"]
        if fp8_act:
            return lines + [f"{acc} += tl.dot(xq, c) * xs[:, None] * s[None, :]"]
        return lines + [f"{acc} += tl.dot(x, c.to(DT), input_precision=PREC) * s[None, :]"]
    ng = K // G
    lines = [f"s = tl.load(sb + {rows} * {ng} + k0 // {G}, mask=mn, other=0.0).to(tl.float32)",
             f"z = tl.load(zb + {rows} * {ng} + k0 // {G}, mask=mn, other=0).to(tl.float32)" if asym
             else f"z = {128.0 if fmt == 'int8' else 8.0}"]
    zz = "z[None, :]" if asym else "z"
    if fmt == "int8":
        return lines + [f"c = tl.load(qb + {rows}[None, :] * {K} + k0 + dk[:, None], mask=mn[None, :], other=0)",
                        f"{acc} += tl.dot(x, (c.to(tl.float32) - {zz}).to(DT), input_precision=PREC) * s[None, :]"]
    return lines + [
        f"c = tl.load(qb + {rows}[None, :] * {K // 2} + k0 // 2 + dk[:, None], mask=mn[None, :], other=0)",
        f"wl = ((c & 15).to(tl.float32) - {zz}).to(DT)",
        f"wh = ((c >> 4).to(tl.float32) - {zz}).to(DT)",
        f"{acc} += (tl.dot(xe, wl, input_precision=PREC) + tl.dot(xo, wh, input_precision=PREC)) * s[None, :]"]


def tile_k(fmt: str, K: int, G: int, BK: int) -> int | None:
    """The K tile: BK, or the group when smaller; None when no tile fits (the kernel needs K
    to be a multiple of a tile that divides the group, and dots of >= 16)."""
    bk = min(BK, G) if fmt != "fp8" else BK
    if fmt == "fp8":
        while bk > 16 and (G % bk or K % bk):
            bk //= 2
    if K % bk or G % bk or bk < (32 if fmt == "int4" else 16):
        return None
    return bk


CODE_PTR = {"int4": "*u8", "int8": "*u8", "fp8": "*fp8e4nv"}


def has_e4m3(target: str) -> bool:
    """Does Triton have the fp8 e4m3 type on `target`? (sm_89 on, and the interpreter)"""
    return (TARGETS[target]["arch"] or 89) >= 89


@functools.lru_cache(maxsize=None)
def specs(fmt: str, E: int, I: int, D: int, group_size: int, asym: bool, dtype: str, small: bool,
          target: str) -> tuple[KernelSpec, KernelSpec] | None:
    """(gate_up, down) kernels for one shape and format, or None when the tiles do not fit
    or the target has no fp8 (the op's reference runs then)."""
    cfg = config("moe_gemm_q", target)
    sfx = "_small" if small else ""
    BM, BN, BK = cfg["BM" + sfx], cfg["BN" + sfx], cfg["BK" + sfx]
    G1, G2 = group_of(fmt, D, group_size), group_of(fmt, I, group_size)
    bk1, bk2 = tile_k(fmt, D, G1, BK), tile_k(fmt, I, G2, BK)
    if bk1 is None or bk2 is None or (fmt == "fp8" and not has_e4m3(target)):
        return None
    fp8_act = fmt == "fp8" and not small and cfg["fp8_dot"] is True and dtype != "f32"
    if fmt == "fp8":            # a weight tile lies in one G x G block
        BN = min(BN, G1, G2)
    qd = D // 2 if fmt == "int4" else D
    qi = I // 2 if fmt == "int4" else I
    sd = 2 * I * (D // G1) if fmt != "fp8" else -(-2 * I // G1) * -(-D // G1)
    si = D * (I // G2) if fmt != "fp8" else -(-D // G2) * -(-I // G2)
    consts = {"I": I, "D": D, "QD": qd, "QI": qi, "SD": sd, "SI": si, "BM": BM, "BN": BN, "BK": bk1,
              "BK2": bk2, "DT": TL_DTYPES[dtype], "PREC": "ieee" if dtype == "f32" else "tf32"}
    gate_up = _x_loads("x", D, bk1, fmt, fp8_act) + _w_step("acc_g", "n", D, G1, fmt, asym, fp8_act) \
        + _w_step("acc_u", "(n + I)", D, G1, fmt, asym, fp8_act)
    down = _x_loads("h", I, bk2, fmt, fp8_act) + _w_step("acc", "n", I, G2, fmt, asym, fp8_act)
    src = render(f"quantized_grouped_swiglu_{fmt}", _GEMM, consts, gate_up="\n".join(gate_up),
                 down="\n".join(down), head_gate_up=_head("I", "2 * I * QD", "SD"),
                 head_down=_head("D", "D * QI", "SI"))
    p, q = ptr_type(dtype), CODE_PTR[fmt]
    z = "*u8" if asym else p
    mk = lambda name, sig: KernelSpec(f"{name}_{fmt}", name, src, sig, cfg["num_warps"],  # noqa: E731
                                      cfg["num_stages"], {**consts, "fp8_act": fp8_act})
    return (mk("qmoe_gate_up", {"x_ptr": p, "off_ptr": "*i64", "q_ptr": q, "s_ptr": p, "z_ptr": z, "h_ptr": p}),
            mk("qmoe_down", {"h_ptr": p, "off_ptr": "*i64", "q_ptr": q, "s_ptr": p, "z_ptr": z, "y_ptr": p}))


_ROWS = moe_w4a8.EXPERT_OF + """

@triton.jit
def qmoe_rows_gate_up(x_ptr, off_ptr, q_ptr, s_ptr, z_ptr, h_ptr):
    # grid (I blocks, rows): h[r] = silu(x[r] w1_e^T) * (x[r] w3_e^T) for BN columns, e = r's expert
    r = tl.program_id(1)
    ex = _expert_of(off_ptr, r)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    mn = n < I
    wb = q_ptr + ex * W13
    h = _swiglu_rows_q(x_ptr + r.to(tl.int64) * D, wb, wb, s_ptr + ex * S13, z_ptr + ex * S13, n, n + I, mn, False)
    tl.store(h_ptr + r.to(tl.int64) * I + n, h.to(DT), mask=mn)


@triton.jit
def qmoe_rows_down(h_ptr, off_ptr, q_ptr, s_ptr, z_ptr, y_ptr):
    # grid (D blocks, rows): y[r] = h[r] w2_e^T for BND columns, e = r's expert
    r = tl.program_id(1)
    ex = _expert_of(off_ptr, r)
    n = tl.program_id(0) * BND + tl.arange(0, BND)
    mn = n < D
    y = _rows_dot_q(h_ptr + r.to(tl.int64) * I, q_ptr + ex * W2, s_ptr + ex * S2, z_ptr + ex * S2, n, mn, I, G2)
    tl.store(y_ptr + r.to(tl.int64) * D + n, y.to(DT), mask=mn)
"""


@functools.lru_cache(maxsize=None)
def row_specs(fmt: str, E: int, I: int, D: int, group_size: int, asym: bool, dtype: str,
              target: str) -> tuple[KernelSpec, KernelSpec] | None:
    """(gate_up, down) per-row kernels of decode-sized calls, or None where the codes do not
    read as words (fp8; rows, groups or tiles not whole words)."""
    cfg = config("moe_gemm_q", target)
    G1, G2 = group_of(fmt, D, group_size), group_of(fmt, I, group_size)
    if fmt not in ("int4", "int8"):
        return None
    BK = min(dequant.word_tile(fmt, cfg["BK_rows"]), next_pow2(D))
    BKD = min(dequant.word_tile(fmt, cfg["BKD_rows"]), next_pow2(I))
    if not dequant.words_fit(fmt, [(D, G1, BK), (I, G2, BKD)]):
        return None
    npw = dequant.words_per_code(fmt)
    consts = {"E": E, "EP": next_pow2(E), "I": I, "D": D, "BN": min(cfg["BN_rows"], next_pow2(I)), "BK": BK,
              "BND": min(cfg["BND_rows"], next_pow2(D)), "BKD": BKD, "G1": G1, "G2": G2, "NPW": npw,
              "W13": 2 * I * D // npw, "W2": D * I // npw, "S13": 2 * I * (D // G1), "S2": D * (I // G2),
              "DT": TL_DTYPES[dtype]}
    src = render(f"quantized_grouped_swiglu_rows_{fmt}", dequant.loader(fmt, asym, True) + dequant.helpers(True, cfg["prefetch_rows"]) + _ROWS,
                 consts)
    p, z = ptr_type(dtype), "*u8" if asym else ptr_type(dtype)
    mk = lambda name, sig: KernelSpec(f"{name}_{fmt}", name, src, sig, cfg["warps_rows"],  # noqa: E731
                                      cfg["stages_rows"], consts)
    return (mk("qmoe_rows_gate_up", {"x_ptr": p, "off_ptr": "*i64", "q_ptr": "*i32", "s_ptr": p, "z_ptr": z, "h_ptr": p}),
            mk("qmoe_rows_down", {"h_ptr": p, "off_ptr": "*i64", "q_ptr": "*i32", "s_ptr": p, "z_ptr": z, "y_ptr": p}))


def quantized_grouped_swiglu(rows, offsets, q13, s13, q2, s2, z13=None, z2=None, *, fmt: str,
                             group_size: int = 128):
    """For the rows of expert e (offsets[e]:offsets[e+1]): w2_e (silu(w1_e x) * w3_e x) with
    w13 and w2 in `fmt` codes; None when no kernel fits the shapes (see `specs`)."""
    E, M, D = q13.shape[0], rows.shape[0], rows.shape[1]
    I = weight_shape(fmt, q2.shape)[2]
    dt, target = ir_dtype(rows), current_target()
    cfg = config("moe_gemm_q", target)
    per_row = _per_row(fmt, M, E, I, D, group_size, z13 is not None, dt, target)
    w8a8 = _w8a8_for(fmt, M, q13, q2, z13, group_size, dt, target)
    if w8a8 is not None:
        return moe_fp8.grouped_swiglu(rows, offsets, q13, s13, q2, s2, w8a8)
    if not per_row and fmt in BITS and 0 < dequant_min_rows(cfg, fmt) <= M:
        return moe_dequant.grouped_swiglu(rows, offsets, q13, s13, q2, s2, z13, z2, fmt=fmt, group_size=group_size,
                                          I=I, target=target)
    a8 = w4a8_specs(fmt, E, I, D, group_size, z13 is not None, dt, target) if per_row else None
    if a8 is not None:
        return moe_w4a8.grouped_swiglu(rows, offsets, q13, s13, q2, s2, z13, z2, a8)
    kernels = row_specs(fmt, E, I, D, group_size, z13 is not None, dt, target) if per_row else \
        specs(fmt, E, I, D, group_size, z13 is not None, dt, M <= 256, target)
    if kernels is None:
        return None
    if per_row:             # (N blocks, rows); the codes as 32-bit words
        return _rows_launch(kernels, rows, offsets, q13, s13, q2, s2, z13, z2, "BN", "BND")
    return _rows_launch(kernels, rows, offsets, q13, s13, q2, s2, z13, z2, "BN", "BN", E)


def _per_row(fmt, M, E, I, D, group_size, asym, dt, target) -> bool:
    """Do M rows take the per-row kernels (up to rows_max, where they fit)?"""
    cfg = config("moe_gemm_q", target)
    return M <= cfg.get(f"rows_max_{fmt}", cfg["rows_max"]) and \
        row_specs(fmt, E, I, D, group_size, asym, dt, target) is not None


def _w8a8_for(fmt, M, q13, q2, z13, group_size, dt, target):
    """moe_fp8's kernels for M prefill-sized rows (more than 256, not per row, symmetric), or None."""
    E, D = q13.shape[0], q13.shape[2]
    I = weight_shape(fmt, q2.shape)[2]
    if M <= 256 or z13 is not None or _per_row(fmt, M, E, I, D, group_size, False, dt, target):
        return None
    return w8a8_specs(fmt, E, I, D, group_size, dt, target)


def _rows_launch(kernels, rows, offsets, q13, s13, q2, s2, z13, z2, bn: str, bnd: str, experts: int = 0):
    """gate_up then down over grids (N blocks of the configs' `bn` / `bnd`, rows), or (N blocks,
    experts) given `experts` (the codes as bytes; else as 32-bit words)."""
    gate_up, down = kernels
    c, (M, D), I = gate_up.config, rows.shape, gate_up.config["I"]
    h = torch.empty(M, I, device=rows.device, dtype=rows.dtype)
    y = torch.empty(M, D, device=rows.device, dtype=rows.dtype)
    if M:
        off = offsets.to(torch.int64).contiguous()
        s13, z13, s2, z2 = dequant.scale_operands(s13, s2, z13, z2, rows.dtype)
        codes = (lambda q: q.contiguous()) if experts else dequant.as_words
        launch(gate_up, (-(-I // c[bn]), experts or M), rows.contiguous(), off, codes(q13), s13, z13, h)
        launch(down, (-(-D // c[bnd]), experts or M), h, off, codes(q2), s2, z2, y)
    return y


def w4a8_specs(fmt: str, E: int, I: int, D: int, group_size: int, asym: bool, dtype: str, target: str):
    """moe_w4a8's kernels (int4 with int8 activations) for decode-sized calls where `rows_kernel`
    is "w4a8" and they fit, else None (the per-row word kernels run then)."""
    if config("moe_gemm_q", target)["rows_kernel"] != "w4a8":
        return None
    return moe_w4a8.specs(fmt, E, I, D, group_of(fmt, D, group_size), group_of(fmt, I, group_size), asym, dtype,
                          target)


def w8a8_specs(fmt: str, E: int, I: int, D: int, group_size: int, dtype: str, target: str):
    """moe_fp8's kernels for prefill-sized fp8 calls where `fp8_dot` is "w8a8" and they fit, else
    None. Float32 graphs keep weight-only fp8 on GPUs; the interpreter (fp32 only) takes W8A8 too
    so that it can be tested."""
    if fmt != "fp8" or config("moe_gemm_q", target)["fp8_dot"] != "w8a8" or not has_e4m3(target) \
            or (dtype == "f32" and target != "interpret"):
        return None
    return moe_fp8.specs(E, I, D, group_of(fmt, D, group_size), group_of(fmt, I, group_size), dtype, target)


def quantized_moe_experts(x, ids, weights, q13, s13, q2, s2, acc, z13=None, z2=None, *, fmt: str,
                          group_size: int = 128):
    """quantized_moe_experts through the permutation: moe_permute -> quantized_grouped_swiglu
    (the op's reference where no kernel fits) -> moe_unpermute (moe_decode reads a decode-sized
    batch's experts by id instead). fp8 on the W8A8 kernels quantizes the tokens before the
    permutation and gathers their codes and scales (the same codes as quantizing the permuted
    rows: each copy is its token's row), so the pass reads N rows, not N * top_k."""
    w8a8 = _w8a8_for(fmt, ids.numel(), q13, q2, z13, group_size, ir_dtype(x), current_target())
    if w8a8 is not None:
        offsets, order = moe_permute.moe_sort(ids, q13.shape[0])
        y = moe_fp8.grouped_swiglu_tokens(x.reshape(-1, x.shape[-1]), order // ids.shape[-1], offsets,
                                          q13, s13, q2, s2, w8a8)
        return moe_permute.moe_unpermute(y, order, weights, acc)
    rows, offsets, order = moe_permute.moe_permute(x, ids, q13.shape[0])
    args = [rows, offsets, q13, s13, q2, s2] + ([z13, z2] if z13 is not None else [])
    y = op_quantized_grouped_swiglu(args, {"format": fmt, "group_size": group_size})[0]
    return moe_permute.moe_unpermute(y, order, weights, acc)


def op_quantized_grouped_swiglu(args, attrs):
    fmt, group = attrs["format"], attrs["group_size"]
    y = quantized_grouped_swiglu(*args, fmt=fmt, group_size=group)
    if y is None:
        from kimi_graph.ops import get_op
        return get_op("quantized_grouped_swiglu").ref(args, attrs)
    return [y]


def specs_for(kind, ins, outs, attrs, target):
    rows, q13, q2 = ins[0], ins[2], ins[4]
    fmt = attrs["format"]
    I = weight_shape(fmt, q2.shape)[2]
    asym = len(ins) > 6
    E, D, G = q13.shape[0], rows.shape[-1], attrs["group_size"]      # rows: [..., D] (x of a chain)
    return [s for small in (True, False) for s in specs(fmt, E, I, D, G, asym, rows.dtype, small, target) or ()] \
        + list(row_specs(fmt, E, I, D, G, asym, rows.dtype, target) or ()) \
        + list(w8a8_specs(fmt, E, I, D, G, rows.dtype, target) or ()) \
        + list(w4a8_specs(fmt, E, I, D, G, asym, rows.dtype, target) or ()) \
        + (moe_dequant.specs(fmt, E, I, D, G, asym, rows.dtype, target)
           if fmt in BITS and dequant_min_rows(config("moe_gemm_q", target), fmt) else [])


def dequant_min_rows(cfg: dict, fmt: str) -> int:
    """Rows from which `fmt` experts take moe_dequant's passes (dequant_min_rows_FMT, else dequant_min_rows; 0: never)."""
    return int(cfg.get(f"dequant_min_rows_{fmt}", cfg["dequant_min_rows"]))


def chain_specs(ins, attrs, target) -> list[KernelSpec]:
    """quantized_moe_experts' permuted path (`quantized_moe_experts`), for AOT builds."""
    x, ids, w, q13, s13, q2, s2 = ins[:7]
    E = q13.shape[0]
    return (moe_permute.specs(x, ids, {"num_experts": E}, target)
            + (moe_permute.sort_specs(E, ids.shape[-1], target) if attrs["format"] == "fp8" else [])   # W8A8's sort
            + specs_for("quantized_grouped_swiglu", [x, None, q13, s13, q2, s2] + list(ins[8:]), [], attrs, target)
            + list(moe_permute.unpermute_specs(x.shape[-1], ids.shape[-1], x.dtype, w.dtype, target)))
