"""The `torch.library` custom ops `torch.ops.kimi_graph.<kind>`, and THE place where their
implementations are chosen per device type:

    from kimi_graph.lowering.torch.custom_ops import set_impl
    set_impl("kda_fused_recurrent", "cuda", my_kernel)    # my_kernel(args, attrs) -> [results]

An implementation has the signature of `OpDef.ref`: `fn(args, attrs)`, `args` the operands in
the op's order (optional ones may be None), `attrs` every attribute by name; it returns the
list of results. It is looked up at every call, so a swap applies to modules already lowered
and compiled (CUDA graphs captured before it keep what they captured). Defaults: the op's
static (sync-free) form on "cuda" where the table in `ops.py` has one, else its torch
reference. The fake (meta) implementation is the registry's own type inference, so shapes
and dtypes have one definition.

Schemas: operands are `Tensor` (`Tensor?` when optional), attributes keyword-only with the
registry's defaults; results are 1 to 3 tensors.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

from kimi_graph.ir import IRError, TensorType, eval_dim
from kimi_graph.ops import IR_DTYPES, TORCH_DTYPES, get_op
from kimi_graph.ops.registry import Required

from .ops import LOWERING, custom_kinds

NAMESPACE = "kimi_graph"
_SCHEMA_TYPES = {bool: "bool", int: "int", float: "float", str: "str"}

_IMPLS: dict[tuple[str, str], Callable] = {}
_DEFINED: dict[str, object] = {}      # kind -> OpOverload


def set_impl(kind: str, device_type: str, fn: Callable | None) -> None:
    """Run custom op `kind` on tensors of `device_type` ("cpu", "cuda", ...) with `fn(args,
    attrs) -> [results]`; `fn=None` restores the default."""
    if kind not in custom_kinds():
        raise ValueError(f"{kind!r} is not a custom op of the torch lowering; custom ops: "
                         f"{', '.join(custom_kinds())}")
    if fn is None:
        _IMPLS.pop((kind, device_type), None)
    else:
        _IMPLS[(kind, device_type)] = fn


def get_impl(kind: str, device_type: str) -> Callable:
    fn = _IMPLS.get((kind, device_type))
    if fn is not None:
        return fn
    static = LOWERING[kind].static
    return static if device_type == "cuda" and static is not None else get_op(kind).ref


def attr_types(kind: str) -> dict[str, type]:
    return get_op(kind).attr_types()


def schema(kind: str) -> str:
    opdef = get_op(kind)
    params = []
    for o in opdef.operands:
        if o.startswith("*"):
            raise NotImplementedError(f"{kind}: variadic operands cannot be a custom op")
        params.append(f"Tensor? {o[:-1]}=None" if o.endswith("?") else f"Tensor {o}")
    kw = []
    for name, ty in attr_types(kind).items():
        default = opdef.attributes[name]
        text = f"{_SCHEMA_TYPES[ty]} {name}"
        if not isinstance(default, Required):
            text += "=" + (f'"{default}"' if ty is str else repr(default))
        kw.append(text)
    n = len(opdef.results)
    results = "Tensor" if n == 1 else "(" + ", ".join(["Tensor"] * n) + ")"
    return "(" + ", ".join(params + (["*"] + kw if kw else [])) + ") -> " + results


def coerce_attrs(kind: str, attrs: dict) -> dict:
    """Attributes as the schema types them (an int scale becomes a float)."""
    types = attr_types(kind)
    return {k: types[k](v) for k, v in attrs.items()}


def _own_contiguous(results, args):
    """Results as the fake implementation promises them: contiguous (compilers plan views on
    that) and never an input or a view of one (custom ops may not alias): copy otherwise."""
    ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    return [r.clone(memory_format=torch.contiguous_format)
            if r.untyped_storage().data_ptr() in ptrs else r.contiguous() for r in results]


class _SymDim(str):
    """A symbolic size as the registry's type inference sees it: a dim name. Where inference
    asks whether two sizes are equal, the answer is a constraint, not a comparison of names:
    dynamo may give sizes that are equal by design (a layer's latent and rope-key cache
    lengths) two symbols, and inference demanding their equality makes them one (a guard
    for sizes known at trace time, a runtime assertion for data-dependent ones). Sizes that
    differ in the example at hand stay unequal, so a wrong shape still gets the op's error."""

    def __new__(cls, name: str, size):
        self = super().__new__(cls, name)
        self.size = size
        return self

    __hash__ = str.__hash__

    def __eq__(self, other):
        if isinstance(other, _SymDim):
            if str.__eq__(self, other):
                return True
            other = other.size
        elif not isinstance(other, int) or isinstance(other, bool):
            return str.__eq__(self, other)
        if not guard_or_true(self.size == other):
            return False
        torch._check(self.size == other)
        return True

    def __ne__(self, other):
        return not self.__eq__(other)


def _new_results(like: torch.Tensor, types: list[TensorType], values: dict):
    out = [like.new_empty([eval_dim(d, values) for d in t.shape], dtype=TORCH_DTYPES[t.dtype])
           for t in types]
    return out[0] if len(out) == 1 else tuple(out)


def _define(kind: str):
    name = f"{NAMESPACE}::{kind}"
    torch.library.define(name, schema(kind))
    opdef = get_op(kind)

    def impl(*args, **attrs):
        args = list(args)
        while args and args[-1] is None:
            args.pop()
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        out = _own_contiguous(get_impl(kind, device)(args, opdef.full_attrs(attrs)), args)
        return out[0] if len(out) == 1 else tuple(out)

    def fake(*args, **attrs):
        args = list(args)
        while args and args[-1] is None:
            args.pop()
        attrs = opdef.full_attrs(attrs)
        names: dict[str, _SymDim] = {}     # symbolic size (its text) -> its dim name
        values: dict[str, object] = {}     # dim name -> the SymInt

        def dim(d):
            if isinstance(d, int):
                return d
            if str(d) not in names:
                name = f"d{len(names)}"
                names[str(d)], values[name] = _SymDim(name, d), d
            return names[str(d)]

        types = [TensorType(tuple(dim(d) for d in a.shape), IR_DTYPES[a.dtype]) for a in args]
        try:
            results = opdef.infer(types, attrs)
        except (IRError, TypeError):    # TypeError: arithmetic on a dim name
            if not names:
                raise
            # the op wants some of these sizes concrete (an expert count, a head dim): try
            # again with every symbolic size specialized (guarded); else the first error
            try:
                results = opdef.infer([TensorType(tuple(int(d) for d in a.shape), t.dtype)
                                       for a, t in zip(args, types)], attrs)
            except IRError:
                pass
            else:
                return _new_results(args[0], results, {})
            raise
        return _new_results(args[0], results, values)

    torch.library.impl(name, "CompositeExplicitAutograd", impl)
    torch.library.register_fake(name, fake)
    return getattr(getattr(torch.ops, NAMESPACE), kind).default


def custom_op(kind: str):
    """The OpOverload `torch.ops.kimi_graph.<kind>.default` (defined on first use)."""
    if kind not in _DEFINED:
        if kind not in custom_kinds():
            raise ValueError(f"{kind!r} is not a custom op of the torch lowering")
        _DEFINED[kind] = _define(kind)
    return _DEFINED[kind]


def define_all() -> None:
    for kind in custom_kinds():
        custom_op(kind)


def kind_of_custom(target) -> str | None:
    for kind, op in _DEFINED.items():
        if target is op or target is getattr(op, "overloadpacket", None):
            return kind
    return None
