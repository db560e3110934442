"""Layer graph -> `torch.fx.GraphModule`.

`lower(g, weights)` gives a module whose `forward` takes the graph inputs in order (names
mangled: "%state.l0.kda" -> `state__l0__kda`) and returns the tuple of graph outputs.
Parameters become buffers (the weight tensors themselves, not copies), named the same way.
Each op is one FX node calling `ops.node_function(kind)`: a custom op or a traced function.
Symbolic dims in shape attributes are read off the inputs at run time (`x.size(i)`), so one
module serves every batch size and length. `decompose=True` replaces custom ops by their
static reference forms (for exporters that cannot carry custom ops, e.g. torch-mlir).
"""
from __future__ import annotations

import keyword
import operator
import re
from typing import Mapping

import torch
import torch.fx as fx

from kimi_graph.ir import Graph, IRError, eval_dim
from kimi_graph.ops import get_op

from .ops import CUSTOM, lowering, node_function

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*$")


def mangle(name: str) -> str:
    """A value or parameter name as a Python identifier: "." -> "__" (reversed by `unmangle`)."""
    bare = name.lstrip("%@")
    if not _IDENT.match(bare) or "__" in bare or bare.endswith("."):
        raise IRError(f"name {name!r} has no reversible Python form (letters, digits, '_' and "
                      f"single '.' only)")
    out = bare.replace(".", "__")
    return out + "_" if keyword.iskeyword(out) else out


def unmangle(name: str) -> str:
    return name.replace("__", ".")


class KimiGraphModule(fx.GraphModule):
    """A lowered layer graph. `input_names` / `output_names` are the IR names, in order."""


def lower(g: Graph, weights: Mapping[str, torch.Tensor], *, decompose: bool = False) -> KimiGraphModule:
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in g.inputs:
        env[name] = graph.placeholder(mangle(name))
    for name in g.params:
        try:
            w = weights[name[1:]]
        except KeyError:
            raise IRError(f"no weight for parameter {name}") from None
        buf = mangle(name)
        root.register_buffer(buf, w)
        env[name] = graph.get_attr(buf)
    sizes = _SymbolicSizes(g, graph, env)
    for op in g.ops():
        opdef = get_op(op.kind)
        attrs = opdef.full_attrs(op.attrs)
        for a in opdef.shape_attrs:
            attrs[a] = [sizes.dim(d) for d in attrs[a]]
        if lowering(op.kind).how == CUSTOM and not decompose:
            from .custom_ops import coerce_attrs
            attrs = coerce_attrs(op.kind, attrs)
        node = graph.create_node("call_function", node_function(op.kind, decompose),
                                 tuple(env[v] for v in op.inputs), attrs,
                                 name=_node_name(op.outputs[0]) if len(op.outputs) == 1 else None)
        if len(op.outputs) == 1:
            env[op.outputs[0]] = node
        else:
            for i, v in enumerate(op.outputs):
                env[v] = graph.create_node("call_function", operator.getitem, (node, i), name=_node_name(v))
    graph.output(tuple(env[v] for v in g.outputs))
    gm = KimiGraphModule(root, graph, class_name="KimiGraphModule")
    gm.input_names, gm.output_names = list(g.inputs), list(g.outputs)
    gm.meta["kimi_graph"] = dict(g.meta, decomposed=decompose)
    return gm


def _node_name(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", value.lstrip("%"))


class _SymbolicSizes:
    """FX nodes for symbolic dims: a symbol is `x.size(i)` of the first input that has it;
    products and sums ("B*T*8") become arithmetic on those nodes."""

    def __init__(self, g: Graph, graph: fx.Graph, env: dict[str, fx.Node]):
        self.graph, self.cache = graph, {}
        self.where = {}
        for name, ty in g.inputs.items():
            for i, d in enumerate(ty.shape):
                if isinstance(d, str) and d not in self.where:
                    self.where[d] = (env[name], i)
        self.tracer = fx.proxy.GraphAppendingTracer(graph)

    def dim(self, d):
        if isinstance(d, int):
            return d
        if d not in self.cache:
            if d in self.where:
                self.cache[d] = self.graph.call_method("size", self.where[d])
            elif d.isidentifier():
                raise IRError(f"symbolic dim {d!r} is not a dim of any graph input")
            else:
                syms = {s: fx.Proxy(self.dim(s), self.tracer)
                        for s in re.split(r"[-+*]", d.replace(" ", "")) if s and not s.isdigit()}
                self.cache[d] = eval_dim(d, syms).node
        return self.cache[d]
