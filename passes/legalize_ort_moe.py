"""legalize-ort-moe: the routed experts become one moe_experts op, the form ONNX Runtime's
MoE computes (lowering/onnx/ort.py maps it; its decomposition serves every other target) and
the Triton backend runs fused (rows read by index, un-permute in the down projection's
epilogue; lowering/triton/backend.py runs this pass on the graphs it is given).

    moe_unpermute(grouped_swiglu(moe_permute(x, ids)), order, weights, acc)
        -> moe_experts(x, ids, weights, w13, w2, acc)
    (quantized_grouped_swiglu likewise -> quantized_moe_experts: ONNX Runtime's QMoE)

The `ort` ONNX export runs LEGALIZE_ORT first (fuse-moe-dispatch packs a declared model's
per-expert loop); `kimi-graph inspect MODEL --pipeline "default,legalize-ort-moe"` shows the
result.
"""
from __future__ import annotations

from .manager import Option, PassContext, register_pass
from .rewrite import P, Pattern, PatternPass, V

LEGALIZE_ORT = "fuse-moe-dispatch,fold-constants,legalize-ort-moe"

DISPATCH = P("moe_unpermute",
             P("grouped_swiglu", P("moe_permute", V("x"), V("ids"), name="perm"),
               P("moe_permute", V("x"), V("ids"), name="perm", result=1), V("w13"), V("w2"), name="gs"),
             P("moe_permute", V("x"), V("ids"), name="perm", result=2), V("weights"), V("acc"))


# the quantized form (quantize-experts): codes, scales (and zero points) after rows and offsets
QUANTIZED = P("moe_unpermute", P("quantized_grouped_swiglu", P("moe_permute", V("x"), V("ids"), name="perm"),
                                 P("moe_permute", V("x"), V("ids"), name="perm", result=1), open=True, name="gs"),
              P("moe_permute", V("x"), V("ids"), name="perm", result=2), V("weights"), V("acc"))


def _fuse_quantized(m, rw) -> bool:
    """-> quantized_moe_experts(x, ids, weights, w13 codes, scales, w2 codes, scales, acc, zeros...)"""
    gs = m["gs"]
    q = gs.inputs[2:]
    out = rw.create1("quantized_moe_experts", m["x"], m["ids"], m["weights"], *q[:4], m["acc"], *q[4:],
                     like=m.root.outputs[0], name="experts", **gs.attrs)
    rw.replace({m.root.outputs[0]: out}, erase=[m.root])
    return True


def _fuse(m, rw) -> bool:
    out = rw.create1("moe_experts", m["x"], m["ids"], m["weights"], m["w13"], m["w2"], m["acc"],
                     like=m.root.outputs[0], name="experts")
    rw.replace({m.root.outputs[0]: out}, erase=[m.root])
    return True


@register_pass
class LegalizeORTMoE(PatternPass):
    name = "legalize-ort-moe"
    summary = "moe_permute -> grouped_swiglu -> moe_unpermute as one moe_experts (ONNX Runtime's MoE)"

    options = {"quantized": Option(bool, True, "the quantized chain too (the Triton backend keeps it: its "
                                               "quantized grouped SwiGLU kernels run it)")}

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return [Pattern(DISPATCH, _fuse, name="moe-experts")] + (
            [Pattern(QUANTIZED, _fuse_quantized, name="quantized-moe-experts")] if ctx.options["quantized"] else [])
