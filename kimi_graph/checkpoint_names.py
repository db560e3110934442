"""Checkpoint tensor names as each peer writes them -> the graph's parameter names.

- The published checkpoint (remote code): the graph's own names.
- transformers >= 5 `save_pretrained`: the dense layer's MLP under
  `block_sparse_moe.{gate,up,down}_proj` (the graph: `mlp.*`).
- transformers' in-memory names (a `state_dict` saved as it is): `mlp.` for MoE layers too,
  the forget gate under `self_attn.forget_gate.`, the q/k/v convs stacked in
  `self_attn.conv1d.weight` [3C, 1, K], and experts packed: `experts.gate_up_proj`
  [E, 2I, H] (gate rows, then up rows) and `experts.down_proj` [E, H, I].

`intake(stored_name, shape, want)` says which parameters a stored tensor provides, each as
(name, index into the stored tensor, shape of that part); packed tensors are read part by
part through safetensors slices.
"""
from __future__ import annotations

import re
from typing import Mapping

from .ir import TensorType

Part = tuple[str, tuple, tuple[int, ...]]        # (parameter, index, part shape)
_SWAP = ((".block_sparse_moe.", ".mlp."), (".mlp.", ".block_sparse_moe."))
_PACKED = re.compile(r"(model\.layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
_CONV = re.compile(r"(model\.layers\.\d+\.self_attn\.)conv1d\.weight$")


def rename(name: str, want: Mapping[str, TensorType]) -> str | None:
    """The parameter a stored name means (None: no parameter of `want`)."""
    name = name.replace(".self_attn.forget_gate.", ".self_attn.")
    if name in want:
        return name
    for a, b in _SWAP:
        if a in name and name.replace(a, b) in want:
            return name.replace(a, b)
    return None


def intake(stored: str, shape: tuple[int, ...], want: Mapping[str, TensorType]) -> list[Part] | None:
    """The parameters of `want` that tensor `stored` (of `shape`) provides; None: none."""
    name = rename(stored, want)
    if name is not None:
        return [(name, (), tuple(shape))]
    m = _PACKED.match(stored)
    if m and len(shape) == 3:
        p = f"{m.group(1)}block_sparse_moe.experts."
        E = shape[0]
        if m.group(2) == "down_proj":
            parts = [(f"{p}{e}.w2.weight", (e,), tuple(shape[1:])) for e in range(E)]
        else:
            half = shape[1] // 2
            parts = [(f"{p}{e}.{w}.weight", (e, slice(a, a + half)), (half, shape[2]))
                     for e in range(E) for w, a in (("w1", 0), ("w3", half))]
        return parts if all(n in want for n, _, _ in parts) else None
    m = _CONV.match(stored)
    if m and len(shape) == 3 and shape[0] % 3 == 0:
        C = shape[0] // 3
        parts = [(f"{m.group(1)}{x}_conv1d.weight", (slice(i * C, (i + 1) * C),), (C, *shape[1:]))
                 for i, x in enumerate("qkv")]
        return parts if all(n in want for n, _, _ in parts) else None
    return None
