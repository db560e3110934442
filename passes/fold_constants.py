"""fold-constants: parameter-only subgraphs become new parameters (weight transforms at
compile time: packed experts, absorbed MLA matrices, -exp(A_log), ...).

An op folds when every operand is a parameter or a folded value and its result types are
concrete. A folded value that a remaining op reads becomes a parameter named after the
value ("%model.layers.1.block_sparse_moe.experts.w13" -> "@model.layers.1....w13"), so
the transform shows in the printed IR. With `weights`, each new parameter's tensor is
computed with the ops' reference implementations and stored in `weights` under its name
(a name already there holding a different tensor gets a ".folded" suffix instead)."""
from __future__ import annotations

import torch

from kimi_graph.ir import Graph, Op
from kimi_graph.ops import get_op

from .dce import erase_dead
from .manager import Pass, PassContext, register_pass


def _concrete(g: Graph, op: Op) -> bool:
    return all(isinstance(d, int) for v in op.outputs for d in g.types[v].shape)


def _param_name(g: Graph, weights: dict | None, value: str, tensor) -> str:
    base = value.lstrip("%")
    base = "const." + base if base.isdigit() else base      # unnamed values ("%12")
    for i in range(1 << 20):
        name = base if i == 0 else f"{base}.folded" if i == 1 else f"{base}.folded.{i - 1}"
        if "@" + name in g.types:
            continue
        if weights is not None and name in weights:
            old = weights[name]
            if not (old.shape == tensor.shape and old.dtype == tensor.dtype
                    and old.device == tensor.device and torch.equal(old, tensor)):
                continue
        return "@" + name
    raise AssertionError("unreachable")


def _evaluate(g: Graph, ops: list[Op], wanted: set[str], weights: dict) -> dict:
    """Tensors of the `wanted` folded values; intermediates are freed after their last use."""
    needed, frontier = set(), set(wanted)
    for op in reversed(ops):
        if frontier & set(op.outputs):
            needed.add(op.id)
            frontier.update(v for v in op.inputs if v in g.producer)
    run = [op for op in ops if op.id in needed]
    last = {}
    for i, op in enumerate(run):
        for v in op.inputs:
            last[v] = i
    env: dict = {}
    for i, op in enumerate(run):
        opdef = get_op(op.kind)
        args = [env[v] if v in env else weights[v[1:]] for v in op.inputs]
        for v, t in zip(op.outputs, opdef.ref(args, opdef.full_attrs(op.attrs))):
            env[v] = t
        for v in op.inputs:
            if last.get(v) == i and v not in wanted:
                env.pop(v, None)
    return {v: env[v] for v in wanted}


def fold_constants(g: Graph, weights: dict | None) -> tuple[int, int]:
    """-> (ops folded, parameters created). Dead ops are erased first, so only live
    transforms are computed."""
    erase_dead(g)
    const = set(g.params)
    folded: list[Op] = []
    for op in g.ops():
        if op.inputs and all(v in const for v in op.inputs) and _concrete(g, op):
            folded.append(op)
            const.update(op.outputs)
    if not folded:
        return 0, 0
    ids = {op.id for op in folded}
    keep = [v for op in folded for v in op.outputs
            if v in g.outputs or any(u.id not in ids for u in g.users(v))]
    tensors = _evaluate(g, folded, set(keep), weights) if weights is not None else {}
    read_by_folded = {v for op in folded for v in op.inputs if v in g.params}
    for v in keep:
        name = _param_name(g, weights, v, tensors.get(v))
        g.add_param(name, g.types[v])
        if weights is not None:
            weights[name[1:]] = tensors[v]
        g.replace_uses(v, name)
    for op in reversed(folded):
        g.remove_op(op.id)
    still_read = {v for _, d in g.nx.nodes(data=True) for v in d["op"].inputs} | set(g.outputs)
    for p in read_by_folded - still_read:
        g.remove_param(p)
    return len(folded), len(keep)


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "fold parameter-only subgraphs into new parameters (computed into the weights)"

    def run(self, g: Graph, ctx: PassContext) -> None:
        ops, params = fold_constants(g, ctx.weights)
        ctx.stat("ops-folded", ops)
        ctx.stat("params-created", params)
