"""The `standard` operator set: default-domain ONNX ops only, at opset >= 27 (ONNX 1.22+), no
functions and no contrib domain: the most portable export.

- kda_recurrent -> LinearAttention(update_rule="gated_delta"), decay per key dim (KDA's
  recurrence exactly); the op's chunk size passes on as its `chunk_size` hint.
- causal_conv1d -> CausalConvWithState (channels first, as our [B, C, K-1] state).
- causal_attention / mla_latent_attention -> Attention (as in `ort`); rmsnorm ->
  RMSNormalization.
- Fused ops with a decomposition (KDA gating, norms, the router, ...) -> that decomposition,
  inline; the MoE dispatch ops -> their function bodies (TopK, Gather, MatMul in a Loop over
  experts, ScatterND), inlined by onnx.inliner.
"""
from __future__ import annotations

from . import ort, portable, primitives
from .emitter import table_registrar

MIN_OPSET = 27          # LinearAttention, CausalConvWithState

TABLE = dict(primitives.TABLE)

maps = table_registrar(TABLE)

maps("causal_attention")(ort.causal_attention)
maps("mla_latent_attention")(ort.mla_latent_attention)
maps("moe_permute")(portable.moe_permute)
maps("grouped_swiglu", "moe_unpermute")(portable.moe_dispatch_call)


@maps("kda_recurrent")
def kda_recurrent(ctx, op, ins):
    return ort.kda_recurrent(ctx, op, ins, domain="")


@maps("causal_conv1d")
def causal_conv1d(ctx, op, ins):
    em = ctx.em
    x = em("Transpose", primitives.token_masked(ctx, ins[0]), perm=[0, 2, 1])          # [B, C, T]
    y, new = em.node("CausalConvWithState", [x, ins[1], ""] + ins[2:3], 2, activation=op.attrs["activation"])
    y = em("Transpose", y, perm=[0, 2, 1])
    if ctx.token_valid is not None:      # padded batch: the state after each last real token
        prev = ins[2] if len(ins) > 2 else portable.zeros(ctx, ctx.ty(op.outputs[1]).shape, ctx.ty(op.outputs[1]).dtype)
        return [y, primitives.conv_state_at_last_token(ctx, em("Concat", prev, x, axis=2),
                                                       ctx.ty(op.inputs[1]).shape[2])]
    return [y, new]


def inline_functions(model):
    """The model with every local function inlined and our domain's import dropped."""
    from onnx import inliner
    model = inliner.inline_local_functions(model)
    kept = [o for o in model.opset_import if o.domain == ""]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model
