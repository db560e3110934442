"""Activation memory of a graph: the most bytes its intermediate values hold at once, for
concrete dims, each value freed after its last reader (as the Triton backend runs a graph).
Inputs, states and weights are not counted; a view (reshape, slice, take_last, expand) holds
no bytes of its own and keeps its source alive. Scratch a kernel allocates inside one op is
not a graph value and is not counted."""
from __future__ import annotations

from .ir import Graph

VIEWS = ("reshape", "slice", "take_last", "expand")


def peak_activation_bytes(g: Graph, dims: dict[str, int]) -> int:
    ops = list(g.ops())
    root: dict[str, str] = {}          # a view -> the value whose bytes it reads
    last: dict[str, int] = {}          # a value -> the index of its last reader
    for i, op in enumerate(ops):
        for v in op.inputs:
            last[root.get(v, v)] = i
        if op.kind in VIEWS:
            root[op.outputs[0]] = root.get(op.inputs[0], op.inputs[0])
    for v in g.outputs:
        last[root.get(v, v)] = len(ops)
    held: dict[str, int] = {}
    live = peak = 0
    for i, op in enumerate(ops):
        if op.kind not in VIEWS:
            for v in op.outputs:
                held[v] = g.types[v].nbytes(dims)
                live += held[v]
        peak = max(peak, live)
        for v in {root.get(x, x) for x in op.inputs}:
            if last.get(v) == i and v in held:
                live -= held.pop(v)
    return peak
