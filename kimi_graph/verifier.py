"""Graph verifier: registered ops, defined operands, declared params, consistent types, acyclic."""
from __future__ import annotations

import networkx as nx

from .ir import Graph, IRError
from .ops import get_op


class VerifyError(IRError):
    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("graph failed verification:\n  " + "\n  ".join(errors))


def verify(g: Graph) -> None:
    errors: list[str] = []
    if not nx.is_directed_acyclic_graph(g.nx):
        errors.append(_describe_cycle(g, nx.find_cycle(g.nx)))
    defined = set(g.inputs) | set(g.params)
    for v, ty in g.types.items():
        if v not in g.producer and v not in defined:
            errors.append(f"value {v} has a type but no definition")
    for op_id in g.nx.nodes:
        op = g.op(op_id)
        where = f"op {op.kind}#{op.id} ({', '.join(op.outputs)})"
        for v in op.inputs:
            if v.startswith("@") and v not in g.params:
                errors.append(f"{where}: parameter {v} is not declared")
            elif v not in g.types:
                errors.append(f"{where}: operand {v} is not defined")
        for v in op.outputs:
            if g.producer.get(v) != op.id:
                errors.append(f"{where}: result {v} is defined by another op too")
            if v in defined:
                errors.append(f"{where}: result {v} redefines a graph input or parameter")
        if any(e.startswith(where) for e in errors):
            continue
        try:
            opdef = get_op(op.kind)
            opdef.check_arity(len(op.inputs))
            attrs = opdef.full_attrs(op.attrs)
            want = opdef.infer([g.types[v] for v in op.inputs], attrs)
        except IRError as e:
            operands = ", ".join(f"{v}: {g.types[v]}" for v in op.inputs)
            errors.append(f"{where} on ({operands}): {e}")
            continue
        if len(want) != len(op.outputs):
            errors.append(f"{where}: {len(op.outputs)} results, the op defines {len(want)}")
            continue
        for v, t in zip(op.outputs, want):
            if g.types[v] != t:
                errors.append(f"{where}: result {v} is typed {g.types[v]} but the op gives {t}")
        for v in op.inputs:
            src = g.producer.get(v)
            if src is not None and not g.nx.has_edge(src, op.id):
                errors.append(f"{where}: missing def-use edge for operand {v}")
    for v in g.outputs:
        if v not in g.types:
            errors.append(f"graph output {v} is not defined")
    if errors:
        raise VerifyError(errors)


def _describe_cycle(g: Graph, edges) -> str:
    """'cycle: add#3 -(%a)-> mul#4 -(%b)-> add#3': each op, and the values that close the loop."""
    parts = []
    for a, b in edges:
        flows = [v for v in g.op(b).inputs if g.producer.get(v) == a] or ["?"]
        parts.append(f"{g.op(a).kind}#{a} -({', '.join(flows)})->")
    first = g.op(edges[0][0])
    return "cycle: " + " ".join(parts) + f" {first.kind}#{first.id}"
