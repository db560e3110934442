"""chunk-kda{chunk-size=N}: prefill KDA runs in the chunkwise (WY/UT) form.

kda_fused_recurrent over T tokens -> kda_fused_chunk{chunk_size=N} (same operands and
results). Decode graphs (T = 1) keep the one-step recurrent form. Unfused kda_recurrent ops
have no chunked counterpart: run fuse-kda-gating first (the pass counts any left over)."""
from __future__ import annotations

from kimi_graph.ir import Graph

from .manager import Option, PassContext, register_pass
from .rewrite import P, Pattern, PatternPass


def _is_prefill(g: Graph, m) -> bool:
    return g.types[m.root.inputs[0]].shape[1] != 1      # q [B, T, H, K]: decode has T = 1


def _chunk(size: int):
    def chunk(m, rw) -> bool:
        op = m.root
        outs = rw.create("kda_fused_chunk", *op.inputs, like=op.outputs[0], name="kda",
                         scale=op.attrs["scale"], l2norm_eps=op.attrs["l2norm_eps"], chunk_size=size)
        rw.replace(dict(zip(op.outputs, outs)), erase=[op])
        return True
    return chunk


@register_pass
class ChunkKDA(PatternPass):
    name = "chunk-kda"
    summary = "prefill KDA: recurrent -> chunkwise (WY/UT) form; decode keeps the recurrence"
    options = {"chunk-size": Option(int, 64, "tokens per chunk")}
    leftover = ("kda_recurrent",)

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        size = ctx.options["chunk-size"]
        if size < 1:
            raise ValueError(f"chunk-kda: chunk-size must be >= 1, got {size}")
        return [Pattern(P("kda_fused_recurrent", open=True), _chunk(size), _is_prefill, "kda-chunked")]
