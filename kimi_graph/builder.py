"""GraphBuilder: emit ops with type inference from the registry; name scopes for readability."""
from __future__ import annotations

from contextlib import contextmanager

from .ir import Graph, TensorType
from .ops import get_op


class GraphBuilder:
    def __init__(self, name: str = "main"):
        self.graph = Graph(name)
        self._scope: list[str] = []

    @contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def input(self, name: str, shape, dtype: str) -> str:
        return self.graph.add_input(name, TensorType(tuple(shape), dtype))

    def param(self, name: str, shape, dtype: str) -> str:
        return self.graph.add_param(name, TensorType(tuple(shape), dtype))

    def type(self, value: str) -> TensorType:
        return self.graph.types[value]

    def emit(self, kind: str, *inputs: str | None, name: str | None = None, **attrs) -> list[str]:
        """Append an op; returns its result names. Trailing None operands are dropped."""
        ins = list(inputs)
        while ins and ins[-1] is None:
            ins.pop()
        opdef = get_op(kind)
        opdef.check_arity(len(ins))
        full = opdef.full_attrs(attrs)
        out_types = opdef.infer([self.graph.types[v] for v in ins], full)
        hint = ".".join(self._scope + [name]) if name else (".".join(self._scope) or "v")
        names = [self.graph.fresh(hint) for _ in out_types]
        self.graph.add_op(kind, ins, out_types, full, out_names=names)
        return names

    def __call__(self, kind: str, *inputs: str | None, name: str | None = None, **attrs) -> str:
        """Emit a single-result op (or take the first result)."""
        return self.emit(kind, *inputs, name=name, **attrs)[0]

    def output(self, *values: str) -> None:
        self.graph.outputs.extend(values)
