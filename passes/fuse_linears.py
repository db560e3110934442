"""fuse-linears: linears that read the same input, each with a weight of one dtype that is a
parameter or computed from parameters alone (e.g. absorb-mla's folded q_proj), become one
linear over the weights concatenated by rows, its output sliced back per reader:

    a = linear(x, @Wa); b = linear(x, @Wb)
    -> y = linear(x, concat(@Wa, @Wb, dim=0)); a = slice(y, -1, 0, A); b = slice(y, -1, A, A+B)

One GEMM (a GEMV in decode) reads x once where there were several launches (KDA's q, k, v,
f_a, b and g_a projections; a SwiGLU's gate and up). The concatenation is parameter-only, so
fold-constants makes it a parameter named after the weights it joins
("@model.layers.2.self_attn.q_proj_k_proj_v_proj.weight"), held in place of the originals.
Each output column is the same dot product as before; a BLAS may block a wider product
differently, so results agree up to rounding.
"""
from __future__ import annotations

import os

from kimi_graph.ir import Graph

from .manager import Pass, PassContext, register_pass
from .rewrite import Rewriter


def fused_name(weights: list[str]) -> str:
    """"@p.q_proj.weight", "@p.k_proj.weight" -> "p.q_proj_k_proj.weight"."""
    names = [w.lstrip("@%") for w in weights]
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1]
    parts = [n[len(prefix):].removesuffix(".weight") for n in names]
    return prefix + "_".join(parts) + ".weight"


def parameter_only(g: Graph, v: str, memo: dict) -> bool:
    """Is `v` a parameter or computed from parameters alone (a weight fold-constants folds)?"""
    if v not in memo:
        op = g.defining_op(v)
        memo[v] = v in g.params or (op is not None and all(parameter_only(g, u, memo) for u in op.inputs))
    return memo[v]


def fuse_groups(g: Graph) -> int:
    groups: dict[tuple[str, str], list] = {}
    memo: dict = {}
    for op in g.ops():
        if op.kind == "linear" and parameter_only(g, op.inputs[1], memo) \
                and isinstance(g.types[op.inputs[1]].shape[0], int):
            groups.setdefault((op.inputs[0], g.types[op.inputs[1]].dtype), []).append(op)
    rw, fused = Rewriter(g), 0
    for (x, _), ops in groups.items():
        if len(ops) < 2:
            continue
        weights = [op.inputs[1] for op in ops]
        w = rw.create1("concat", *weights, name=fused_name(weights), dim=0)
        y = rw.create1("linear", x, w, like=ops[0].outputs[0], name="fused")
        start = 0
        for op, wname in zip(ops, weights):
            end = start + g.types[wname].shape[0]
            rw.replace({op.outputs[0]: rw.create1("slice", y, like=op.outputs[0], dim=-1, start=start, end=end)},
                       erase=[op])
            start = end
        fused += len(ops)
    return fused


@register_pass
class FuseLinears(Pass):
    name = "fuse-linears"
    summary = "linears sharing an input -> one linear over concatenated weights, sliced back"

    def run(self, g: Graph, ctx: PassContext) -> None:
        ctx.stat("linears-fused", fuse_groups(g))
