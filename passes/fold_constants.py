"""fold-constants: parameter-only subgraphs become new parameters (weight transforms at
compile time: packed experts, absorbed MLA matrices, -exp(A_log), ...).

An op folds when every operand is a parameter or a folded value and its result types are
concrete. A folded value that a remaining op reads becomes a parameter named after the
value ("%model.layers.1.block_sparse_moe.experts.w13" -> "@model.layers.1....w13"), so
the transform shows in the printed IR. Its recipe (the folded ops it needs) goes to the
context's WeightTransforms, which gives one name per distinct recipe across every graph
that shares it (another recipe for the same name gets a ".folded" suffix). With `weights`,
each new parameter's tensor is also computed now and stored under its name (a name already
there that the registry does not know, holding a different tensor, is not reused)."""
from __future__ import annotations

import torch

from kimi_graph.ir import Graph, Op
from kimi_graph.weight_transforms import Recipe, WeightTransforms

from .dce import erase_dead
from .manager import Pass, PassContext, register_pass


def _concrete(g: Graph, op: Op) -> bool:
    return all(isinstance(d, int) for v in op.outputs for d in g.types[v].shape)


def _clash(g: Graph, weights: dict | None, recipe: Recipe):
    """name -> True when `name` cannot hold `recipe`'s tensor in `g` / `weights`."""
    tensor = []

    def clash(name: str) -> bool:
        if "@" + name in g.types:
            return True
        if weights is None or name not in weights:
            return False
        if not tensor:
            tensor.append(recipe.evaluate(weights.__getitem__))
        old, new = weights[name], tensor[0]
        return not (old.shape == new.shape and old.dtype == new.dtype
                    and old.device == new.device and torch.equal(old, new))
    return clash


def fold_constants(g: Graph, weights: dict | None,
                   transforms: WeightTransforms | None = None) -> tuple[int, int]:
    """-> (ops folded, parameters created). Dead ops are erased first, so only live
    transforms are recorded (and computed, with `weights`)."""
    transforms = WeightTransforms() if transforms is None else transforms
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
    read_by_folded = {v for op in folded for v in op.inputs if v in g.params}
    for v in keep:
        recipe = Recipe.of(g, folded, v)
        base = v.lstrip("%")
        base = "const." + base if base.isdigit() else base      # unnamed values ("%12")
        name = transforms.claim(base, recipe, _clash(g, weights, recipe))
        g.add_param(name, g.types[v])
        if weights is not None and name not in weights:
            weights[name] = recipe.evaluate(weights.__getitem__)
        g.replace_uses(v, "@" + name)
    for op in reversed(folded):
        g.remove_op(op.id)
    still_read = {v for _, d in g.nx.nodes(data=True) for v in d["op"].inputs} | set(g.outputs)
    for p in read_by_folded - still_read:
        g.remove_param(p)
    return len(folded), len(keep)


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "fold parameter-only subgraphs into new parameters (recipes; tensors with weights)"

    def run(self, g: Graph, ctx: PassContext) -> None:
        ops, params = fold_constants(g, ctx.weights, ctx.transforms)
        ctx.stat("ops-folded", ops)
        ctx.stat("params-created", params)
