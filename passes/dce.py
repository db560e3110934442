"""dce: erase ops whose results nobody reads, and parameters no op reads."""
from __future__ import annotations

import networkx as nx

from kimi_graph.ir import Graph

from .manager import Pass, PassContext, register_pass


def erase_dead(g: Graph) -> tuple[int, int]:
    """Erase dead ops (sinks first, so whole dead chains go in one sweep) and unused
    parameters. Graph inputs stay: they are the graph's interface. -> (ops, params) erased."""
    live_out = set(g.outputs)
    ops = 0
    for op_id in reversed(list(nx.topological_sort(g.nx))):
        op = g.op(op_id)
        if g.nx.out_degree(op_id) == 0 and not any(v in live_out for v in op.outputs):
            g.remove_op(op_id)
            ops += 1
    read = {v for _, d in g.nx.nodes(data=True) for v in d["op"].inputs} | live_out
    dead_params = [p for p in g.params if p not in read]
    for p in dead_params:
        g.remove_param(p)
    return ops, len(dead_params)


@register_pass
class DCE(Pass):
    name = "dce"
    summary = "dead-code elimination: unused ops and parameters"

    def run(self, g: Graph, ctx: PassContext) -> None:
        ops, params = erase_dead(g)
        ctx.stat("ops-erased", ops)
        ctx.stat("params-erased", params)
