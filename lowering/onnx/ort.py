"""The `ort` operator set (default): ONNX Runtime's fused contrib ops (com.microsoft) and
opset-23 Attention where their semantics equal ours exactly (checked against the
installed build; see tests/test_onnx_ort_ops.py); the portable mapping elsewhere.

- KDA recurrence -> LinearAttention(update_rule="gated_delta"), decay per key dim [B,T,H*K];
  state, q/k/v, decay and beta in fp32 (the op ties decay and beta to the query's type).
- causal_conv1d -> CausalConvWithState(channels_last=1, fused SiLU); our [B,C,K-1] state is
  transposed to the op's channels-last [B,K-1,C] (a few values per channel).
- causal_attention / mla_latent_attention -> Attention (opset 23) with a boolean mask from
  cache_pos; MLA in latent space is attention with one shared KV head (kv_num_heads=1).
- add_rmsnorm -> SkipSimplifiedLayerNormalization (its 4th output is x + residual).
- Experts -> MoE, after the legalisation pipeline LEGALIZE_ORT (passes/legalize_ort_moe.py) has
  made each layer's routed experts one moe_experts op. MoE's router differs from Kimi's (it
  takes top-k of softmax(router_probs); Kimi selects by biased sigmoid scores, renormalises
  and scales, and "official" weights may even be negative), so routing stays in our nodes
  and MoE gets our choice: one k-way call on router_probs = log(weights) (scaled back by
  their sum) when all weights are positive, else one k=1 call per routing slot on one-hot
  router_probs (see moe_calls). ORT's CPU kernel wants the gate/up rows interleaved.
- Low-bit experts (quantize-experts; legalised to quantized_moe_experts) -> QMoE: symmetric
  int4 / int8 codes as they are (our layouts are its), one call whose router_weights input
  carries our routing weights (see quantized_moe_experts).
"""
from __future__ import annotations

import torch
from onnx import helper

from . import portable, primitives
from .emitter import FLOAT, MS, ONNX_DTYPES, Emitter, table_registrar

TABLE = dict(portable.TABLE)

maps = table_registrar(TABLE)


@maps("causal_conv1d")
def causal_conv1d(ctx, op, ins):
    em = ctx.em
    x = primitives.token_masked(ctx, ins[0])
    st = [em("Transpose", ins[2], perm=[0, 2, 1])] if len(ins) > 2 else []
    y, new = em.node("CausalConvWithState", [x, ins[1], ""] + st, 2, domain=MS, channels_last=1,
                     activation=op.attrs["activation"])
    if ctx.token_valid is not None:      # padded batch: the state after each last real token
        K = ctx.ty(op.inputs[1]).shape[2]
        prev = ins[2] if len(ins) > 2 else portable.zeros(ctx, ctx.ty(op.outputs[1]).shape, ctx.ty(op.outputs[1]).dtype)
        xs = em("Concat", prev, em("Transpose", x, perm=[0, 2, 1]), axis=2)
        return [y, primitives.conv_state_at_last_token(ctx, xs, K)]
    return [y, em("Transpose", new, perm=[0, 2, 1])]


def linear_attention(ctx, op, q, k, v, g, beta, state, domain: str = MS):
    """LinearAttention on [B,T,H,*] inputs (all cast to fp32) -> (o in v's dtype, state);
    ONNX Runtime's contrib op, or (domain "") the standard one of opset 27."""
    em = ctx.em
    B, T, H, K = ctx.ty(op.inputs[0]).shape
    g, beta = primitives.kda_hold(ctx, em("Reshape", g, em.ints(0, 0, H, -1)), em("Cast", beta, to=FLOAT))
    f32 = [primitives.to_acc(ctx, x, name) for x, name in ((q, op.inputs[0]), (k, op.inputs[1]),
                                                           (v, op.inputs[2]))]
    packed = [em("Reshape", x, em.ints(0, 0, -1)) for x in f32 + [g]]
    chunk = {"chunk_size": op.attrs["chunk_size"]} if domain == "" and op.attrs.get("chunk_size") else {}
    o, s = em.node("LinearAttention", packed[:3] + [state or "", packed[3], beta], 2, domain=domain,
                   q_num_heads=H, kv_num_heads=H, scale=float(op.attrs["scale"]), update_rule="gated_delta",
                   **chunk)
    o = em("Reshape", o, em.ints(0, 0, H, -1))
    return [primitives.cast_to(ctx, o, ctx.ty(op.inputs[2]).dtype), s]


@maps("kda_recurrent")
def kda_recurrent(ctx, op, ins, domain: str = MS):
    g = ctx.em("Cast", ins[3], to=FLOAT)
    return linear_attention(ctx, op, *ins[:3], g, ins[4], ins[5] if len(ins) > 5 else None, domain)


# gate, beta and L2 norms in standard ops (fp32), then LinearAttention
maps("kda_fused_recurrent", "kda_fused_chunk")(primitives.TABLE["kda_fused_recurrent"])


def attention(ctx, q, k, v, mask, scale, q_heads, kv_heads, out_dtype, in_dtype):
    """Opset-23 Attention on [B,H,T,D] inputs in fp32 (softmax in fp32) -> [B,T,H,Dv]."""
    em = ctx.em
    q, k, v = (x if in_dtype == "f32" else em("Cast", x, to=FLOAT) for x in (q, k, v))
    o = em("Attention", q, k, v, mask, scale=float(scale))          # 4D: heads from the shapes
    return primitives.cast_to(ctx, em("Transpose", o, perm=[0, 2, 1, 3]), out_dtype)


@maps("causal_attention")
def causal_attention(ctx, op, ins):
    em = ctx.em
    H = ctx.ty(op.inputs[0]).shape[2]
    q, k, v = (em("Transpose", t, perm=[0, 2, 1, 3]) for t in ins[:3])
    mask = primitives.causal_mask(em, ins[3] if len(ins) > 3 else None, em("Shape", ins[0], start=1, end=2),
                                em("Shape", ins[1], start=1, end=2), ctx.key_valid)
    return [attention(ctx, q, k, v, mask, op.attrs["scale"], H, H, ctx.ty(op.inputs[2]).dtype,
                      ctx.ty(op.inputs[0]).dtype)]


@maps("mla_latent_attention")
def mla_latent_attention(ctx, op, ins):
    em = ctx.em
    ql, qr, c, kr = ins[:4]
    H = ctx.ty(op.inputs[0]).shape[2]
    q = em("Transpose", em("Concat", ql, qr, axis=-1), perm=[0, 2, 1, 3])           # [B,H,T,R+P]
    k = em("Unsqueeze", em("Concat", c, kr, axis=-1), em.ints(1))                    # [B,1,S,R+P]
    v = em("Unsqueeze", c, em.ints(1))                                               # [B,1,S,R]
    mask = primitives.causal_mask(em, ins[4] if len(ins) > 4 else None, em("Shape", ql, start=1, end=2),
                                em("Shape", c, start=1, end=2), ctx.key_valid)
    return [attention(ctx, q, k, v, mask, op.attrs["scale"], H, 1, ctx.ty(op.inputs[0]).dtype,
                      ctx.ty(op.inputs[0]).dtype)]


@maps("add_rmsnorm")
def add_rmsnorm(ctx, op, ins):
    outs = ctx.em.node("SkipSimplifiedLayerNormalization", ins, 4, domain=MS, epsilon=float(op.attrs["eps"]))
    return [outs[0], outs[3]]


# -- MoE ------------------------------------------------------------------------------------------------
def moe_calls(ctx, x: str, ids: str, w: str, w13: str, w2: str, E: int, D: int, k: int, w_dtype: str,
              x_dtype: str) -> str:
    """sum_j w[..., j] * SwiGLU_{ids[..., j]}(x) as fp32 [N, D]. When every routing weight
    is positive (the usual case), one MoE(k) call on router_probs = log w (and a very negative
    logit elsewhere), whose top-k softmax gives w / sum(w), times sum(w); otherwise k MoE(k=1)
    calls on one-hot router_probs (softmax of one logit is exactly 1), weighted here. An If
    picks the branch per call; both are exact (the first up to the rounding of log/exp)."""
    em = ctx.em
    xf = em("Reshape", x, em.ints(-1, D))
    idf = em("Reshape", ids, em.ints(-1, k))
    wf = em("Cast", em("Reshape", w, em.ints(-1, k)), to=FLOAT)                      # [N, k]

    def moe(probs, kk):
        return ctx.em.node("MoE", [xf, primitives.cast_to(ctx, probs, x_dtype), w13, "", w2], 1, domain=MS, k=kk,
                       activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)[0]

    def branch(build, tag):
        outer = ctx.em
        ctx.em = Emitter(f"{outer.fresh(tag)}_")
        try:
            out = build()
            ctx.em.node("Identity", [out], outputs=[ctx.em.fresh("out")])
            return helper.make_graph(ctx.em.nodes, tag, [],
                                     [helper.make_tensor_value_info(ctx.em.nodes[-1].output[0], FLOAT, None)])
        finally:
            outer.opsets.update(ctx.em.opsets)
            ctx.em = outer

    def single():
        em = ctx.em
        low = -6e4 if x_dtype == "f16" else -1e30
        logits = em("ScatterElements", em("ConstantOfShape", em("Concat", em("Shape", idf, start=0, end=1),
                                                                 em.ints(E), axis=0),
                                            value=helper.make_tensor("low", FLOAT, [1], [low])),
                    idf, em("Log", wf), axis=1)
        y = em("Cast", moe(logits, k), to=FLOAT)
        return em("Mul", y, em("ReduceSum", wf, em.ints(1), keepdims=1))

    def per_slot():
        em = ctx.em
        on = em.const([0.0, 1.0], "f32")                                              # OneHot [off, on]
        total = None
        for j in range(k):
            onehot = em("OneHot", em("Gather", idf, em.ints(j), axis=1), em.const(E, "i64"), on, axis=-1)
            y = em("Cast", moe(em("Reshape", onehot, em.ints(-1, E)), 1), to=FLOAT)
            term = em("Mul", em("Gather", wf, em.ints(j), axis=1), y)
            total = term if total is None else em("Add", total, term)
        return total

    positive = em("Greater", em("ReduceMin", wf, keepdims=0), em.const(0.0, "f32"))
    return em("If", positive, then_branch=branch(single, "moe_one_call"), else_branch=branch(per_slot, "moe_per_slot"))


def interleave(w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """[E,I,D] gate and up -> [E,2I,D] rows g0,u0,g1,u1,... (ORT CPU: swiglu_fusion=1)."""
    return torch.stack([w1, w3], dim=2).reshape(w1.shape[0], 2 * w1.shape[1], w1.shape[2])


@maps("moe_experts")
def moe_experts(ctx, op, ins):
    """The routed experts (legalize-ort-moe made them one op) as MoE calls; expert weights
    that are not parameters (nothing to interleave at export) take the decomposition."""
    x_v, ids_v, w_v, w13_v, w2_v, acc_v = op.inputs
    if not (ctx.is_param(w13_v) and ctx.is_param(w2_v)):
        return primitives.TABLE[op.kind](ctx, op, ins)
    em = ctx.em
    I = ctx.ty(w2_v).shape[2]
    w13 = ctx.derived_param(w13_v[1:] + ".interleaved", lambda: interleave(
        ctx.param(w13_v)[:, :I], ctx.param(w13_v)[:, I:]))
    x_ty, acc_ty = ctx.ty(x_v), ctx.ty(acc_v)
    D = x_ty.shape[-1]
    total = moe_calls(ctx, ins[0], ins[1], ins[2], w13, ins[4], ctx.ty(w13_v).shape[0], D,
                      ctx.ty(ids_v).shape[-1], ctx.ty(w_v).dtype, x_ty.dtype)
    out = em("Add", em("Reshape", ins[5], em.ints(-1, D)), primitives.cast_to(ctx, total, acc_ty.dtype))
    return [em("Reshape", out, em("Shape", ins[5]))]


@maps("quantized_moe_experts")
def quantized_moe_experts(ctx, op, ins):
    """Symmetric int4 / int8 experts -> one QMoE call fed by our router: router_probs is 1 at
    the chosen experts (its top-k picks exactly them) and router_weights carries our weights,
    mixed as they are (normalize_routing_weights=0). Gate / up rows interleaved
    (swiglu_fusion=1); block_size = the quantization group, or none (per-row scales) when
    both projections' groups are whole rows. Otherwise (fp8, zero points, groups QMoE cannot
    state, weights that are not parameters) the decomposition: dequantize, then the float MoE."""
    from kimi_graph.ops.quant import BITS, group_of
    fmt, group = op.attrs["format"], op.attrs["group_size"]
    x_v, ids_v, w_v, q13_v, s13_v, q2_v, s2_v, acc_v = op.inputs[:8]
    x_ty = ctx.ty(x_v)
    D, I = x_ty.shape[-1], ctx.ty(q13_v).shape[1] // 2
    G1, G2 = (group_of(fmt, D, group), group_of(fmt, I, group)) if fmt in BITS else (0, 0)
    whole = G1 == D and G2 == I
    blocked = G1 == G2 and G1 >= 16 and G1 & (G1 - 1) == 0
    if fmt not in BITS or len(op.inputs) > 8 or not (whole or blocked) \
            or not all(ctx.is_param(v) for v in op.inputs[3:7]):
        return primitives.TABLE[op.kind](ctx, op, ins)
    em = ctx.em

    def gate_up(v):
        """A [E, 2I, ...] parameter with gate and up rows interleaved."""
        return ctx.derived_param(v[1:] + ".interleaved", lambda: interleave(ctx.param(v)[:, :I], ctx.param(v)[:, I:]))

    def per_row(name):
        return em("Reshape", name, em.ints(0, 0)) if whole else name        # [E, N, 1] -> [E, N]

    E, k = ctx.ty(q13_v).shape[0], ctx.ty(ids_v).shape[-1]
    xf = em("Reshape", ins[0], em.ints(-1, D))
    idf = em("Reshape", ins[1], em.ints(-1, k))
    wf = em("Reshape", ins[2], em.ints(-1, k))
    if ctx.ty(w_v).dtype != x_ty.dtype:
        wf = em("Cast", wf, to=ONNX_DTYPES[x_ty.dtype])
    base = em("ConstantOfShape", em("Concat", em("Shape", idf, start=0, end=1), em.ints(E), axis=0),
              value=ctx.zero_tensor(x_ty.dtype))
    probs = em("ScatterElements", base, idf, em("Expand", em.const([1.0], x_ty.dtype), em("Shape", idf)), axis=1)
    mix = em("ScatterElements", base, idf, wf, axis=1)
    attrs = {"k": k, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 0,
             "expert_weight_bits": BITS[fmt], "activation_alpha": 1.0, "activation_beta": 0.0,
             **({} if whole else {"block_size": G1})}
    y = em.node("QMoE", [xf, probs, gate_up(q13_v), per_row(gate_up(s13_v)), "", ins[5], per_row(ins[6]), "",
                         "", "", "", "", "", "", mix], 1, domain=MS, **attrs)[0]
    out = em("Add", em("Reshape", ins[7], em.ints(-1, D)), y if x_ty.dtype == ctx.ty(acc_v).dtype else em("Cast", y, to=ONNX_DTYPES[ctx.ty(acc_v).dtype]))
    return [em("Reshape", out, em("Shape", ins[7]))]
