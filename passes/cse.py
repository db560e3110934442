"""cse: common-subexpression elimination. Ops are pure, so two ops of one kind with the same
operands and attributes compute the same values; the later one is replaced by the earlier."""
from __future__ import annotations

import json

from kimi_graph.ir import Graph
from kimi_graph.ops import get_op

from .manager import Pass, PassContext, register_pass


def eliminate_common(g: Graph) -> int:
    seen: dict[tuple, list[str]] = {}
    merged = 0
    for op in list(g.ops()):          # topological: operands are already canonical
        key = (op.kind, tuple(op.inputs), json.dumps(get_op(op.kind).full_attrs(op.attrs), sort_keys=True),
               tuple(g.types[v] for v in op.outputs))
        first = seen.get(key)
        if first is None:
            seen[key] = op.outputs
            continue
        for old, new in zip(op.outputs, first):
            g.replace_uses(old, new)
        g.remove_op(op.id)
        merged += 1
    return merged


@register_pass
class CSE(Pass):
    name = "cse"
    summary = "common-subexpression elimination"

    def run(self, g: Graph, ctx: PassContext) -> None:
        ctx.stat("ops-merged", eliminate_common(g))
