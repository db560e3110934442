"""chunk-kda{chunk-size=N}: prefill KDA runs in the chunkwise (WY/UT) form.

kda_fused_recurrent over T tokens -> kda_fused_chunk{chunk_size=N} (same operands and
results). Decode graphs (T = 1) keep the one-step recurrent form. Unfused kda_recurrent ops
have no chunked counterpart: run fuse-kda-gating first (the pass counts any left over)."""
from __future__ import annotations

from kimi_graph.ir import Graph

from .manager import Option, Pass, PassContext, register_pass
from .rewrite import P, Pattern, apply_patterns


def _prefill(g: Graph, op) -> bool:
    return g.types[op.inputs[0]].shape[1] != 1      # q [B, T, H, K]: decode has T = 1


def _is_prefill(g: Graph, m) -> bool:
    return _prefill(g, m.root)


@register_pass
class ChunkKDA(Pass):
    name = "chunk-kda"
    summary = "prefill KDA: recurrent -> chunkwise (WY/UT) form; decode keeps the recurrence"
    options = {"chunk-size": Option(int, 64, "tokens per chunk")}

    def run(self, g: Graph, ctx: PassContext) -> None:
        size = ctx.options["chunk-size"]
        if size < 1:
            raise ValueError(f"chunk-kda: chunk-size must be >= 1, got {size}")

        def chunk(m, rw) -> bool:
            op = m.root
            outs = rw.create("kda_fused_chunk", *op.inputs, like=op.outputs[0], name="kda",
                             scale=op.attrs["scale"], l2norm_eps=op.attrs["l2norm_eps"],
                             chunk_size=size)
            rw.replace(dict(zip(op.outputs, outs)), erase=[op])
            return True

        pattern = Pattern(P("kda_fused_recurrent", open=True), chunk, _is_prefill, "kda-chunked")
        for k, v in apply_patterns(g, [pattern]).applied.items():
            ctx.stat(k, v)
        left = sum(1 for op in g.ops() if op.kind == "kda_recurrent" and _prefill(g, op))
        if left:
            ctx.stat("kda-unfused-left-recurrent", left)

