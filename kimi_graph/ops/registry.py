"""The op registry: one `OpDef` per op kind, defined once.

An OpDef declares its operands (a trailing "name?" is optional, "*name" variadic), its
results, its attributes with defaults (`REQUIRED(type)` for none), a drawing family, type
inference, a torch reference implementation (`ref`, the oracle) and a cost (FLOPs and
bytes moved, for concrete dims). A fused op also has a `decompose`: its meaning in simpler
registry ops (see decompose.py). Every lowering maps ops by `kind`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..dtypes import DTYPE_BYTES, FLOAT_DTYPES, IR_DTYPES, TORCH_DTYPES  # noqa: F401 (re-exported)
from ..ir import IRError, TensorType, eval_dim

REGISTRY: dict[str, "OpDef"] = {}


def register(cls):
    """Class decorator: instantiate and register an OpDef under `cls.kind`."""
    inst = cls()
    if inst.kind in REGISTRY:
        raise IRError(f"op {inst.kind!r} registered twice")
    REGISTRY[inst.kind] = inst
    return cls


def get_op(kind: str) -> "OpDef":
    try:
        return REGISTRY[kind]
    except KeyError:
        raise IRError(f"unknown op {kind!r}; registered: {', '.join(sorted(REGISTRY))}") from None


FAMILIES = ("kda", "attention", "moe", "norm", "linear", "elementwise", "movement", "collective")


class OpDef:
    kind: str = ""
    operands: tuple[str, ...] = ()
    results: tuple[str, ...] = ("out",)
    attributes: dict = {}     # name -> default (REQUIRED(type) for none)
    shape_attrs: tuple[str, ...] = ()  # attributes holding shapes; symbols bound before `ref`
    family: str = ""          # one of FAMILIES (drawing, grouping)
    doc: str = ""
    fused: bool = False       # introduced by a pass; targets may run it as one kernel
    decompose = None          # fused ops: fn(b, ins, attrs) -> results in simpler ops (decompose.py)
    no_decomposition: str = ""   # a fused op without `decompose`: why

    # -- signature ----------------------------------------------------------
    def check_arity(self, n: int) -> None:
        arity = self.__dict__.get("_arity")
        if arity is None:   # (required count, max count or None if variadic), per op
            required = sum(not o.endswith("?") and not o.startswith("*") for o in self.operands)
            variadic = any(o.startswith("*") for o in self.operands)
            arity = self._arity = (required, None if variadic else len(self.operands))
        if n < arity[0] or (arity[1] is not None and n > arity[1]):
            raise IRError(f"{self.kind}: takes operands ({', '.join(self.operands)}), got {n}")

    def full_attrs(self, attrs: dict) -> dict:
        unknown = set(attrs) - set(self.attributes)
        if unknown:
            raise IRError(f"{self.kind}: unknown attribute(s) {sorted(unknown)}; "
                          f"known: {sorted(self.attributes)}")
        out = {}
        for name, default in self.attributes.items():
            if name in attrs:
                out[name] = attrs[name]
            elif isinstance(default, Required):
                raise IRError(f"{self.kind}: attribute {name!r} is required")
            else:
                out[name] = default
        return out

    def attr_types(self) -> dict[str, type]:
        """Each attribute's type: a required one's declared type, else its default's."""
        return {name: d.type if isinstance(d, Required) else type(d) for name, d in self.attributes.items()}

    # -- to implement -------------------------------------------------------
    def infer(self, types: Sequence[TensorType], attrs: dict) -> list[TensorType]:
        raise NotImplementedError

    def ref(self, args: Sequence[torch.Tensor | None], attrs: dict) -> list[torch.Tensor]:
        raise NotImplementedError

    def flops(self, ins: Sequence[TensorType], outs: Sequence[TensorType], attrs: dict,
              dims: dict[str, int]) -> float:
        """Default: one FLOP per output element."""
        return float(sum(t.numel(dims) for t in outs))

    def bytes_moved(self, ins: Sequence[TensorType], outs: Sequence[TensorType], attrs: dict,
                    dims: dict[str, int]) -> float:
        """Default: read every operand once, write every result once."""
        return float(sum(t.nbytes(dims) for t in list(ins) + list(outs)))

    def link_bytes(self, ins: Sequence[TensorType], outs: Sequence[TensorType], attrs: dict,
                   dims: dict[str, int]) -> float:
        """Bytes one rank sends to the others (collectives); 0 for ops local to a device."""
        return 0.0


class Required:
    """The default of an attribute that has none; `type` is its value type (list for
    shapes and permutations)."""

    def __init__(self, type_: type):
        self.type = type_

    def __repr__(self):
        return f"REQUIRED({self.type.__name__})"


REQUIRED = Required


def expect(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise IRError(f"{op}: {msg}")


def expect_float(op: str, *types: TensorType) -> None:
    for t in types:
        if t.dtype not in FLOAT_DTYPES:
            raise IRError(f"{op}: expects a float tensor, got {t}")


def broadcast_shapes(op: str, a: Sequence, b: Sequence) -> tuple:
    out = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise IRError(f"{op}: shapes {tuple(a)} and {tuple(b)} do not broadcast")
    return tuple(reversed(out))


def nbytes(t: TensorType, dims: dict[str, int]) -> int:
    return t.numel(dims) * DTYPE_BYTES[t.dtype]


def dim(d, dims: dict[str, int]) -> int:
    return eval_dim(d, dims)
