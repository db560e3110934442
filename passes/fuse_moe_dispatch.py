"""fuse-moe-dispatch: the router becomes one moe_route op; the per-expert loop becomes
moe_permute -> grouped_swiglu over packed expert weights -> moe_unpermute.

Router: take_along(src, grouped_topk(choice)) with choice = sigmoid(linear(cast?(x), W)) + bias,
src = choice ("official" weights) or the sigmoid scores ("unbiased"), followed by an optional
renormalize (eps 1e-20, top_k > 1) and an optional scale
    -> ids, weights = moe_route(x, W, bias){top_k, n_group, topk_group, renormalize, scaling, weights}

Experts: a chain acc_e = moe_expert(acc_{e-1}, x, ids, weights, w1_e, w3_e, w2_e) covering
every expert once (the shared expert or zeros feed acc_0)
    -> rows, offsets, order = moe_permute(x, ids); y = grouped_swiglu(rows, offsets, w13, w2);
       out = moe_unpermute(y, order, weights, acc_0)
with w13 = concat(stack(w1_*), stack(w3_*), dim=1) and w2 = stack(w2_*): parameter-only ops
that fold-constants turns into the packed parameters "...experts.w13" and "...experts.w2".
The routed sum is reassociated (all experts' terms, then the accumulator): equal to the
chain up to rounding.
"""
from __future__ import annotations

import re

from kimi_graph.ir import Graph, Op

from .manager import PassContext, register_pass
from .rewrite import Alt, P, Pattern, PatternPass, V, only_user

ROUTER = P("take_along", V("src"),
           P("grouped_topk",
             P("add", P("sigmoid", P("linear", Alt(P("cast", V("x")), V("x")), V("gate_w")),
                        name="sig"), V("bias"), name="choice", commutative=True),
             name="topk"))


def _fuse_router(m, rw) -> bool:
    g, topk = rw.g, m["topk"]
    choice, scores = m["choice"].outputs[0], m["sig"].outputs[0]
    if m["src"] not in (choice, scores) or g.types[m["bias"]].rank != 1:
        return False
    k = topk.attrs["top_k"]
    end, renorm, scaling, tail = m.root.outputs[0], False, 1.0, []
    nxt = only_user(g, end, "renormalize")
    if nxt is not None and k > 1 and nxt.attrs.get("eps", 1e-20) == 1e-20:
        end, renorm = nxt.outputs[0], True
        tail.append(nxt)
    nxt = only_user(g, end, "scale")
    if nxt is not None:
        end, scaling = nxt.outputs[0], nxt.attrs["factor"]
        tail.append(nxt)
    ids, weights = rw.create("moe_route", m["x"], m["gate_w"], m["bias"], like=end, name="route",
                             top_k=k, n_group=topk.attrs["n_group"],
                             topk_group=topk.attrs["topk_group"], renormalize=renorm,
                             scaling=scaling,
                             weights="official" if m["src"] == choice else "unbiased")
    rw.replace({topk.outputs[0]: ids, end: weights}, erase=tail[::-1])
    return True


def _chain(g: Graph, head: Op) -> list[Op] | None:
    """The moe_expert ops accumulating after `head`, if `head` starts a chain."""
    acc = g.defining_op(head.inputs[0])
    if acc is not None and acc.kind == "moe_expert" and acc.inputs[1:4] == head.inputs[1:4]:
        return None                                  # not the head
    chain = [head]
    while True:
        nxt = only_user(g, chain[-1].outputs[0], "moe_expert")
        if nxt is None or nxt.inputs[0] != chain[-1].outputs[0] or nxt.inputs[1:4] != head.inputs[1:4] \
                or nxt.attrs["num_experts"] != head.attrs["num_experts"]:
            return chain
        chain.append(nxt)


def _packed_name(w1: str, suffix: str) -> str:
    """"@model.layers.1.block_sparse_moe.experts.0.w1.weight" -> "model.layers.1.block_sparse_moe.experts.<suffix>"."""
    m = re.match(r"@(.*\.experts\.)\d+\.w1\.weight$", w1)
    return (m.group(1) if m else w1.lstrip("%@") + ".") + suffix


def _fuse_experts(m, rw) -> bool:
    g = rw.g
    chain = _chain(g, m.root)
    if chain is None:
        return False
    E = m.root.attrs["num_experts"]
    by_expert = {op.attrs["expert"]: op for op in chain}
    if len(chain) != E or sorted(by_expert) != list(range(E)):
        return False
    acc0, x, ids, weights = m.root.inputs[:4]
    experts = [by_expert[e] for e in range(E)]
    w1s = [op.inputs[4] for op in experts]
    pack = _packed_name(w1s[0], "")
    stacked = [rw.create1("stack", *[op.inputs[j] for op in experts], name=pack + n)
               for j, n in ((4, "w1_stacked"), (5, "w3_stacked"))]
    w13 = rw.create1("concat", *stacked, name=pack + "w13", dim=1)
    w2 = rw.create1("stack", *[op.inputs[6] for op in experts], name=pack + "w2")
    last = chain[-1].outputs[0]
    rows, offsets, order = rw.create("moe_permute", x, ids, like=last, name="permute", num_experts=E)
    y = rw.create1("grouped_swiglu", rows, offsets, w13, w2, like=last, name="experts")
    out = rw.create1("moe_unpermute", y, order, weights, acc0, like=last, name="unpermute")
    rw.replace({last: out}, erase=list(reversed(chain)))
    return True


PATTERNS = [Pattern(ROUTER, _fuse_router, name="router"),
            Pattern(P("moe_expert", open=True), _fuse_experts, name="expert-loop")]


@register_pass
class FuseMoEDispatch(PatternPass):
    name = "fuse-moe-dispatch"
    summary = "router -> moe_route; per-expert loop -> permute / grouped SwiGLU / unpermute"
    leftover = ("moe_expert", "grouped_topk")

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return PATTERNS
