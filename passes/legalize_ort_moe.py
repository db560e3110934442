"""legalize-ort-moe: the routed experts become one moe_experts op, the form ONNX Runtime's
MoE computes (lowering/onnx/ort.py maps it; its decomposition serves every other target).

    moe_unpermute(grouped_swiglu(moe_permute(x, ids)), order, weights, acc)
        -> moe_experts(x, ids, weights, w13, w2, acc)

The `ort` ONNX export runs LEGALIZE_ORT first (fuse-moe-dispatch packs a declared model's
per-expert loop); `kimi-graph inspect MODEL --pipeline "default,legalize-ort-moe"` shows the
result.
"""
from __future__ import annotations

from .manager import PassContext, register_pass
from .rewrite import P, Pattern, PatternPass, V

LEGALIZE_ORT = "fuse-moe-dispatch,fold-constants,legalize-ort-moe"

DISPATCH = P("moe_unpermute",
             P("grouped_swiglu", P("moe_permute", V("x"), V("ids"), name="perm"),
               P("moe_permute", V("x"), V("ids"), name="perm", result=1), V("w13"), V("w2"), name="gs"),
             P("moe_permute", V("x"), V("ids"), name="perm", result=2), V("weights"), V("acc"))


def _fuse(m, rw) -> bool:
    out = rw.create1("moe_experts", m["x"], m["ids"], m["weights"], m["w13"], m["w2"], m["acc"],
                     like=m.root.outputs[0], name="experts")
    rw.replace({m.root.outputs[0]: out}, erase=[m.root])
    return True


@register_pass
class LegalizeORTMoE(PatternPass):
    name = "legalize-ort-moe"
    summary = "moe_permute -> grouped_swiglu -> moe_unpermute as one moe_experts (ONNX Runtime's MoE)"

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return [Pattern(DISPATCH, _fuse, name="moe-experts")]
