"""Low-bit weight rows dotted with one vector, dequantizing in the load: the GEMV-shaped kernels'
main loop (moe_decode's experts by id, moe_quant's per-row kernels for decode-sized batches).

`loader(fmt, asym, words)` renders the K tile's loads and dots, `helpers(words)` the K loops over
them (`_swiglu_rows_q`: gate and up rows against one vector, `_rows_dot_q`). A tile gives partial
products per (row, column slot), [rows, BKX // NPW]; the loops accumulate those and sum each row
once at the end. Two ways to dequantize:

- words (int4 / int8 whose K and group hold whole 32-bit words, NPW codes a word): the codes are
  read as 32-bit words (a 16-byte load is 32 int4 codes) and no code goes through an int->float
  conversion (a quarter-rate instruction): a code c at bits p..p+b-1 of its word (p + b <= 23;
  the top ones after one 16-bit shift of the word) is OR-ed into the mantissa of 2^23
  (0x4B000000), which gives the float f = 2^23 + c 2^p exactly, and f 2^-p - (2^(23-p) + z) is
  c - z exactly (one FMA, or one FADD where p = 0). Per code: one AND/OR (one LOP3), one FMA or
  FADD, one FFMA with the vector's entry. The group's scale multiplies
  each word's partial sum (the words never straddle a group), not every code; nothing is rounded
  to the data dtype on the way (the reference rounds each dequantized weight to it: the sums
  differ by that rounding, ~2^-9 relative in bf16, nothing in fp32).
- elements (fp8, or shapes the words do not fit): each weight dequantized as
  kimi_graph/ops/quant.dequantize does ((code - zero point) * scale in fp32, rounded to the data
  dtype), NPW = 1.
A K tile inside one group (G % BKX == 0) reads one scale per row; otherwise each word (element)
looks its group's scale up.
"""
from __future__ import annotations

import torch

from kimi_graph.ops.quant import BITS

MAGIC = 0x4B000000          # the float 2^23: its mantissa's low 23 bits are an integer's


def words_per_code(fmt: str) -> int:
    """Codes in a 32-bit word (int formats), 0 for formats the word loader does not take."""
    return 32 // BITS[fmt] if fmt in BITS else 0


def words_fit(fmt: str, tiles: list[tuple[int, int, int]]) -> bool:
    """Can the word loader take `fmt` for every (K, G, K tile) of a kernel? The rows, the groups and
    the tiles must hold whole words."""
    npw = words_per_code(fmt)
    return npw > 0 and all(K % npw == 0 and G % npw == 0 and bk % npw == 0 for K, G, bk in tiles)


def word_tile(fmt: str, bk: int) -> int:
    """The K tile of `fmt` codes holding the bytes of a `bk` tile of int4 codes (tiles are given
    for int4: int8 takes half the columns, as many words)."""
    return bk * 4 // BITS[fmt]


def as_words(codes: torch.Tensor) -> torch.Tensor:
    """u8 codes [..., N, K/2 or K] as int32 words [..., N, (bytes) / 4] (no copy when aligned)."""
    codes = codes.contiguous()
    if codes.storage_offset() % 4:
        codes = codes.clone()
    return codes.view(torch.int32)


def scale_operands(s13, s2, z13, z2, dtype) -> tuple:
    """(s13, z13, s2, z2) as the kernels take them: scales in the activation dtype, zero points
    (u8) contiguous, or the scales again where symmetric (an unread operand)."""
    s13, s2 = s13.to(dtype).contiguous(), s2.to(dtype).contiguous()
    return s13, s13 if z13 is None else z13.contiguous(), s2, s2 if z2 is None else z2.contiguous()


def _positions(fmt: str) -> list[tuple[str, int]]:
    """(source, p) of each code of a word in K order: the code sits at bits p.. of `w` or of
    `hi` = w >> 16, with p + bits <= 23 (below the float's exponent)."""
    b = BITS[fmt]
    return [("w", p) if p + b <= 23 else ("hi", p - 16) for p in range(0, 32, b)]


def _words_load(asym: bool) -> list[str]:
    """`_wload_q`'s body: one K tile's words, scales (and zero points) of rows r."""
    return ["j = tl.max_contiguous(tl.multiple_of(k0 // NPW + tl.arange(0, BKX // NPW), BKX // NPW), BKX // NPW)",
            "m = mr[:, None] & (j < K // NPW)[None, :]",
            "w = tl.load(w_ptr + r[:, None] * (K // NPW) + j[None, :], mask=m, other=0)",
            "if G % BKX == 0:",
            "    g = (r * (K // G) + k0 // G)[:, None]",
            "    mg = mr[:, None]",
            "else:",
            "    g = r[:, None] * (K // G) + (j // (G // NPW))[None, :]",
            "    mg = m",
            "s = tl.load(s_ptr + g, mask=mg, other=0.0).to(tl.float32)",
            "z = tl.load(z_ptr + g, mask=mg, other=0).to(tl.float32)" if asym else "z = s",
            "return w, s, z"]


def _words_use(fmt: str, asym: bool, sets: list[str]) -> list[str]:
    """`_wuse(2)_q`'s body: the partial products of loaded words (w, s, z + suffix in `sets`)."""
    b = BITS[fmt]
    mask = (1 << b) - 1
    zero = 2.0 ** (b - 1)
    # mgc: the constant 2^23 the compiler cannot see (program_id(2) is 0: the grids are 2-D), so
    # it stays in a register: as a literal, ptxas re-materializes each code's mask instead, one
    # MOV a code
    lines = ["mgc = tl.program_id(2) + MAGIC",
             "j = tl.max_contiguous(tl.multiple_of(k0 // NPW + tl.arange(0, BKX // NPW), BKX // NPW), BKX // NPW)",
             "mj = j < K // NPW"]
    # the vector's entries per code position; asymmetric: their sum per word
    for i in range(len(_positions(fmt))):
        lines.append(f"v{i} = tl.load(v_ptr + NPW * j + {i}, mask=mj, other=0.0).to(tl.float32)")
    if asym:
        lines.append("vs = " + " + ".join(f"v{i}" for i in range(len(_positions(fmt)))))
    outs = []
    for t in sets:
        lines.append(f"hi = w{t} >> 16")
        terms = []
        for i, (src, p) in enumerate(_positions(fmt)):
            # (2^23 + c 2^p) 2^-p - (2^(23-p) + z) = c - z exactly, in one FMA: symmetric z is the
            # constant 2^(b-1); asymmetric z comes off per word below
            sub = 2.0 ** (23 - p) + (0.0 if asym else zero)
            f = f"(({src + t if src == 'w' else src} & {mask << p}) | mgc).to(tl.float32, bitcast=True)"
            terms.append(f"(({f} * {2.0 ** -p!r} - {sub!r}) * v{i}[None, :])" if p else
                         f"(({f} - {sub!r}) * v{i}[None, :])")
        lines.append(f"p{t} = " + terms[0])
        lines += [f"p{t} += " + term for term in terms[1:]]
        if asym:
            lines.append(f"p{t} -= z{t} * vs[None, :]")
        outs.append(f"p{t} * s{t}")
    return lines + ["return " + ", ".join(outs)]


def _elements_body(fmt: str, asym: bool) -> list[str]:
    """`_wdot_q`'s body dequantizing each weight (rounded to DT as the op library does)."""
    int4 = fmt == "int4"
    width, per_row = ("K // 2", "(K // 2)") if int4 else ("K", "K")
    cols = {"e": ("2 * j", "c & 15"), "o": ("2 * j + 1", "c >> 4")} if int4 else {"": ("j", "c")}
    row_g, nk = ("(r // G)", "((K + G - 1) // G)") if fmt == "fp8" else ("r", "(K // G)")   # fp8: G x G blocks

    def params(g: str, m: str, t: str, col: str = "") -> list[str]:
        z = f"tl.load(z_ptr + {g}, mask={m}, other=0).to(tl.float32){col}" if asym else \
            ("0.0" if fmt == "fp8" else f"{2.0 ** (BITS[fmt] - 1)}")
        return [f"    s{t} = tl.load(s_ptr + {g}, mask={m}, other=0.0).to(tl.float32){col}", f"    z{t} = {z}"]
    lines = [f"j = k0{' // 2' if int4 else ''} + tl.arange(0, BKX{' // 2' if int4 else ''})",
             f"mj = j < {width}", "m2 = mr[:, None] & mj[None, :]",
             f"c = tl.load(w_ptr + r[:, None] * {per_row} + j[None, :], mask=m2, "
             f"other={'0.0' if fmt == 'fp8' else '0'}).to({'tl.float32' if fmt == 'fp8' else 'tl.int32'})"]
    lines += [f"v{t} = tl.load(v_ptr + {k}, mask=mj, other=0.0).to(tl.float32)" for t, (k, _) in cols.items()]
    first = next(iter(cols))
    lines += ["if G % BKX == 0:"] + params(f"{row_g} * {nk} + k0 // G", "mr", first, "[:, None]")
    lines += [f"    s{t}, z{t} = s{first}, z{first}" for t in cols if t != first]
    lines.append("else:")
    for t, (k, _) in cols.items():
        lines += params(f"{row_g}[:, None] * {nk} + ({k})[None, :] // G", "m2", t)
    lines += [f"w{t} = ((({code}).to(tl.float32) - z{t}) * s{t}).to(DT).to(tl.float32)" for t, (_, code) in cols.items()]
    if int4:        # the even and odd columns side by side: BKX // 2 slots of two products each
        return lines + ["return we * ve[None, :] + wo * vo[None, :]"]
    return lines + ["return w * v[None, :]"]


_SIG = "K: tl.constexpr, G: tl.constexpr, BKX: tl.constexpr"


def loader(fmt: str, asym: bool, words: bool) -> str:
    """The source of the K tiles' loads and dots for `fmt` codes (zero points when `asym`),
    reading words (see the module doc: `_wload_q` loads a tile, `_wuse_q` / `_wuse2_q` dot one or
    two loaded tiles with the vector) or elements (`_wdot_q`: load and dot). Slots per tile:
    BKX // NPW (words), BKX // 2 (int4 elements: an even and an odd column a slot) or BKX."""
    what = f"# {fmt} codes{' with zero points' if asym else ''}, {'32-bit words' if words else 'per element'}"
    indent = lambda lines: "\n".join("    " + ln for ln in lines)  # noqa: E731
    if words:
        return (f"MAGIC = tl.constexpr({MAGIC})\n\n\n"
                f"@triton.jit\ndef _wload_q(w_ptr, s_ptr, z_ptr, r, mr, k0, {_SIG}):\n    {what}\n"
                f"{indent(_words_load(asym))}\n\n\n"
                f"@triton.jit\ndef _wuse_q(w, s, z, v_ptr, k0, K: tl.constexpr, BKX: tl.constexpr):\n"
                f"{indent(_words_use(fmt, asym, ['']))}\n\n\n"
                f"@triton.jit\ndef _wuse2_q(w1, s1, z1, w2, s2, z2, v_ptr, k0, K: tl.constexpr, BKX: tl.constexpr):\n"
                f"{indent(_words_use(fmt, asym, ['1', '2']))}\n\n\n")
    return (f"@triton.jit\ndef _wdot_q(w_ptr, s_ptr, z_ptr, r, mr, v_ptr, k0, {_SIG}):\n    {what}\n"
            f"{indent(_elements_body(fmt, asym))}\n\n\n")


def slots(fmt: str, words: bool) -> int:
    """NPW: K columns per partial-product slot of a tile."""
    return words_per_code(fmt) if words else (2 if fmt == "int4" else 1)


# the K loops over the loader; constexprs of the including kernel: BN, BK, BND, BKD, D, G1, NPW.
# Words, prefetching: the next K tile's words are loaded before this one is dotted (their latency
# hidden behind the arithmetic; past K the loads are masked off and read nothing).
_HELPERS_WORDS = """
@triton.jit
def _swiglu_rows_q(x_ptr, wg_ptr, wu_ptr, s_ptr, z_ptr, rg, ru, mn, ROUND: tl.constexpr):
    # silu(x wg[rg]^T) * (x wu[ru]^T) for BN rows of one expert's low-bit codes (D columns); the
    # tiles' partial products accumulate per (row, slot) and each row is summed once at the end
    # (ROUND: unused, the float helper's)
    acc_g = tl.zeros((BN, BK // NPW), tl.float32)
    acc_u = tl.zeros((BN, BK // NPW), tl.float32)
    $first_gu
    for k0 in range(0, D, BK):
        wg2, sg2, zg2 = _wload_q(wg_ptr, s_ptr, z_ptr, rg, mn, $next_gu, D, G1, BK)
        wu2, su2, zu2 = _wload_q(wu_ptr, s_ptr, z_ptr, ru, mn, $next_gu, D, G1, BK)
        pg, pu = _wuse2_q($tiles_gu, x_ptr, k0, D, BK)
        acc_g += pg
        acc_u += pu
        $rotate_gu
    g = tl.sum(acc_g, 1)
    u = tl.sum(acc_u, 1)
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _rows_dot_q(h_ptr, w_ptr, s_ptr, z_ptr, n, mn, K: tl.constexpr, G: tl.constexpr):
    # (h w^T)[n] for the BND rows n of low-bit codes w [., K], in fp32
    y = tl.zeros((BND, BKD // NPW), tl.float32)
    $first_d
    for k0 in range(0, K, BKD):
        w2, s2, z2 = _wload_q(w_ptr, s_ptr, z_ptr, n, mn, $next_d, K, G, BKD)
        y += _wuse_q($tiles_d, h_ptr, k0, K, BKD)
        $rotate_d
    return tl.sum(y, 1)
"""

_HELPERS_ELEMENTS = """
@triton.jit
def _swiglu_rows_q(x_ptr, wg_ptr, wu_ptr, s_ptr, z_ptr, rg, ru, mn, ROUND: tl.constexpr):
    # silu(x wg[rg]^T) * (x wu[ru]^T), each tile loaded, dotted and summed in turn
    acc_g = tl.zeros((BN,), tl.float32)
    acc_u = tl.zeros((BN,), tl.float32)
    for k0 in range(0, D, BK):
        acc_g += tl.sum(_wdot_q(wg_ptr, s_ptr, z_ptr, rg, mn, x_ptr, k0, D, G1, BK), 1)
        acc_u += tl.sum(_wdot_q(wu_ptr, s_ptr, z_ptr, ru, mn, x_ptr, k0, D, G1, BK), 1)
    return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u


@triton.jit
def _rows_dot_q(h_ptr, w_ptr, s_ptr, z_ptr, n, mn, K: tl.constexpr, G: tl.constexpr):
    y = tl.zeros((BND,), tl.float32)
    for k0 in range(0, K, BKD):
        y += tl.sum(_wdot_q(w_ptr, s_ptr, z_ptr, n, mn, h_ptr, k0, K, G, BKD), 1)
    return y
"""


def helpers(words: bool, prefetch: bool = True) -> str:
    """`_swiglu_rows_q` and `_rows_dot_q`, the K loops over `loader(..., words)`; words with
    `prefetch`: the next tile's words loaded before this one is dotted, else in the step that
    dots them."""
    if not words:
        return _HELPERS_ELEMENTS
    from string import Template
    if prefetch:
        blocks = {"first_gu": "wg, sg, zg = _wload_q(wg_ptr, s_ptr, z_ptr, rg, mn, 0, D, G1, BK)\n"
                              "    wu, su, zu = _wload_q(wu_ptr, s_ptr, z_ptr, ru, mn, 0, D, G1, BK)",
                  "next_gu": "k0 + BK", "tiles_gu": "wg, sg, zg, wu, su, zu",
                  "rotate_gu": "wg, sg, zg, wu, su, zu = wg2, sg2, zg2, wu2, su2, zu2",
                  "first_d": "w, s, z = _wload_q(w_ptr, s_ptr, z_ptr, n, mn, 0, K, G, BKD)",
                  "next_d": "k0 + BKD", "tiles_d": "w, s, z", "rotate_d": "w, s, z = w2, s2, z2"}
    else:
        blocks = {"first_gu": "", "next_gu": "k0", "tiles_gu": "wg2, sg2, zg2, wu2, su2, zu2", "rotate_gu": "",
                  "first_d": "", "next_d": "k0", "tiles_d": "w2, s2, z2", "rotate_d": ""}
    return "\n".join(ln if ln.strip() else "" for ln in Template(_HELPERS_WORDS).substitute(blocks).splitlines())
