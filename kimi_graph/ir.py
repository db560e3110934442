"""The IR: a functional dataflow graph of typed SSA values on networkx.

A `Graph` has typed inputs, named parameters (weights), ops and outputs. Every value is
defined once: by a graph input, a parameter (`@name`) or one op result (`%name`). Dims are
ints or symbolic names ("B", "T", "S"); ops carry JSON-able attributes. The networkx
DiGraph holds ops as nodes and def-use edges labelled with the value that flows.
"""
from __future__ import annotations

import copy
import gc
import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence, Union

import networkx as nx

from .dtypes import DTYPE_BYTES, DTYPES  # noqa: F401 (re-exported)

Dim = Union[int, str]


class IRError(ValueError):
    """A malformed graph, op or type."""


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise IRError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        for d in self.shape:
            if not (isinstance(d, str) and d) and not (isinstance(d, int) and d >= 0):
                raise IRError(f"bad dim {d!r} in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape: Sequence[Dim]) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(self.shape, dtype)

    def numel(self, dims: dict[str, int] | None = None) -> int:
        n = 1
        for d in self.shape:
            n *= d if isinstance(d, int) else eval_dim(d, dims or {})
        return n

    def nbytes(self, dims: dict[str, int] | None = None) -> int:
        return self.numel(dims) * DTYPE_BYTES[self.dtype]

    def __str__(self) -> str:     # cached: type errors format types eagerly, and often
        text = self.__dict__.get("_text")
        if text is None:
            text = "tensor<" + "".join(f"{d} x " for d in self.shape) + self.dtype + ">"
            object.__setattr__(self, "_text", text)
        return text


def eval_dim(d: Dim, dims: dict[str, int]) -> int:
    """Evaluate a dim: an int, a symbol bound in `dims`, or sums/differences of products of
    those ("B*T*8", "S+1")."""
    if isinstance(d, int):
        return d
    if d in dims:
        return dims[d]
    total, sign, term = 0, 1, ""
    for ch in d.replace(" ", "") + "+":
        if ch in "+-":
            if term:
                prod = 1
                for f in term.split("*"):
                    prod *= int(f) if f.isdigit() else _bound(f, dims)
                total += sign * prod
            sign, term = (1 if ch == "+" else -1), ""
        else:
            term += ch
    return total


def _bound(sym: str, dims: dict[str, int]) -> int:
    if sym not in dims:
        raise IRError(f"symbolic dim {sym!r} has no value; bind it (known: {sorted(dims)})")
    return dims[sym]


@dataclass
class Op:
    id: int
    kind: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Op#{self.id}({self.kind}: {', '.join(self.inputs)} -> {', '.join(self.outputs)})"


class Graph:
    """A functional graph. Value names: "%x" for op results and graph inputs, "@w" for params."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: dict[str, TensorType] = {}
        self.params: dict[str, TensorType] = {}
        self.outputs: list[str] = []
        self.nx = nx.DiGraph()
        self.types: dict[str, TensorType] = {}
        self.producer: dict[str, int] = {}  # value -> op id
        self.meta: dict = {}  # free-form facts (mode, layer of each op, ...)
        self._ids = itertools.count()
        self._names: dict[str, itertools.count] = {}

    # -- construction -------------------------------------------------------
    def fresh(self, hint: str = "v") -> str:
        counter = self._names.setdefault(hint, itertools.count())
        while True:
            n = next(counter)
            if hint == "v":
                name = f"%{n}"
            else:
                name = f"%{hint}" if n == 0 else f"%{hint}.{n}"
            if name not in self.types:
                return name

    def add_input(self, name: str, ty: TensorType) -> str:
        name = name if name.startswith("%") else "%" + name
        self._define(name, ty)
        self.inputs[name] = ty
        return name

    def add_param(self, name: str, ty: TensorType) -> str:
        name = name if name.startswith("@") else "@" + name
        if name in self.params:
            if self.params[name] != ty:
                raise IRError(f"parameter {name} redeclared as {ty}, was {self.params[name]}")
            return name
        self._define(name, ty)
        self.params[name] = ty
        return name

    def add_op(self, kind: str, inputs: Sequence[str], out_types: Sequence[TensorType],
               attrs: dict | None = None, out_names: Sequence[str] | None = None,
               op_id: int | None = None) -> Op:
        names = list(out_names) if out_names else [self.fresh() for _ in out_types]
        op = Op(next(self._ids) if op_id is None else op_id, kind, list(inputs), names, dict(attrs or {}))
        for n, t in zip(names, out_types):
            self._define(n, t)
            self.producer[n] = op.id
        self.nx.add_node(op.id, op=op)
        for v in op.inputs:
            if v not in self.types:
                raise IRError(f"{kind}: operand {v} is not defined before use")
            src = self.producer.get(v)
            if src is not None:
                self.nx.add_edge(src, op.id)
        return op

    def _define(self, name: str, ty: TensorType) -> None:
        if name in self.types:
            raise IRError(f"value {name} is defined twice")
        self.types[name] = ty

    # -- queries ------------------------------------------------------------
    def op(self, op_id: int) -> Op:
        return self.nx.nodes[op_id]["op"]

    def ops(self) -> Iterator[Op]:
        """Ops in a deterministic topological order (creation order where free)."""
        for i in nx.lexicographical_topological_sort(self.nx):
            yield self.nx.nodes[i]["op"]

    def users(self, value: str) -> list[Op]:
        src = self.producer.get(value)
        candidates = (self.op(i) for i in self.nx.successors(src)) if src is not None else \
            (o for o in (self.op(i) for i in self.nx.nodes))
        return [o for o in candidates if value in o.inputs]

    def defining_op(self, value: str) -> Op | None:
        i = self.producer.get(value)
        return None if i is None else self.op(i)

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, data in self.nx.nodes(data=True):
            counts[data["op"].kind] = counts.get(data["op"].kind, 0) + 1
        return dict(sorted(counts.items()))

    # -- mutation (for passes) ----------------------------------------------
    def remove_op(self, op_id: int) -> None:
        op = self.op(op_id)
        for v in op.outputs:
            del self.types[v]
            del self.producer[v]
        self.nx.remove_node(op_id)

    def replace_uses(self, old: str, new: str) -> None:
        """Make every user of `old` (and the graph outputs) read `new` instead."""
        for user in self.users(old):
            user.inputs = [new if v == old else v for v in user.inputs]
            src_old, src_new = self.producer.get(old), self.producer.get(new)
            # drop the edge only if the user reads no other result of old's producer
            if src_old is not None and not _all_inputs_from(self, src_old, user) \
                    and self.nx.has_edge(src_old, user.id):
                self.nx.remove_edge(src_old, user.id)
            if src_new is not None:
                self.nx.add_edge(src_new, user.id)
        self.outputs = [new if v == old else v for v in self.outputs]

    def remove_param(self, name: str) -> None:
        del self.params[name]
        del self.types[name]

    def rename_value(self, old: str, new: str) -> None:
        """Give op result `old` the unused name `new` (its users and the outputs follow)."""
        if new in self.types:
            raise IRError(f"cannot rename {old} to {new}: {new} is already defined")
        src = self.producer.get(old)
        if src is None:
            raise IRError(f"only op results can be renamed, {old} is not one")
        for user in self.users(old):
            user.inputs = [new if v == old else v for v in user.inputs]
        op = self.op(src)
        op.outputs = [new if v == old else v for v in op.outputs]
        self.types[new] = self.types.pop(old)
        self.producer[new] = self.producer.pop(old)
        self.outputs = [new if v == old else v for v in self.outputs]

    def copy(self) -> "Graph":
        g = Graph(self.name)
        g.inputs, g.params, g.outputs = dict(self.inputs), dict(self.params), list(self.outputs)
        g.types, g.producer, g.meta = dict(self.types), dict(self.producer), copy.deepcopy(self.meta)
        g.nx = nx.DiGraph()
        for i, data in self.nx.nodes(data=True):
            o = data["op"]
            g.nx.add_node(i, op=Op(o.id, o.kind, list(o.inputs), list(o.outputs), _copy_attrs(o.attrs)))
        g.nx.add_edges_from(self.nx.edges)
        g._ids = itertools.count(max(self.nx.nodes, default=-1) + 1)
        g._names = {}
        return g

    def __str__(self) -> str:
        from .printer import print_graph
        return print_graph(self)


def _all_inputs_from(g: Graph, src: int, user: Op) -> set[str]:
    return {v for v in user.inputs if g.producer.get(v) == src}


def _copy_attrs(attrs: dict) -> dict:
    return {k: (list(v) if isinstance(v, list) else v) for k, v in attrs.items()}


@contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while building a large graph: its passes over the
    tens of thousands of new (acyclic) objects roughly double the build time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def values_of(ops: Iterable[Op]) -> set[str]:
    return {v for o in ops for v in o.outputs}
