"""fp8 experts on fp8 tensor cores (W8A8, DeepSeek-V3's block scaling): the prefill-sized form of
the quantized grouped SwiGLU for fp8 codes (moe_quant.py dispatches here).

Weights are e4m3 codes with one scale per G x G block (kimi_graph/ops/quant.py); activations are
quantized to e4m3 with one fp32 scale per row and K tile (BK columns, BK dividing G), outside the
GEMMs' main loops:
- `qmoe_fp8_rows`: the rows x before gate_up, in one pass (scale = max|x| / 448);
- gate_up's epilogue quantizes h = silu(x w1^T) * (x w3^T) per row and HB columns as it stores it
  (h never exists in the activation dtype): the down projection's K tile is HB, gate_up's BN or
  two of its N tiles computed in turn by one program (`h_halves_w8a8`: down's scale steps halved
  while gate_up keeps its tile).
In the main loops both operands are fp8 in memory and go straight to the MMA (fp32 accumulation);
a K step's partial product is scaled once, by the row's activation scale times the weight block's
scale (one scalar: a program's BN columns lie in one block, BN dividing G), and added to the
accumulator. Programs take (N block, row tile) from moe.py's device-side tile map, so every tile
of every expert is a program and neighbouring programs share the row tile (L2 reuse). With
`tma_w8a8` (sm_90+) the operand tiles come through host tensor descriptors (TMA) instead of
pointer loads: rows past a tile's expert are the next expert's (their outputs masked off).

e4m3 rounding: values are rounded to the e4m3 grid in fp32 (ties to even, as torch's
float8_e4m3fn cast) before the conversion, which is then exact (Triton's interpreter rounds
some values that cross a power of two wrongly in its own conversion).
"""
from __future__ import annotations

import functools
import re

import torch

from . import moe
from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render
from .elementwise import ptr_type
from .targets import TARGETS, config

E4M3_MAX = 448.0

_KERNELS = """
@triton.jit
def _e4m3(v):
    # v (fp32, |v| <= 448) as e4m3 (round to nearest, ties to even): 3 mantissa bits kept in
    # fp32; below 2^-6 (subnormal e4m3) multiples of 2^-9, by adding and removing 1.5 * 2^14
    u = v.to(tl.int32, bitcast=True)
    nrm = ((u + 0x7FFFF + ((u >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    sub = (v + 24576.0) - 24576.0
    return tl.where(tl.abs(v) < 0.015625, sub, nrm).to(tl.float8e4nv)


@triton.jit
def _row_scale(amax):
    # the e4m3 scale of rows whose largest magnitude is amax
    return tl.maximum(amax, 1e-30) / 448.0


@triton.jit
def _quantize_rows(v):
    # v [R, C] fp32 -> (e4m3 codes, fp32 scale per row): v = codes * scale
    s = _row_scale(tl.max(tl.abs(v), 1))
    return _e4m3(v / s[:, None]), s


@triton.jit
def qmoe_fp8_rows(x_ptr, xq_ptr, xs_ptr, M):
    # grid (row blocks of QR, groups of QK K tiles): x [M, D] -> e4m3 xq [M, D] and fp32 scales
    # xs [M, D // BK]; a program's QK tiles unrolled (their loads in flight together)
    r = tl.program_id(0) * QR + tl.arange(0, QR)
    mr = r < M
    for j in tl.static_range(QK):
        kt = tl.program_id(1) * QK + j
        at = r.to(tl.int64)[:, None] * D + kt * BK + tl.arange(0, BK)[None, :]
        x = tl.load(x_ptr + at, mask=mr[:, None], other=0.0).to(tl.float32)
        q, s = _quantize_rows(x)
        tl.store(xq_ptr + at, q, mask=mr[:, None])
        tl.store(xs_ptr + r * (D // BK) + kt, s, mask=mr)


@triton.jit
def _row_tile(off_ptr, tile_e_ptr, tile_r_ptr):
    # program_id(1)'s row tile (moe.py's tile map): its expert (-1: none), first row, BM rows and
    # which of them are the expert's
    ex = tl.load(tile_e_ptr + tl.program_id(1))
    r0 = tl.load(tile_r_ptr + tl.program_id(1))
    r = r0 + tl.arange(0, BM)
    return ex, r0, r, r < tl.load(off_ptr + ex + 1)


@triton.jit
def _gate_up_cols(xq_ptr, xs_ptr, q_ptr, s_ptr, ex, r0, r, mr, n0$descs_gate_up):
    # h = silu(x w1^T) * (x w3^T) [BM, BN] in fp32 for expert ex's row tile and columns n0..
    n = n0 + tl.arange(0, BN)
    dk = tl.arange(0, BK)
    qb = q_ptr + ex.to(tl.int64) * (2 * I * D)
    wn = ex * (2 * I) + n0                            # the gate rows' first in the descriptor's [E * 2I, D]
    sg = s_ptr + ex * SD + (n0 // G1) * NKB1          # the weight blocks' scales of these columns
    su = s_ptr + ex * SD + ((n0 + I) // G1) * NKB1
    acc_g = tl.zeros((BM, BN), tl.float32)
    acc_u = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, D, BK):
        if TMA:     # rows past the expert are the next one's (or zeros past M): masked outputs
            x = xd.load([r0, k0])
            w1 = wd.load([wn, k0]).T
            w3 = wd.load([wn + I, k0]).T
        else:
            x = tl.load(xq_ptr + r[:, None] * D + k0 + dk[None, :], mask=mr[:, None], other=0.0)
            w1 = tl.load(qb + n[None, :] * D + k0 + dk[:, None])
            w3 = tl.load(qb + (n[None, :] + I) * D + k0 + dk[:, None])
        xs = tl.load(xs_ptr + r * (D // BK) + k0 // BK, mask=mr, other=0.0)
        acc_g += tl.dot(x, w1) * (xs * tl.load(sg + k0 // G1).to(tl.float32))[:, None]
        acc_u += tl.dot(x, w3) * (xs * tl.load(su + k0 // G1).to(tl.float32))[:, None]
    return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u


@triton.jit
def qmoe_fp8_gate_up(xq_ptr, xs_ptr, off_ptr, q_ptr, s_ptr, hq_ptr, hs_ptr, tile_e_ptr, tile_r_ptr$descs_gate_up):
    # grid (I blocks of HB, tiles): h for one expert's row tile, stored as e4m3 with a scale per
    # row and HB columns (down's K tile); HB = 2 BN: two BN halves in turn, one scale over both.
    # H_PASS (grid: I blocks of BN): h stored in DT for the rows pass to quantize
    ex, r0, r, mr = _row_tile(off_ptr, tile_e_ptr, tile_r_ptr)
    if ex >= 0:
        n0 = tl.program_id(0) * (BN if H_PASS else HB)
        n = n0 + tl.arange(0, BN)
        h = _gate_up_cols(xq_ptr, xs_ptr, q_ptr, s_ptr, ex, r0, r, mr, n0$descs_gate_up)
        hp = hs_ptr + r * (I // HB) + tl.program_id(0)
        if H_PASS:                      # h in the activation dtype: a pass quantizes it (per HB)
            tl.store(hq_ptr + r[:, None] * I + n[None, :], h.to(DT), mask=mr[:, None])
        elif HB == BN:
            hq, hs = _quantize_rows(h)
            tl.store(hq_ptr + r[:, None] * I + n[None, :], hq, mask=mr[:, None])
            tl.store(hp, hs, mask=mr)
        else:
            h2 = _gate_up_cols(xq_ptr, xs_ptr, q_ptr, s_ptr, ex, r0, r, mr, n0 + BN$descs_gate_up)
            hs = _row_scale(tl.maximum(tl.max(tl.abs(h), 1), tl.max(tl.abs(h2), 1)))
            tl.store(hq_ptr + r[:, None] * I + n[None, :], _e4m3(h / hs[:, None]), mask=mr[:, None])
            tl.store(hq_ptr + r[:, None] * I + BN + n[None, :], _e4m3(h2 / hs[:, None]), mask=mr[:, None])
            tl.store(hp, hs, mask=mr)


@triton.jit
def qmoe_fp8_down(hq_ptr, hs_ptr, off_ptr, q_ptr, s_ptr, y_ptr, tile_e_ptr, tile_r_ptr$descs_down):
    # grid (D blocks, tiles): y = h w2^T for one expert's row tile; h's K tiles are its scale blocks (HB)
    ex, r0, r, mr = _row_tile(off_ptr, tile_e_ptr, tile_r_ptr)
    if ex >= 0:
        n0 = tl.program_id(0) * BND
        n = n0 + tl.arange(0, BND)
        mn = n < D
        dk = tl.arange(0, HB)
        qb = q_ptr + ex.to(tl.int64) * (D * I)
        sb = s_ptr + ex * SI + (n0 // G2) * NKB2
        acc = tl.zeros((BM, BND), tl.float32)
        for k0 in range(0, I, HB):
            if TMA:     # rows past the expert: masked outputs; D rows past the expert: the next one's
                h = hd.load([r0, k0])
                w = wd.load([ex * D + n0, k0]).T
            else:
                h = tl.load(hq_ptr + r[:, None] * I + k0 + dk[None, :], mask=mr[:, None], other=0.0)
                w = tl.load(qb + n[None, :] * I + k0 + dk[:, None], mask=mn[None, :], other=0.0)
            hs = tl.load(hs_ptr + r * (I // HB) + k0 // HB, mask=mr, other=0.0)
            acc += tl.dot(h, w) * (hs * tl.load(sb + k0 // G2).to(tl.float32))[:, None]
        tl.store(y_ptr + r[:, None] * D + n[None, :], acc.to(DT), mask=mr[:, None] & mn[None, :])
"""


def tiles(I: int, D: int, G1: int, G2: int, target: str) -> dict | None:
    """The W8A8 tiles (config keys *_w8a8) for these shapes, or None where they do not fit: K
    tiles dividing K and the blocks, N tiles inside one block (their scale is one scalar). HB:
    h's scale block and down's K tile, gate_up's BN or (h_halves_w8a8, h_pass_w8a8, where two fit
    I and w2's blocks) two of them;
    BMD: down's row tile (BMD_w8a8, 0: gate_up's BM)."""
    cfg = config("moe_gemm_q", target)
    t = {k: cfg[k + "_w8a8"] for k in ("BM", "BN", "BK", "BND")}
    t["BMD"] = cfg.get("BMD_w8a8") or t["BM"]
    bad = {k: v for k, v in {**t, "QR": cfg["QR_w8a8"]}.items() if not _pow2(v)}
    if bad:
        raise ValueError(f"moe_gemm_q W8A8 tiles must be powers of two: {bad}")
    t["BK"] = min(t["BK"], G1)
    two = 2 * t["BN"]                   # h's scale block over two N tiles where it fits the shapes
    t["HB"] = two if (cfg.get("h_halves_w8a8") or cfg.get("h_pass_w8a8")) and I % two == 0 and G2 % two == 0 \
        else t["BN"]
    fits = (_pow2(t["BK"]) and D % t["BK"] == 0 and G1 % t["BK"] == 0 and t["BK"] >= 16
            and I % t["HB"] == 0 and G1 % t["BN"] == 0 and G2 % t["HB"] == 0 and t["BN"] >= 16
            and G2 % t["BND"] == 0)
    return t if fits else None


def _pow2(v) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def _k_tiles_a_program(tiles: int, want: int) -> int:
    """The quantization pass's K tiles a program: the largest divisor of `tiles` up to `want`."""
    return max(q for q in range(1, max(1, min(want, tiles)) + 1) if tiles % q == 0)


@functools.lru_cache(maxsize=None)
def specs(E: int, I: int, D: int, G1: int, G2: int, dtype: str, target: str) -> tuple[KernelSpec, ...] | None:
    """(tile map, rows quantization, gate_up, down[, h's quantization][, down's tile map]) for fp8 codes in G1 (w13)
    and G2 (w2) blocks, or None where the tiles do not fit (moe_quant's other fp8 kernels run
    then); h's own pass with `h_pass_w8a8` (the rows kernel over I in HB tiles). With `tma_w8a8`
    (sm_90+, the interpreter) the GEMMs read x, h and the weights through host tensor
    descriptors (arguments xd / hd and wd: `descriptors`)."""
    t = tiles(I, D, G1, G2, target)
    if t is None:
        return None
    cfg = config("moe_gemm_q", target)
    tma = bool(cfg.get("tma_w8a8", False)) and (TARGETS[target]["arch"] or 90) >= 90
    consts = {"E": E, "I": I, "D": D, "G1": G1, "G2": G2, "NKB1": -(-D // G1), "NKB2": -(-I // G2),
              "SD": -(-2 * I // G1) * -(-D // G1), "SI": -(-D // G2) * -(-I // G2), **t,
              "QR": cfg["QR_w8a8"], "QK": _k_tiles_a_program(D // t["BK"], cfg.get("QK_w8a8", 1)),
              "TMA": tma, "DT": TL_DTYPES[dtype], "H_PASS": bool(cfg.get("h_pass_w8a8")) and t["HB"] > t["BN"]}
    descs_gu = {"xd": ("BM", "BK"), "wd": ("BN", "BK")} if tma else {}
    descs_dn = {"hd": ("BMD", "HB"), "wd": ("BND", "HB")} if tma else {}
    source = lambda c: render("quantized_grouped_swiglu_fp8_w8a8", _KERNELS, c,  # noqa: E731
                              descs_gate_up="".join(f", {d}" for d in descs_gu),
                              descs_down="".join(f", {d}" for d in descs_dn))
    p = ptr_type(dtype)
    tiles_sig = {"tile_e_ptr": "*i32", "tile_r_ptr": "*i32"}
    desc = lambda ds: {d: f"tensordesc<fp8e4nv[{t[a]}, {t[b]}]>" for d, (a, b) in ds.items()}   # noqa: E731
    mk = lambda name, sig, w, st, c=consts: KernelSpec(name, name, source(c), sig, w, st, c)  # noqa: E731
    rows_sig = {"x_ptr": p, "xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "M": "i32"}
    h_pass = (mk("qmoe_fp8_rows", rows_sig, 4, 1, {**consts, "D": I, "BK": t["HB"],
                                                   "QK": _k_tiles_a_program(I // t["HB"], cfg.get("QK_w8a8", 1))}),) \
        if consts["H_PASS"] else ()
    down_rows = (tile_map(E, t["BMD"], target),) if t["BMD"] != t["BM"] else ()     # down's own tile map
    return (tile_map(E, t["BM"], target),
            mk("qmoe_fp8_rows", rows_sig, 4, 1),
            mk("qmoe_fp8_gate_up", {"xq_ptr": "*fp8e4nv", "xs_ptr": "*fp32", "off_ptr": "*i64", "q_ptr": "*fp8e4nv",
                                    "s_ptr": p, "hq_ptr": p if consts["H_PASS"] else "*fp8e4nv", "hs_ptr": "*fp32",
                                    **tiles_sig, **desc(descs_gu)},
               cfg["warps_w8a8"], cfg["stages_w8a8"]),
            mk("qmoe_fp8_down", {"hq_ptr": "*fp8e4nv", "hs_ptr": "*fp32", "off_ptr": "*i64", "q_ptr": "*fp8e4nv",
                                 "s_ptr": p, "y_ptr": p, **tiles_sig, **desc(descs_dn)},
               cfg["warps_down_w8a8"], cfg.get("stages_down_w8a8") or cfg["stages_w8a8"], {**consts, "BM": t["BMD"]})) \
        + h_pass + down_rows


def descriptors(c: dict, xq, q13, hq, q2) -> tuple[tuple, tuple]:
    """The host tensor descriptors of gate_up (x rows, w13 rows) and down (h rows, w2 rows)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    d = lambda t, rows, cols: TensorDescriptor.from_tensor(t.reshape(-1, t.shape[-1]), [rows, cols])  # noqa: E731
    return ((d(xq, c["BM"], c["BK"]), d(q13, c["BN"], c["BK"])),
            (d(hq, c["BMD"], c["HB"]), d(q2, c["BND"], c["HB"])))


def tile_map(E: int, BM: int, target: str) -> KernelSpec:
    """moe.py's device-side tile map (tile -> expert, first row) for row tiles of BM."""
    consts = {"E": E, "BE": max(16, next_pow2(E)), "BM": BM, "TB": 64}
    optional = dict.fromkeys(re.findall(r"\$(\w+)", moe._TILE_MAP), "")      # its optional parts left out
    src = render("moe_tile_map", moe._TILE_MAP, consts, **optional)
    return KernelSpec("moe_tile_map", "moe_tile_map", src,
                      {"off_ptr": "*i64", "tile_e_ptr": "*i32", "tile_r_ptr": "*i32", "max_tiles": "i32"}, 4, 1, consts)


def quantized_rows(rows, kernels):
    """(e4m3 codes [M, D], fp32 scales [M, D // BK]) of rows [M, D], per row and K tile (the
    rows pass of `kernels`)."""
    M, D = rows.shape
    xq = torch.empty(M, D, device=rows.device, dtype=torch.float8_e4m3fn)
    xs = torch.empty(M, D // kernels[1].config["BK"], device=rows.device, dtype=torch.float32)
    _rows_pass(kernels[1], rows, xq, xs)
    return xq, xs


def _rows_pass(spec, rows, codes, scales):
    """The rows kernel `spec` (QR rows x QK K tiles a program) over rows [M, D] into codes and scales."""
    c, M = spec.config, rows.shape[0]
    if M:
        launch(spec, (-(-M // c["QR"]), c["D"] // c["BK"] // c["QK"]), rows.contiguous(), codes, scales, M)


def grouped_swiglu(rows, offsets, q13, s13, q2, s2, kernels):
    """y [M, D] for the rows of expert e (offsets[e]:offsets[e+1]) through `kernels` (specs)."""
    if not rows.shape[0]:
        return torch.empty_like(rows)
    return _gemms(*quantized_rows(rows, kernels), offsets, q13, s13, q2, s2, kernels, rows.dtype)


def grouped_swiglu_tokens(x, src, offsets, q13, s13, q2, s2, kernels):
    """grouped_swiglu of the rows x[src] (token copies by expert), the N tokens quantized before
    their codes and scales are gathered: the same codes, an N-row pass instead of len(src)."""
    if not src.numel():
        return x.new_empty(0, x.shape[1])
    xq, xs = quantized_rows(x, kernels)
    codes = xq.view(torch.uint8).index_select(0, src).view(torch.float8_e4m3fn)    # (fp8 has no gather)
    return _gemms(codes, xs.index_select(0, src), offsets, q13, s13, q2, s2, kernels, x.dtype)


def _gemms(xq, xs, offsets, q13, s13, q2, s2, kernels, dtype):
    """y [M, D] in `dtype` from the quantized rows (xq, xs): tile maps, gate_up, h's pass, down."""
    tmap, _, gate_up, down, *extra = kernels
    h_pass = [k for k in extra if k.name == "qmoe_fp8_rows"]
    tmap_down = next((k for k in extra if k.name == "moe_tile_map"), None)
    c = gate_up.config
    E, M, D, I, HB = q13.shape[0], xq.shape[0], c["D"], c["I"], c["HB"]
    dev = xq.device
    off = offsets.to(torch.int64).contiguous()

    def row_tiles(spec, rows):          # the tile map over row tiles of `rows`: (tiles, experts, first rows)
        max_tiles = -(-M // rows) + E
        te = torch.empty(max_tiles, device=dev, dtype=torch.int32)
        tr = torch.empty(max_tiles, device=dev, dtype=torch.int32)
        launch(spec, (-(-max_tiles // spec.config["TB"]),), off, te, tr, max_tiles)
        return max_tiles, te, tr
    y = torch.empty(M, D, device=dev, dtype=dtype)
    max_tiles, te, tr = row_tiles(tmap, c["BM"])
    hq = torch.empty(M, I, device=dev, dtype=torch.float8_e4m3fn)
    hs = torch.empty(M, I // HB, device=dev, dtype=torch.float32)
    s13, s2 = s13.to(dtype).contiguous(), s2.to(dtype).contiguous()
    q13, q2 = q13.contiguous(), q2.contiguous()
    d_gu, d_dn = descriptors(c, xq, q13, hq, q2) if c["TMA"] else ((), ())
    if h_pass:                          # h in the rows' dtype, then quantized per HB columns
        h = torch.empty(M, I, device=dev, dtype=dtype)
        launch(gate_up, (I // c["BN"], max_tiles), xq, xs, off, q13, s13, h, hs, te, tr, *d_gu)
        _rows_pass(h_pass[0], h, hq, hs)
    else:
        launch(gate_up, (I // HB, max_tiles), xq, xs, off, q13, s13, hq, hs, te, tr, *d_gu)
    if tmap_down is not None:           # down's row tiles apart from gate_up's
        max_tiles, te, tr = row_tiles(tmap_down, c["BMD"])
    launch(down, (-(-D // c["BND"]), max_tiles), hq, hs, off, q2, s2, y, te, tr, *d_dn)
    return y
