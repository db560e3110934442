"""Primitive graph ops -> standard ONNX ops (ai.onnx, opset 23), and every fused op that has
a decomposition as that decomposition, inline (the fallback). Every operator set starts
from this table and overrides the kinds it maps differently.

Each entry: fn(ctx, op, ins) -> output names, `ins` the ONNX names of op.inputs. The
numerics follow the op library: fp32 statistics, softmax and state (see kimi_graph/ops)."""
from __future__ import annotations

import torch

from kimi_graph.ops import get_op
from kimi_graph.ops.decompose import decomposable_kinds

from .emitter import FLOAT, ONNX_DTYPES, table_registrar, tensor_proto

TABLE = {}

maps = table_registrar(TABLE)


def _inline_decomposition(ctx, op, ins):
    from .export import inline_decomposition
    return inline_decomposition(ctx, op, ins)


maps(*decomposable_kinds())(_inline_decomposition)


def to_acc(ctx, x: str, value: str) -> str:
    """Cast to fp32 unless already fp32 (the accumulation dtype of every exported graph)."""
    return x if ctx.ty(value).dtype == "f32" else ctx.em("Cast", x, to=FLOAT)


def cast_to(ctx, x: str, dtype: str) -> str:
    return x if dtype == "f32" else ctx.em("Cast", x, to=ONNX_DTYPES[dtype])


# -- elementwise ------------------------------------------------------------------------
for _k, _op in (("add", "Add"), ("sub", "Sub"), ("mul", "Mul"), ("div", "Div")):
    TABLE[_k] = (lambda onnx_op: lambda ctx, op, ins: [ctx.em(onnx_op, *ins)])(_op)
for _k, _op in (("neg", "Neg"), ("exp", "Exp"), ("sigmoid", "Sigmoid")):
    TABLE[_k] = (lambda onnx_op: lambda ctx, op, ins: [ctx.em(onnx_op, ins[0])])(_op)


@maps("silu")
def silu(ctx, op, ins):
    return [ctx.em("Mul", ins[0], ctx.em("Sigmoid", ins[0]))]


@maps("softplus")
def softplus(ctx, op, ins):
    """torch's softplus: x itself above the threshold 20 (no overflow of exp)."""
    return [softplus_torch(ctx.em, ins[0], ctx.ty(op.inputs[0]).dtype)]


def softplus_torch(em, x: str, dtype: str = "f32") -> str:
    return em("Where", em("Greater", x, em.const(20.0, dtype)), x, em("Softplus", x))


@maps("scale")
def scale(ctx, op, ins):
    return [ctx.em("Mul", ins[0], ctx.em.const(op.attrs["factor"], ctx.ty(op.inputs[0]).dtype))]


@maps("cast")
def cast(ctx, op, ins):
    return [ctx.em("Cast", ins[0], to=ONNX_DTYPES[op.attrs["dtype"]])]


# -- linear algebra and norms ----------------------------------------------------------------
@maps("linear")
def linear(ctx, op, ins):
    """x @ W^T; a weight parameter is stored transposed ([in, out]) once, as MatMul wants."""
    dt = ctx.ty(op.inputs[0]).dtype
    w = ctx.transposed_param(op.inputs[1], dt) or \
        ctx.em("Transpose", ctx.as_dtype(op.inputs[1], ins[1], dt), perm=[1, 0])
    return [ctx.em("MatMul", ins[0], w)]


@maps("matmul")
def matmul(ctx, op, ins):
    return [ctx.em("MatMul", ins[0], ctx.as_dtype(op.inputs[1], ins[1], ctx.ty(op.inputs[0]).dtype))]


@maps("rmsnorm")
def rmsnorm(ctx, op, ins):
    w = ctx.as_dtype(op.inputs[1], ins[1], ctx.ty(op.inputs[0]).dtype)
    return [ctx.em("RMSNormalization", ins[0], w, axis=-1, epsilon=float(op.attrs["eps"]),
                   stash_type=1)]


@maps("l2norm")
def l2norm(ctx, op, ins):
    """fp32 x / sqrt(sum(x^2) + eps) over the last dim, in x's dtype."""
    em = ctx.em
    xf = em("Cast", ins[0], to=FLOAT)
    ss = em("ReduceSum", em("Mul", xf, xf), em.ints(-1), keepdims=1)
    y = em("Div", xf, em("Sqrt", em("Add", ss, em.const(op.attrs["eps"], "f32"))))
    return [cast_to(ctx, y, ctx.ty(op.inputs[0]).dtype)]


# -- data movement ------------------------------------------------------------------------------
@maps("reshape")
def reshape(ctx, op, ins):
    return [ctx.em.reshape(ins[0], op.attrs["shape"])]


@maps("transpose")
def transpose(ctx, op, ins):
    return [ctx.em("Transpose", ins[0], perm=list(op.attrs["perm"]))]


@maps("slice")
def slice_(ctx, op, ins):
    a = op.attrs
    return [ctx.em("Slice", ins[0], ctx.em.ints(a["start"]), ctx.em.ints(a["end"]), ctx.em.ints(a["dim"]))]


@maps("take_last")
def take_last(ctx, op, ins):
    """Slice from -count to the end (INT64_MAX): the dim's size may be symbolic."""
    a = get_op("take_last").full_attrs(op.attrs)
    return [ctx.em("Slice", ins[0], ctx.em.ints(-a["count"]), ctx.em.ints(2 ** 63 - 1), ctx.em.ints(a["dim"]))]


@maps("concat")
def concat(ctx, op, ins):
    return [ctx.em("Concat", *ins, axis=op.attrs["dim"])]


@maps("expand")
def expand(ctx, op, ins):
    """Broadcast size-1 dims; dims already the right size stay 1 in the Expand shape."""
    src = ctx.ty(op.inputs[0]).shape
    dims = [1 if s == d else d for s, d in zip(src, op.attrs["shape"])]
    return [ctx.em("Expand", ins[0], ctx.em.shape(dims))]


@maps("embedding")
def embedding(ctx, op, ins):
    return [ctx.em("Gather", ins[1], ins[0], axis=0)]


@maps("zeros_like")
def zeros_like(ctx, op, ins):
    return [ctx.em("ConstantOfShape", ctx.em("Shape", ins[0]),
                   value=ctx.zero_tensor(ctx.ty(op.inputs[0]).dtype))]


@maps("cache_write")
def cache_write(ctx, op, ins):
    """cache[b, pos[b] + t] = new[b, t] (ScatterElements along the sequence axis; ONNX
    Runtime rejects indices past the cache instead of writing out of bounds)."""
    em = ctx.em
    cache, new, pos = ins
    T = em("Shape", new, start=1, end=2)
    t = em("Range", em.const(0, "i64"), em("Squeeze", T, em.ints(0)), em.const(1, "i64"))
    idx = em("Add", em("Unsqueeze", pos, em.ints(1, 2)), em("Unsqueeze", t, em.ints(0, 2)))
    idx = em("Expand", idx, em("Shape", new))
    return [em("ScatterElements", cache, idx, new, axis=1)]


# -- attention -----------------------------------------------------------------------------------
def causal_mask(em, q_start: str | None, T: str, S: str, key_valid: str | None = None) -> str:
    """bool [B|1, 1, T, S]: key s visible to query t of sequence b iff s <= q_start[b] + t
    (q_start defaults to S - T, a prefill with no cache before it). `key_valid` [B, S]
    (bool) also hides padded keys; a query left with no key (a pad) then sees every key, so
    its garbage row stays finite and never turns a real row's softmax into NaN."""
    zero, one = em.const(0, "i64"), em.const(1, "i64")
    tt = em("Range", zero, em("Squeeze", T, em.ints(0)), one)
    ss = em("Range", zero, em("Squeeze", S, em.ints(0)), one)
    if q_start is None:
        start = em("Sub", S, T)                                               # [1]
    else:
        start = em("Unsqueeze", q_start, em.ints(1))                           # [B, 1]
    pos = em("Add", start, em("Unsqueeze", tt, em.ints(0)))                     # [B|1, T]
    vis = em("LessOrEqual", em("Unsqueeze", ss, em.ints(0, 1)), em("Unsqueeze", pos, em.ints(-1)))
    vis = em("Unsqueeze", vis, em.ints(1))                                      # [B|1, 1, T, S]
    if key_valid is not None:
        vis = em("And", vis, em("Unsqueeze", key_valid, em.ints(1, 2)))
        seen = em("ReduceMax", em("Cast", vis, to=FLOAT), em.ints(-1), keepdims=1)
        vis = em("Or", vis, em("Equal", seen, em.const(0.0, "f32")))
    return vis


def attention_explicit(em, q, k, v, mask, scale) -> str:
    """softmax(q k^T * scale, masked) v in fp32 with q [B,H,T,D], k [B,Hk,S,D], v [B,Hk,S,Dv]
    (Hk 1 or H) -> fp32 [B,H,T,Dv]."""
    qf, kf, vf = (em("Cast", t, to=FLOAT) for t in (q, k, v))
    s = em("Mul", em("MatMul", qf, em("Transpose", kf, perm=[0, 1, 3, 2])), scale)
    s = em("Where", mask, s, em.const(float("-inf"), "f32"))
    return em("MatMul", em("Softmax", s, axis=-1), vf)


@maps("causal_attention")
def causal_attention(ctx, op, ins):
    em = ctx.em
    q, k, v = (em("Transpose", t, perm=[0, 2, 1, 3]) for t in ins[:3])
    mask = causal_mask(em, ins[3] if len(ins) > 3 else None, em("Shape", ins[0], start=1, end=2),
                       em("Shape", ins[1], start=1, end=2), ctx.key_valid)
    o = attention_explicit(em, q, k, v, mask, em.const(op.attrs["scale"], "f32"))
    return [cast_to(ctx, em("Transpose", o, perm=[0, 2, 1, 3]), ctx.ty(op.inputs[2]).dtype)]


# -- padded batches (onnxruntime-genai pads prompts; see genai.py) ----------------------------------
def token_masked(ctx, x: str) -> str:
    """x [B, T, C] with the rows of padded tokens zeroed (only when the model is fed padded
    batches): a left pad then enters the short conv as the zero state would."""
    if ctx.token_valid is None:
        return x
    em = ctx.em
    return em("Where", em("Unsqueeze", ctx.token_valid, em.ints(-1)), x,
              em("CastLike", em.const(0.0, "f32"), x))


def kda_hold(ctx, g: str, beta: str) -> tuple[str, str]:
    """Decay g [B,T,H,*] and beta [B,T,H] (fp32) zeroed on pads: the KDA state passes a pad
    unchanged (no decay, no update)."""
    if ctx.token_valid is None:
        return g, beta
    em = ctx.em
    zero = em.const(0.0, "f32")
    return (em("Where", em("Unsqueeze", ctx.token_valid, em.ints(2, 3)), g, zero),
            em("Where", em("Unsqueeze", ctx.token_valid, em.ints(2)), beta, zero))


def conv_state_at_last_token(ctx, xs: str, K: int) -> str:
    """The conv state after each sequence's last real token: columns [e - K + 1, e) of
    xs = [state, x^T] [B, C, K-1+T], e = K + (index of the last valid token); a right pad
    never enters it."""
    em = ctx.em
    T = em("Shape", ctx.token_valid, start=1, end=2)
    t = em("Range", em.const(0, "i64"), em("Squeeze", T, em.ints(0)), em.const(1, "i64"))
    last = em("ReduceMax", em("Where", ctx.token_valid, em("Unsqueeze", t, em.ints(0)), em.const(-1, "i64")),
              em.ints(1), keepdims=1)                                                   # [B, 1]
    idx = em("Add", em("Add", last, em.ints(1)), em("Unsqueeze", em.ints(*range(K - 1)), em.ints(0)))
    idx = em("Expand", em("Unsqueeze", idx, em.ints(1)),
             em("Concat", em("Shape", xs, start=0, end=2), em.ints(K - 1), axis=0))    # [B, C, K-1]
    return em("GatherElements", xs, idx, axis=2)


# -- MoE primitives ------------------------------------------------------------------------------
def grouped_topk(ctx, choice: str, dt: str, E: int, top_k: int, n_group: int, topk_group: int) -> str:
    """ids [..., top_k] (i64): the top_k experts of `choice` inside the topk_group groups with
    the best top-2 sums; other experts scored 0, as the official code does. ONNX TopK puts
    equal values in index order."""
    em = ctx.em
    lead = em("Shape", choice, start=0, end=-1)
    c = em("Reshape", choice, em.ints(-1, E))                                       # [N, E]
    per = E // n_group
    top2 = em.node("TopK", [em("Reshape", c, em.ints(-1, n_group, per)), em.ints(min(2, per))], 2,
                   axis=-1)[0]
    gscore = em("ReduceSum", top2, em.ints(-1), keepdims=0)                          # [N, G]
    gidx = em.node("TopK", [gscore, em.ints(topk_group)], 2, axis=-1)[1]
    zero = ctx.zero_tensor("bool")
    gmask = em("ScatterElements", em("ConstantOfShape", em("Shape", gscore), value=zero), gidx,
               em("ConstantOfShape", em("Shape", gidx), value=ctx.one_tensor("bool")), axis=1)
    emask = em("Reshape", em("Expand", em("Unsqueeze", gmask, em.ints(-1)), em.ints(1, 1, per)),
               em.ints(-1, E))
    masked = em("Where", emask, c, em.const(0.0, dt))
    ids = em.node("TopK", [masked, em.ints(top_k)], 2, axis=-1)[1]
    return em("Reshape", ids, em("Concat", lead, em.ints(top_k), axis=0))


@maps("grouped_topk")
def grouped_topk_op(ctx, op, ins):
    a, t = op.attrs, ctx.ty(op.inputs[0])
    return [grouped_topk(ctx, ins[0], t.dtype, t.shape[-1], a["top_k"], a["n_group"], a["topk_group"])]


@maps("take_along")
def take_along(ctx, op, ins):
    # a non-negative axis: onnx.reference mishandles axis=-1
    return [ctx.em("GatherElements", ins[0], ins[1], axis=ctx.ty(op.inputs[0]).rank - 1)]


@maps("renormalize")
def renormalize(ctx, op, ins):
    em, dt = ctx.em, ctx.ty(op.inputs[0]).dtype
    s = em("ReduceSum", ins[0], em.ints(-1), keepdims=1)
    return [em("Div", ins[0], em("Add", s, em.const(op.attrs["eps"], dt)))]


def swiglu(em, x: str, w1t: str, w3t: str, w2t: str) -> str:
    """w2 (silu(w1 x) * w3 x) with weights already [in, out]."""
    g = em("MatMul", x, w1t)
    return em("MatMul", em("Mul", em("Mul", g, em("Sigmoid", g)), em("MatMul", x, w3t)), w2t)


@maps("moe_expert")
def moe_expert(ctx, op, ins):
    """One routed expert over the tokens routed to it: gather those rows (NonZero), SwiGLU,
    scale by the routing weight, scatter-add into the accumulator."""
    em = ctx.em
    acc, x, ids, w = ins[:4]
    xdt = ctx.ty(op.inputs[1]).dtype
    w1, w3, w2 = (ctx.transposed_param(v, xdt) or em("Transpose", ctx.as_dtype(v, i, xdt), perm=[1, 0])
                  for v, i in zip(op.inputs[4:], ins[4:]))
    D, k = ctx.ty(op.inputs[1]).shape[-1], ctx.ty(op.inputs[2]).shape[-1]
    xf = em("Reshape", x, em.ints(-1, D))
    hit = em("Equal", em("Reshape", ids, em.ints(-1, k)), em.const(op.attrs["expert"], "i64"))
    wdt = ctx.ty(op.inputs[3]).dtype
    gate = em("ReduceSum", em("Mul", em("Reshape", w, em.ints(-1, k)), em("Cast", hit, to=ONNX_DTYPES[wdt])),
              em.ints(-1), keepdims=1)                                              # [N, 1]
    rows = em("NonZero", em("Cast", em("ReduceMax", em("Cast", hit, to=FLOAT), em.ints(-1), keepdims=0),
                             to=ONNX_DTYPES["bool"]))                               # [1, n]
    rows = em("Transpose", rows, perm=[1, 0])                                       # [n, 1]
    y = swiglu(em, em("GatherND", xf, rows), w1, w3, w2)
    y = to_acc(ctx, y, op.inputs[1])                                   # weights are fp32
    contrib = cast_to(ctx, em("Mul", em("GatherND", gate, rows), y), ctx.ty(op.inputs[0]).dtype)
    accf = em("Reshape", acc, em.ints(-1, D))
    out = em("ScatterND", accf, rows, contrib, reduction="add")
    return [em("Reshape", out, em("Shape", acc))]



# -- low-bit weights (ops/quant.py) ------------------------------------------------------
@maps("dequantize")
def dequantize(ctx, op, ins):
    """int4 / int8: codes (int4 unpacked from nibbles) -> blocked DequantizeLinear along K
    (zero point 2^(bits-1) when none is given); fp8: codes cast and multiplied by the block
    scales spread over their G x G blocks."""
    from kimi_graph.ops.quant import BITS, group_of
    em, fmt = ctx.em, op.attrs["format"]
    shape = ctx.ty(op.outputs[0]).shape
    N, K = shape[-2:]
    G = group_of(fmt, K, op.attrs["group_size"])
    sdt = ctx.ty(op.inputs[1]).dtype
    if fmt == "fp8":
        lead = list(shape[:-2])
        nb, kb = -(-N // G), -(-K // G)
        s = em("Unsqueeze", em("Unsqueeze", ins[1], em.ints(-1)), em.ints(-3))          # [.., nb, 1, kb, 1]
        s = em("Expand", s, em.ints(*lead, nb, G, kb, G))
        s = em("Reshape", s, em.ints(*lead, nb * G, kb * G))
        s = em("Slice", s, em.ints(0, 0), em.ints(N, K), em.ints(-2, -1))
        return [em("Mul", em("Cast", ins[0], to=ONNX_DTYPES[sdt]), s)]
    codes = ins[0]
    if fmt == "int4":
        lo = em("BitwiseAnd", codes, em.const(15, "u8"))
        hi = em("BitShift", codes, em.const(4, "u8"), direction="RIGHT")
        pair = em("Concat", em("Unsqueeze", lo, em.ints(-1)), em("Unsqueeze", hi, em.ints(-1)), axis=-1)
        codes = em("Reshape", pair, em.ints(*shape))
    zp = ins[2] if len(ins) > 2 else em("ConstantOfShape", em("Shape", ins[1]), value=tensor_proto(
        "zp", torch.full((1,), 2 ** (BITS[fmt] - 1), dtype=torch.uint8), ONNX_DTYPES["u8"]))
    return [em("DequantizeLinear", codes, ins[1], zp, axis=len(shape) - 1, block_size=G)]
