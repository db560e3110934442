"""Running a fused op's decomposition (`OpDef.decompose(b, ins, attrs)`), written once in its
OpDef against a builder `b` (`b(kind, *ins, **attrs)`, `b.emit(...)`, `b.type(value)`):

- `Eager`: in torch, each op by its reference, or by a chosen form (`run_eager(...,
  form=static_form)` gives the torch lowering's sync-free forms);
- `subgraph`: as a graph of registry ops; the ONNX lowerings lower it op by op, for the
  portable set's function bodies and the standard set's fallbacks.

Tests check every decomposition against its op's `ref`.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..dtypes import IR_DTYPES
from ..ir import Graph, TensorType
from .registry import REGISTRY, get_op


class Eager:
    """A builder whose values are tensors: every op runs at once."""

    def __init__(self, form: Callable[[str], Callable] | None = None):
        self.form = form or (lambda kind: get_op(kind).ref)

    def emit(self, kind: str, *inputs, name: str | None = None, **attrs) -> list:
        ins = list(inputs)
        while ins and ins[-1] is None:
            ins.pop()
        return list(self.form(kind)(ins, get_op(kind).full_attrs(attrs)))

    def __call__(self, kind: str, *inputs, name: str | None = None, **attrs):
        return self.emit(kind, *inputs, name=name, **attrs)[0]

    @staticmethod
    def type(t) -> TensorType:
        return TensorType(tuple(t.shape), IR_DTYPES[t.dtype])


def cast_to(b, x, dtype: str, name: str | None = None):
    """x in `dtype` (a cast op only where it differs)."""
    return x if b.type(x).dtype == dtype else b("cast", x, dtype=dtype, name=name)


def decomposable(kind: str) -> bool:
    return get_op(kind).decompose is not None


def decomposable_kinds() -> list[str]:
    return sorted(k for k in REGISTRY if decomposable(k))


def run_eager(kind: str, args: Sequence, attrs: dict, form: Callable[[str], Callable] | None = None) -> list:
    """`kind`'s decomposition on tensors `args` (trailing None operands allowed)."""
    opdef = get_op(kind)
    args = list(args)
    while args and args[-1] is None:
        args.pop()
    return opdef.decompose(Eager(form), args, opdef.full_attrs(attrs))


def eager_form(kind: str, form: Callable[[str], Callable] | None = None) -> Callable:
    """fn(args, attrs) -> results running the decomposition (the signature of `OpDef.ref`)."""
    return lambda args, attrs: run_eager(kind, args, attrs, form)


def subgraph(kind: str, in_types: Sequence[TensorType], attrs: dict) -> Graph:
    """The decomposition of one `kind` op with operand types `in_types` as a graph whose
    inputs are named after the operands ("%q", "%xs_0", ...)."""
    from ..builder import GraphBuilder
    opdef = get_op(kind)
    b = GraphBuilder(kind)
    names = [o.strip("?*") for o in opdef.operands]
    if opdef.operands and opdef.operands[-1].startswith("*"):
        names = names[:-1] + [f"{names[-1]}_{i}" for i in range(len(in_types) - len(names) + 1)]
    ins = [b.input(n, t.shape, t.dtype) for n, t in zip(names, in_types)]
    b.output(*opdef.decompose(b, ins, opdef.full_attrs(attrs)))
    return b.graph
