"""quantize-experts{format=int8|fp8|int4,group-size=128,symmetric=true}: weight-only low-bit
routed experts (formats in kimi_graph/ops/quant.py).

    grouped_swiglu(rows, offsets, w13, w2)
        -> quantized_grouped_swiglu(rows, offsets, *quantize(w13), *quantize(w2))
    moe_experts(x, ids, weights, w13, w2, acc) -> quantized_moe_experts(...) likewise

quantize reads only parameters, so the fold-constants after it (QUANTIZE_PIPELINE) makes its
results parameters: "@...experts.w13.codes", ".scales" (and ".zeros" when asymmetric), with
recipes that the loader runs layer by layer as the originals arrive (kimi_graph.loading).
Runs after fuse-moe-dispatch: a per-expert moe_expert loop is refused.
"""
from __future__ import annotations

from kimi_graph.ir import Graph
from kimi_graph.ops.quant import FORMATS

from .manager import Option, PassContext, PassError, register_pass
from .rewrite import Pattern, PatternPass, P

# what quantized experts are loaded with (kimi_graph.load(..., experts=...))
QUANTIZE_PIPELINE = "quantize-experts{{format={fmt},group-size={group}}},fold-constants"


def quantize_pipeline(fmt: str, group_size: int = 128) -> str:
    return QUANTIZE_PIPELINE.format(fmt=fmt, group=group_size)


def _quantized(rw, w: str, opts: dict) -> list[str]:
    """(codes, scales, zeros) of weight value `w`, named "<w>.codes", ..."""
    outs = rw.create("quantize", w, format=opts["format"], group_size=opts["group-size"],
                     symmetric=opts["symmetric"])
    base = w.lstrip("%@")
    named = []
    for v, part in zip(outs, ("codes", "scales", "zeros")):
        want = rw.g.fresh(f"{base}.{part}")
        rw.g.rename_value(v, want)
        named.append(want)
    return named if not opts["symmetric"] else named[:2]


def _rewrite(kind: str, lead: int, opts: dict):
    def rewrite(m, rw) -> bool:
        op = m.root
        w13, w2 = op.inputs[lead:lead + 2]
        q13, q2 = _quantized(rw, w13, opts), _quantized(rw, w2, opts)
        ins = op.inputs[:lead] + q13[:2] + q2[:2] + op.inputs[lead + 2:] + q13[2:] + q2[2:]
        out = rw.create1(kind, *ins, like=op.outputs[0], name="experts", format=opts["format"],
                         group_size=opts["group-size"])
        rw.replace({op.outputs[0]: out}, erase=[op])
        return True
    return rewrite


@register_pass
class QuantizeExperts(PatternPass):
    name = "quantize-experts"
    summary = "routed experts' weights -> low-bit codes and scales (weight-only int4 / int8 / fp8)"
    options = {"format": Option(str, "int4", "int4, int8 or fp8", FORMATS),
               "group-size": Option(int, 128, "elements per scale along K (fp8: G x G blocks); "
                                    "the whole row when shorter"),
               "symmetric": Option(bool, True, "symmetric int codes (no zero points)")}

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        opts = ctx.options
        if opts["group-size"] <= 0:
            raise PassError(f"quantize-experts: group-size must be positive, got {opts['group-size']}")
        if opts["format"] == "fp8" and not opts["symmetric"]:
            raise PassError("quantize-experts: fp8 is symmetric only")
        return [Pattern(P("grouped_swiglu", open=True), _rewrite("quantized_grouped_swiglu", 2, opts),
                        name="grouped-swiglu"),
                Pattern(P("moe_experts", open=True), _rewrite("quantized_moe_experts", 3, opts),
                        name="moe-experts")]

    def run(self, g: Graph, ctx: PassContext) -> None:
        if any(op.kind == "moe_expert" for op in g.ops()):
            raise PassError("quantize-experts: the routed experts are still a per-expert loop; "
                            "run fuse-moe-dispatch first (e.g. 'default,quantize-experts')")
        super().run(g, ctx)
