"""FX graph -> layer graph: the way back, for the "kimi_graph" torch.compile backend.

Accepted: FX graphs whose every call is one of our op nodes, i.e. what dynamo builds from a
module lowered by `lower()` or from a user module written with our node functions
(`ops.node_function(kind)` or `torch.ops.kimi_graph.<kind>`), with static shapes. Operands
are tensors; attributes are keyword constants. Placeholders that dynamo lifted from module
parameters and buffers become parameters (mangled names are unmangled, so modules from
`lower()` keep their HF names); the others become graph inputs. Sizes read off the inputs
(`x.size(i)` and arithmetic on them, as `lower()` emits) are evaluated on the example
inputs. Anything else (another torch call, a symbolic size) is refused with an IRError
naming the node.
"""
from __future__ import annotations

import operator
import re
from typing import Sequence

import torch
import torch.fx as fx

from kimi_graph.ir import Graph, IRError, TensorType
from kimi_graph.ops import IR_DTYPES, get_op
from kimi_graph.verifier import verify

from .fx import unmangle
from .ops import kind_of

_ARITH = (operator.mul, operator.add, operator.sub)
_MEMBER = re.compile(r"(?:\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*))")


def import_fx(gm: fx.GraphModule, example_inputs: Sequence) -> tuple[Graph, dict[str, torch.Tensor]]:
    """-> (graph, weights keyed by parameter name without "@")."""
    g = Graph("imported")
    weights: dict[str, torch.Tensor] = {}
    env: dict[fx.Node, object] = {}
    sizes: dict[fx.Node, int] = {}         # size nodes evaluated on the example inputs
    tensors: dict[fx.Node, torch.Tensor] = {}
    inputs = iter(example_inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            t = next(inputs)
            if not isinstance(t, torch.Tensor):
                raise IRError(f"input {node.name} is {type(t).__name__}, not a tensor: the kimi_graph "
                              f"backend takes static shapes (torch.compile(..., dynamic=False))")
            tensors[node] = t
            param = _param_name(node)
            if param is not None:
                env[node] = g.add_param(param, _type(t))
                weights[param] = t
            else:
                env[node] = g.add_input(_input_name(node), _type(t))
        elif node.op == "get_attr":
            t = _fetch(gm, node.target)
            name = unmangle(node.target)
            env[node] = g.add_param(name, _type(t))
            weights[name] = t
        elif node.op == "call_method" and node.target == "size" and node.args[0] in tensors:
            sizes[node] = int(tensors[node.args[0]].shape[node.args[1]])
        elif node.op == "call_function" and node.target in _ARITH and all(
                a in sizes or isinstance(a, int) for a in node.args):
            sizes[node] = node.target(*(sizes.get(a, a) for a in node.args))
        elif node.op == "call_function" and node.target is operator.getitem:
            env[node] = env[node.args[0]][node.args[1]]
        elif node.op == "call_function" and kind_of(node.target) is not None:
            env[node] = _add_op(g, node, kind_of(node.target), env, sizes)
        elif node.op == "output":
            outs = node.args[0]
            g.outputs = [env[n] for n in (outs if isinstance(outs, (tuple, list)) else [outs])]
        else:
            raise IRError(f"node {node.name} ({node.op} {_target_name(node.target)}) is not a "
                          f"kimi_graph op; the kimi_graph backend takes graphs of kimi_graph ops only")
    g.meta = {"imported_from": "torch.fx"}
    verify(g)
    return g, weights


def input_positions(gm: fx.GraphModule) -> dict[str, int]:
    """Graph input name ("%x") -> position among the FX graph's placeholders."""
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {"%" + _input_name(n): i for i, n in enumerate(nodes) if _param_name(n) is None}


def _add_op(g: Graph, node: fx.Node, kind: str, env, sizes):
    opdef = get_op(kind)
    args = list(node.args)
    while args and args[-1] is None:
        args.pop()
    for a in args:
        if not isinstance(a, fx.Node):
            raise IRError(f"node {node.name} ({kind}): operand {a!r} is not a tensor")
    attrs = {}
    for k, v in node.kwargs.items():
        vals = [sizes.get(x, x) if isinstance(x, fx.Node) else x
                for x in (v if isinstance(v, (list, tuple)) else [v])]
        if any(isinstance(x, fx.Node) for x in vals):
            raise IRError(f"node {node.name} ({kind}): attribute {k} depends on run-time sizes; "
                          f"the kimi_graph backend takes static shapes (dynamic=False)")
        attrs[k] = vals if isinstance(v, (list, tuple)) else vals[0]
    ins = [env[a] for a in args]
    opdef.check_arity(len(ins))
    full = opdef.full_attrs(attrs)
    types = opdef.infer([g.types[v] for v in ins], full)
    op = g.add_op(kind, ins, types, full, out_names=[g.fresh(node.name) for _ in types])
    return op.outputs[0] if len(op.outputs) == 1 else op.outputs


def _type(t: torch.Tensor) -> TensorType:
    return TensorType(tuple(int(d) for d in t.shape), IR_DTYPES[t.dtype])


def _source(node: fx.Node) -> str:
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    if src is None:
        return ""
    return src.name() if callable(src.name) else src.name


def _param_name(node: fx.Node) -> str | None:
    """A dotted module path for placeholders lifted from `self`'s parameters and buffers."""
    src = _source(node)
    if not src.startswith("L['self']"):
        return None
    parts = [a or b for a, b in _MEMBER.findall(src[len("L['self']"):])]
    return unmangle(".".join(parts)) if parts else None


def _input_name(node: fx.Node) -> str:
    src = _source(node)
    m = re.fullmatch(r"L\['(\w+)'\]", src)
    return unmangle(m.group(1)) if m else node.name


def _fetch(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _target_name(target) -> str:
    return getattr(target, "__name__", None) or str(target)
