"""Pre-quantized checkpoints: the compressed-tensors "pack-quantized" layout (llm-compressor's
W4A16 / W8A16, as AWQ Kimi Linear checkpoints publish it).

config.json's `quantization_config` (quant_method "compressed-tensors", format
"pack-quantized") names the scheme; a quantized linear `X` is stored as
- `X.weight_packed` int32 [N, K * bits / 32]: codes q + 2^(bits-1) (unsigned), 32 / bits per
  int32, element i of a word in bits [i*bits, (i+1)*bits) (least significant first);
- `X.weight_scale` [N, K / group] (one column for the "channel" strategy): w = q * scale;
- `X.weight_shape` int32 [2]: (N, K).
Read as little-endian bytes, the int32 words are our int4 / int8 codes exactly (ops/quant.py:
two codes a byte, low nibble first; offset 2^(bits-1)). So a checkpoint's routed experts
become the packed parameters quantize-experts makes without a float copy ever existing
(CheckpointSource.offer); every other quantized weight is dequantized as it is read.
Supported: symmetric int4 / int8 weights, group or channel strategy, no activation
quantization, no act-order (g_idx); anything else is refused with the reason.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import torch

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
_EXPERTS = re.compile(r"(model\.layers\.\d+\.block_sparse_moe\.experts\.)(w13|w2)\.(codes|scales)$")


class QuantizationError(ValueError):
    """A checkpoint quantized in a scheme kimi-graph does not read."""


@dataclass(frozen=True)
class Scheme:
    bits: int
    group: int | None          # None: one scale per output row ("channel")

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    def group_size(self, *widths: int) -> int:
        """quantize-experts' group-size giving these groups for rows of `widths`."""
        return self.group if self.group is not None else max(widths)


def scheme_of(quantization_config: dict | None) -> Scheme | None:
    """The checkpoint's scheme from config.json's `quantization_config` (None: not quantized);
    QuantizationError naming what is unsupported."""
    q = quantization_config
    if q is None:
        return None
    what = "kimi-graph reads compressed-tensors 'pack-quantized' symmetric int4 / int8 weights " \
           "(W4A16 / W8A16)"
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        raise QuantizationError(f"quantization_config: quant_method "
                                f"{(q or {}).get('quant_method') if isinstance(q, dict) else q!r} "
                                f"is not supported; {what}")
    groups = list((q.get("config_groups") or {}).values())
    if not groups:
        raise QuantizationError(f"quantization_config has no config_groups; {what}")
    schemes = set()
    for grp in groups:
        fmt = grp.get("format") or q.get("format")
        w = grp.get("weights") or {}
        problems = [p for p, bad in (
            (f"format {fmt!r}", fmt != "pack-quantized"),
            (f"weights of type {w.get('type')!r}", w.get("type", "int") != "int"),
            (f"{w.get('num_bits')}-bit weights", w.get("num_bits") not in (4, 8)),
            ("asymmetric weights (zero points)", not w.get("symmetric", True)),
            (f"strategy {w.get('strategy')!r}", w.get("strategy") not in ("group", "channel")),
            ("act-order (g_idx)", w.get("actorder") not in (None, False)),
            ("dynamic weight scales", bool(w.get("dynamic"))),
            ("quantized activations", grp.get("input_activations") is not None
             or grp.get("output_activations") is not None)) if bad]
        if problems:
            raise QuantizationError(f"quantization_config: {', '.join(problems)} not supported; {what}")
        schemes.add(Scheme(w["num_bits"], w.get("group_size") if w["strategy"] == "group" else None))
    if len(schemes) > 1:
        raise QuantizationError(f"quantization_config mixes schemes {sorted(map(str, schemes))}; {what}")
    return schemes.pop()


def codes(packed: torch.Tensor) -> torch.Tensor:
    """int32 words [N, K * bits / 32] -> our u8 codes [N, K * bits / 8] (the same bytes)."""
    if sys.byteorder != "little":
        raise QuantizationError("reading packed int32 codes needs a little-endian machine")
    return packed.contiguous().view(torch.uint8)


def experts_part(name: str):
    """"...experts.w13.codes" -> (prefix, "w13", "codes"), else None."""
    m = _EXPERTS.match(name)
    return m.groups() if m else None
