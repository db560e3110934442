"""Low-bit weights: weight-only quantization of [..., N, K] matrices (out, in) and the
quantized MoE ops; their meaning is always "dequantize, then the float op".

Formats (`format` attribute; G = min(group_size, K), K % G == 0 for the int formats):
- int4: codes u8 [..., N, K/2], two 4-bit codes a byte (element 2j in the low nibble), scales
  [..., N, K/G] (the weight's dtype). Symmetric (default): w = (c - 8) * s with
  s = max|w| / 7.5 per group, codes clamped to 0..15. Asymmetric: w = (c - z) * s with
  s = (max - min) / 15 and zero points z u8 [..., N, K/G].
- int8: codes u8 [..., N, K], the same rules with 8 bits (offset 128, s = max|w| / 127.5).
- fp8: codes float8 e4m3fn [..., N, K]; scales per G x G block of (N, K) (partial edge blocks),
  [..., ceil(N/G), ceil(K/G)]: w = c * s, s = max|w| / 448. Symmetric only.
The int layouts are ONNX Runtime's QMoE / MatMulNBits ones (unsigned codes, default zero point
2^(bits-1)); fp8's is QMoE's block-scaled fp8 (DeepSeek-V3's 128 x 128 blocks).

quantize(w) -> (codes, scales, zeros): the compile-time transform (quantize-experts inserts
  it; fold-constants makes its results parameters). zeros is read only when asymmetric.
dequantize(codes, scales, zeros?) -> w in the scales' dtype.
quantized_grouped_swiglu / quantized_moe_experts: grouped_swiglu / moe_experts over quantized
  w13 [E,2I,D] and w2 [E,D,I]; they decompose into dequantize + the float op.
"""
from __future__ import annotations

import torch

from .registry import REQUIRED, OpDef, dim, expect, expect_float, get_op, register

FORMATS = ("int4", "int8", "fp8")
BITS = {"int4": 4, "int8": 8}
FP8_MAX = 448.0
CHUNK = 1 << 24         # elements quantized at once (a layer's experts: one matrix at a time)


def group_of(fmt: str, K: int, group_size: int) -> int:
    """The group (block) size used for rows of length K: group_size, or K when shorter."""
    G = min(group_size, K)
    if fmt in BITS and K % G:
        raise ValueError(f"{fmt}: rows of {K} do not split into groups of {G}")
    return G


def check_format(op: str, fmt: str, group_size: int, symmetric: bool = True) -> None:
    expect(fmt in FORMATS, op, f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    expect(group_size > 0, op, f"group_size must be positive, got {group_size}")
    expect(symmetric or fmt != "fp8", op, "fp8 is symmetric only")


def code_shape(fmt: str, shape: tuple) -> tuple:
    """Codes' shape for a weight of `shape` [..., N, K]."""
    K = shape[-1]
    return shape[:-1] + (K // 2,) if fmt == "int4" else shape


def scale_shape(fmt: str, shape: tuple, group_size: int) -> tuple:
    N, K = shape[-2], shape[-1]
    G = group_of(fmt, K, group_size)
    if fmt == "fp8":
        return shape[:-2] + (-(-N // G), -(-K // G))
    return shape[:-1] + (K // G,)


def code_dtype(fmt: str) -> str:
    return "f8e4m3" if fmt == "fp8" else "u8"


def weight_shape(fmt: str, codes_shape: tuple) -> tuple:
    """The float weight's shape [..., N, K] from its codes' shape."""
    return codes_shape[:-1] + (2 * codes_shape[-1],) if fmt == "int4" else tuple(codes_shape)


# -- reference (torch) -------------------------------------------------------------------------
def _blocks(x: torch.Tensor, G: int) -> torch.Tensor:
    """[..., N, K] -> [..., N, K/G, G]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // G, G)


def _fp8_block_amax(w: torch.Tensor, G: int) -> torch.Tensor:
    N, K = w.shape[-2:]
    pn, pk = -N % G, -K % G
    a = torch.nn.functional.pad(w.abs(), (0, pk, 0, pn))
    a = a.reshape(*w.shape[:-2], (N + pn) // G, G, (K + pk) // G, G)
    return a.amax(dim=(-3, -1))


def _fp8_expand(s: torch.Tensor, N: int, K: int, G: int) -> torch.Tensor:
    """Block scales [..., ceil(N/G), ceil(K/G)] -> per element [..., N, K]."""
    return s.repeat_interleave(G, -2)[..., :N, :].repeat_interleave(G, -1)[..., :K]


def quantize(w: torch.Tensor, fmt: str, group_size: int = 128, symmetric: bool = True):
    """-> (codes, scales, zeros) of `w` [..., N, K] (see the module doc); computed in fp32
    (fp64 for fp64), scales rounded to w's dtype first, so dequantization uses exactly the
    scale divided by."""
    G = group_of(fmt, w.shape[-1], group_size)
    # a matrix at a time: bounded fp32 temporaries (none on meta, where shapes are all it finds)
    if w.dim() > 2 and w.numel() > CHUNK and w.device.type != "meta":
        parts = [quantize(m, fmt, group_size, symmetric) for m in w.reshape(-1, *w.shape[-2:])]
        return tuple(torch.stack([p[i] for p in parts]).reshape(*w.shape[:-2], *parts[0][i].shape)
                     for i in range(3))
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    wf = w.to(acc)
    if fmt == "fp8":
        amax = _fp8_block_amax(wf, G)
        s = torch.where(amax > 0, amax / FP8_MAX, 1.0).to(w.dtype)
        q = (wf / _fp8_expand(s.to(acc), *w.shape[-2:], G)).clamp(-FP8_MAX, FP8_MAX)
        return q.to(torch.float8_e4m3fn), s, torch.zeros(s.shape, dtype=torch.uint8, device=w.device)
    bits = BITS[fmt]
    top = 2 ** bits - 1
    b = _blocks(wf, G)
    if symmetric:
        amax = b.abs().amax(-1)
        s = torch.where(amax > 0, amax / (2 ** (bits - 1) - 0.5), 1.0).to(w.dtype)
        z = torch.full(s.shape, 2 ** (bits - 1), dtype=torch.uint8, device=w.device)
    else:
        lo, hi = b.amin(-1).clamp(max=0), b.amax(-1).clamp(min=0)
        s = torch.where(hi > lo, (hi - lo) / top, 1.0).to(w.dtype)
        z = torch.round(-lo / s.to(acc)).clamp(0, top).to(torch.uint8)
    c = torch.round(b / s.to(acc).unsqueeze(-1)) + z.to(acc).unsqueeze(-1)
    c = c.clamp(0, top).to(torch.uint8).reshape(w.shape)
    return pack_int4(c) if fmt == "int4" else c, s, z


def pack_int4(c: torch.Tensor) -> torch.Tensor:
    """u8 codes 0..15 [..., K] -> [..., K/2], element 2j in the low nibble."""
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], -1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: str,
               group_size: int = 128) -> torch.Tensor:
    """The float weight [..., N, K] in the scales' dtype (computed in fp32, or fp64)."""
    acc = torch.float64 if scales.dtype == torch.float64 else torch.float32
    if fmt == "fp8":                    # block scales broadcast over their blocks: one full-size temporary
        N, K = codes.shape[-2:]
        G = group_of(fmt, K, group_size)
        nb, kb = scales.shape[-2:]
        w = torch.nn.functional.pad(codes.to(acc), (0, kb * G - K, 0, nb * G - N))
        w.view(*w.shape[:-2], nb, G, kb, G).mul_(scales.to(acc)[..., :, None, :, None])
        return w[..., :N, :K].to(scales.dtype)
    c = unpack_int4(codes) if fmt == "int4" else codes
    G = group_of(fmt, c.shape[-1], group_size)
    z = zeros.to(acc) if zeros is not None else 2.0 ** (BITS[fmt] - 1)
    z = z.unsqueeze(-1) if zeros is not None else z
    w = (_blocks(c.to(acc), G) - z) * scales.to(acc).unsqueeze(-1)
    return w.reshape(c.shape).to(scales.dtype)


# -- ops ------------------------------------------------------------------------------------------
def _fmt_attrs():
    return {"format": REQUIRED(str), "group_size": 128}


@register
class Quantize(OpDef):
    kind = "quantize"
    doc = "weight-only quantization of [..., N, K] (codes, scales, zero points): a weight transform"
    family = "linear"
    operands = ("w",)
    results = ("codes", "scales", "zeros")
    attributes = {**_fmt_attrs(), "symmetric": True}

    def infer(self, types, attrs):
        (w,) = types
        expect_float(self.kind, w)
        check_format(self.kind, attrs["format"], attrs["group_size"], attrs["symmetric"])
        expect(w.rank >= 2 and all(isinstance(d, int) for d in w.shape[-2:]), self.kind,
               f"needs a weight [..., N, K] with static N and K, got {w}")
        expect(attrs["format"] != "int4" or w.shape[-1] % 2 == 0, self.kind, f"int4 needs an even K, got {w}")
        try:
            s = scale_shape(attrs["format"], w.shape, attrs["group_size"])
        except ValueError as e:
            expect(False, self.kind, str(e))
        return [w.with_shape(code_shape(attrs["format"], w.shape)).with_dtype(code_dtype(attrs["format"])),
                w.with_shape(s), w.with_shape(s).with_dtype("u8")]

    def ref(self, args, attrs):
        return list(quantize(args[0], attrs["format"], attrs["group_size"], attrs["symmetric"]))

    def flops(self, ins, outs, attrs, dims):
        return 4.0 * ins[0].numel(dims)


def _check_quantized(op: str, codes, scales, zeros, attrs) -> "TensorType":
    """The float weight type that (codes, scales, zeros) stand for."""
    fmt = attrs["format"]
    check_format(op, fmt, attrs["group_size"])
    expect(codes.dtype == code_dtype(fmt) and codes.rank >= 2, op, f"{fmt} codes must be {code_dtype(fmt)}, got {codes}")
    expect_float(op, scales)
    shape = weight_shape(fmt, codes.shape)
    try:
        want = scale_shape(fmt, shape, attrs["group_size"])
    except ValueError as e:
        expect(False, op, str(e))
    expect(scales.shape == want, op, f"scales {scales} do not fit {fmt} codes {codes} (expected {list(want)})")
    expect(zeros is None or (fmt != "fp8" and zeros.dtype == "u8" and zeros.shape == want), op,
           f"zero points {zeros} do not fit {fmt} codes {codes}")
    return scales.with_shape(shape)


@register
class Dequantize(OpDef):
    kind = "dequantize"
    doc = "the float weight [..., N, K] of quantized codes, scales and optional zero points"
    family = "linear"
    operands = ("codes", "scales", "zeros?")
    attributes = _fmt_attrs()

    def infer(self, types, attrs):
        codes, scales = types[:2]
        return [_check_quantized(self.kind, codes, scales, types[2] if len(types) > 2 else None, attrs)]

    def ref(self, args, attrs):
        return [dequantize(args[0], args[1], args[2] if len(args) > 2 else None, attrs["format"],
                           attrs["group_size"])]


def _weights(b, ins, attrs):
    """(w13, w2) dequantized through builder `b` from (w13 codes, scales, w2 codes, scales,
    w13 zeros?, w2 zeros?)."""
    q13, s13, q2, s2 = ins[:4]
    z13, z2 = (list(ins[4:6]) + [None, None])[:2]
    fa = {"format": attrs["format"], "group_size": attrs["group_size"]}
    return (b("dequantize", *([q13, s13] + ([z13] if z13 is not None else [])), name="w13", **fa),
            b("dequantize", *([q2, s2] + ([z2] if z2 is not None else [])), name="w2", **fa))


class _QuantizedExperts(OpDef):
    """A float MoE op with its w13 / w2 operands quantized (`float_kind`, `lead` operands
    before them, `tail` after)."""
    fused = True
    family = "moe"
    attributes = _fmt_attrs()
    float_kind, lead, tail = "", 0, 0

    def _split(self, items):
        n = self.lead
        q = list(items[n:n + 4])
        rest = list(items[n + 4:])
        tail = rest[:self.tail]
        zeros = (rest[self.tail:] + [None, None])[:2]
        return list(items[:n]), q, tail, zeros

    def infer(self, types, attrs):
        lead, (q13, s13, q2, s2), tail, (z13, z2) = self._split(types)
        expect((z13 is None) == (z2 is None), self.kind, "zero points for both w13 and w2, or neither")
        w13 = _check_quantized(self.kind, q13, s13, z13, attrs)
        w2 = _check_quantized(self.kind, q2, s2, z2, attrs)
        return get_op(self.float_kind).infer(lead + [w13, w2] + tail, {})

    def ref(self, args, attrs):
        lead, (q13, s13, q2, s2), tail, (z13, z2) = self._split(args)
        w13 = dequantize(q13, s13, z13, attrs["format"], attrs["group_size"])
        w2 = dequantize(q2, s2, z2, attrs["format"], attrs["group_size"])
        return get_op(self.float_kind).ref(lead + [w13, w2] + tail, {})

    def decompose(self, b, ins, attrs):
        lead, q, tail, zeros = self._split(ins)
        w13, w2 = _weights(b, q + [z for z in zeros if z is not None], attrs)
        return [b(self.float_kind, *lead, w13, w2, *tail, name="experts")]

    def _float_types(self, ins, fmt: str):
        lead, (q13, s13, q2, s2), tail, _ = self._split(ins)
        return lead + [s13.with_shape(weight_shape(fmt, q13.shape)),
                       s2.with_shape(weight_shape(fmt, q2.shape))] + tail

    def flops(self, ins, outs, attrs, dims):
        return get_op(self.float_kind).flops(self._float_types(ins, attrs["format"]), outs, {}, dims)

    def bytes_moved(self, ins, outs, attrs, dims):
        """The float op's bytes with the experts read (`touched` of E) at their quantized size."""
        fl = self._float_types(ins, attrs["format"])
        _, q, _, zeros = self._split(ins)
        E = q[0].shape[0]
        touched = min(E, self._copies(ins, dims))
        quant = sum(t.nbytes(dims) for t in q + [z for z in zeros if z is not None])
        floats = sum(t.nbytes(dims) for t in fl[self.lead:self.lead + 2])
        return get_op(self.float_kind).bytes_moved(fl, outs, {}, dims) + touched * (quant - floats) / E


@register
class QuantizedGroupedSwiGLU(_QuantizedExperts):
    kind = "quantized_grouped_swiglu"
    doc = "grouped_swiglu over quantized expert weights (dequantize, then grouped_swiglu)"
    operands = ("rows", "offsets", "w13_codes", "w13_scales", "w2_codes", "w2_scales", "w13_zeros?",
                "w2_zeros?")
    float_kind, lead, tail = "grouped_swiglu", 2, 0

    def _copies(self, ins, dims):
        return dim(ins[0].shape[0], dims)


@register
class QuantizedMoEExperts(_QuantizedExperts):
    kind = "quantized_moe_experts"
    doc = "moe_experts over quantized expert weights (dequantize, then moe_experts)"
    operands = ("x", "ids", "weights", "w13_codes", "w13_scales", "w2_codes", "w2_scales", "acc",
                "w13_zeros?", "w2_zeros?")
    float_kind, lead, tail = "moe_experts", 3, 1

    def _copies(self, ins, dims):
        return ins[1].numel(dims)
