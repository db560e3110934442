"""Hand-written function bodies (standard ONNX ops only) for the nodes of our `kimi_graph`
domain that have no decomposition in the op library: the KDA recurrence in its chunkwise
form (a Loop over chunks) and the MoE dispatch ops. (The fused ops' bodies are generated
from their decompositions: export.decomposition_call.)

Bodies are generic in the model dtype (CastLike back to an input's type) and compute in
fp32, as the op library does. Float/int attributes of the calling node reach the body
through attribute references."""
from __future__ import annotations

from onnx import AttributeProto, TensorProto, helper

from .emitter import FLOAT, Emitter, attr_ref
from .primitives import swiglu

KDA_CHUNK = 16      # tokens per chunk where the IR leaves the choice (kda_recurrent{chunk_size=0})


def _bool(v: bool):
    return helper.make_tensor("b", TensorProto.BOOL, [1], [v])


def _true(em: Emitter) -> str:
    """A loop condition that stays true (onnx.reference stops at once on an omitted one)."""
    return em.node("Constant", [], value=helper.make_tensor("t", TensorProto.BOOL, [], [True]))[0]


def _attr_float(em: Emitter, ref: str) -> str:
    """A float attribute of the caller as a [1] fp32 tensor."""
    return em("Reshape", em.node("Constant", [], value_float=attr_ref("value_float", ref, AttributeProto.FLOAT))[0], em.ints(1))


def _attr_int(em: Emitter, ref: str) -> str:
    """An int attribute of the caller as a [1] int64 tensor."""
    return em("Reshape", em.node("Constant", [], value_int=attr_ref("value_int", ref, AttributeProto.INT))[0], em.ints(1))


# -- KDA: the chunkwise form with a Loop over chunks ---------------------------------------------
def kda_chunkwise(em: Emitter, chunk: int):
    """kda_chunkwise(q, k, v [B,T,H,*], g [B,T,H,K] fp32, beta [B,T,H] fp32, state [B,H,K,V]
    fp32) {scale} -> (o [B,T,H,V] like v, state), in chunks of min(T, `chunk`) tokens, with
    (I + A)^-1 as a product of ceil(log2 chunk) factors. The token axis is padded to whole chunks with
    k = v = g = beta = 0 (padding leaves the state untouched); per chunk, with cumulative log
    decay G (decay ratios masked before the exp, so nothing overflows):
      A = strict_lower(beta_r k_r.k_i e^(G_r-G_i)),  T = (I + A)^-1 = prod_j (I + (-A)^(2^j)),
      u = T beta (v - (k e^G) S),  o = scale ((q e^G) S + lower(q_r.k_i e^(G_r-G_i)) u),
      S' = e^(G_last) S + (k e^(G_last - G))^T u.
    Everything but the state update is batched over all chunks; a Loop carries the state."""
    q, k, v, g, beta, s0 = "q", "k", "v", "g", "beta", "state"
    hf = [em("Transpose", em("Cast", x, to=FLOAT), perm=[0, 2, 1, 3]) for x in (q, k, v, g)]
    bh = em("Transpose", em("Cast", beta, to=FLOAT), perm=[0, 2, 1])              # [B,H,T]
    T = em("Shape", q, start=1, end=2)
    C = em("Min", T, em.ints(chunk))
    n = em("Div", em("Sub", em("Add", T, C), em.ints(1)), C)
    pad = em("Sub", em("Mul", n, C), T)
    pads4 = em("Concat", em.ints(0, 0, 0, 0, 0, 0), pad, em.ints(0), axis=0)
    pads3 = em("Concat", em.ints(0, 0, 0, 0, 0), pad, axis=0)

    def chunks(x, last):
        return em("Reshape", em("Pad", x, pads4), em("Concat", em.ints(0, 0, -1), C, last, axis=0))
    K = em("Shape", k, start=3, end=4)
    V = em("Shape", v, start=3, end=4)
    qc, kc, vc, gc = chunks(hf[0], K), chunks(hf[1], K), chunks(hf[2], V), chunks(hf[3], K)
    bc = em("Unsqueeze", em("Reshape", em("Pad", bh, pads3), em("Concat", em.ints(0, 0, -1), C, axis=0)),
            em.ints(-1))                                                              # [B,H,n,C,1]
    G = em("CumSum", gc, em.const(3, "i64"))                                          # [B,H,n,C,K]
    diff = em("Sub", em("Unsqueeze", G, em.ints(4)), em("Unsqueeze", G, em.ints(3)))   # [..,r,i,K]
    r = em("Range", em.const(0, "i64"), em("Squeeze", C, em.ints(0)), em.const(1, "i64"))
    rr, ii = em("Unsqueeze", r, em.ints(1)), em("Unsqueeze", r, em.ints(0))
    ninf = em.const(float("-inf"), "f32")
    incl = em("Exp", em("Where", em("Unsqueeze", em("GreaterOrEqual", rr, ii), em.ints(-1)), diff, ninf))
    strict = em("Exp", em("Where", em("Unsqueeze", em("Greater", rr, ii), em.ints(-1)), diff, ninf))
    k_r, k_i = em("Unsqueeze", kc, em.ints(4)), em("Unsqueeze", kc, em.ints(3))
    A = em("Mul", em("ReduceSum", em("Mul", em("Mul", k_r, k_i), strict), em.ints(-1), keepdims=0), bc)
    qk = em("ReduceSum", em("Mul", em("Mul", em("Unsqueeze", qc, em.ints(4)), k_i), incl), em.ints(-1),
            keepdims=0)                                                               # [B,H,n,C,C]
    eye = em("Cast", em("EyeLike", em("Squeeze", em("Slice", A, em.ints(0, 0, 0), em.ints(1, 1, 1),
                                                     em.ints(0, 1, 2)), em.ints(0, 1, 2))), to=FLOAT)
    Nn = em("Neg", A)
    Tinv = em("Add", eye, Nn)
    Np = Nn
    for _ in range(max(chunk - 1, 1).bit_length() - 1):   # (I+N)(I+N^2)... = sum_{j<2^m} N^j
        Np = em("MatMul", Np, Np)
        Tinv = em("MatMul", Tinv, em("Add", eye, Np))
    eG = em("Exp", G)
    W = em("MatMul", Tinv, em("Mul", bc, em("Mul", kc, eG)))                       # [B,H,n,C,K]
    U0 = em("MatMul", Tinv, em("Mul", bc, vc))                                      # [B,H,n,C,V]
    scale = em.node("Constant", [], value_float=attr_ref("value_float", "scale", AttributeProto.FLOAT))[0]
    qG = em("Mul", em("Mul", qc, eG), scale)
    qk = em("Mul", qk, scale)
    last = em("Gather", G, em("Sub", C, em.ints(1)), axis=3)                        # [B,H,n,1,K]
    kdec = em("Mul", kc, em("Exp", em("Sub", last, G)))
    dlast = em("Transpose", em("Exp", last), perm=[0, 1, 2, 4, 3])                  # [B,H,n,K,1]
    # the loop over chunks: only the state-dependent part
    body = em.body(em.prefix + "step_")
    it = "i"

    def at(x):
        return body("Gather", x, it, axis=2)
    Sb = "S_in"
    u = body("Sub", at(U0), body("MatMul", at(W), Sb))
    o = body("Add", body("MatMul", at(qG), Sb), body("MatMul", at(qk), u))
    S2 = body("Add", body("Mul", at(dlast), Sb),
              body("MatMul", body("Transpose", at(kdec), perm=[0, 1, 3, 2]), u))
    body.node("Identity", ["cond_in"], outputs=["cond_out"])
    body.node("Identity", [S2], outputs=["S_out"])
    # outputs gathered as a carried [i, B,H,C,V] tensor (not a scan output: onnx.reference
    # concatenates scan outputs of rank > 1 instead of stacking them)
    body.node("Concat", ["O_in", body("Unsqueeze", o, body.ints(0))], outputs=["O_out"], axis=0)
    bgraph = helper.make_graph(
        body.nodes, "kda_chunk_step",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info(Sb, FLOAT, None),
         helper.make_tensor_value_info("O_in", FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("S_out", FLOAT, None),
         helper.make_tensor_value_info("O_out", FLOAT, None)])
    empty = em("Slice", em("Transpose", U0, perm=[2, 0, 1, 3, 4]), em.ints(0), em.ints(0), em.ints(0))
    S_end, os = em.node("Loop", [em("Squeeze", n, em.ints(0)), _true(em), em("Cast", s0, to=FLOAT), empty], 2,
                        body=bgraph)
    o = em("Transpose", os, perm=[1, 0, 3, 2, 4])                                   # [B,n,C,H,V]
    o = em("Reshape", o, em("Concat", em.ints(0, -1), em("Shape", v, start=2, end=4), axis=0))
    o = em("Slice", o, em.ints(0), T, em.ints(1))
    em.node("CastLike", [o, v], outputs=["o"])
    em.node("Identity", [S_end], outputs=["state_out"])
    return [q, k, v, g, beta, s0], ["o", "state_out"], ["scale"]


# -- MoE dispatch -------------------------------------------------------------------------------------
def moe_permute(em: Emitter):
    """moe_permute(x, ids) {num_experts} -> (rows, offsets, order): stable sort of the token
    copies by expert (TopK keeps equal keys in index order)."""
    D = em("Shape", "x", start=-1)
    k = em("Shape", "ids", start=-1)
    flat = em("Reshape", "ids", em.ints(-1))
    M = em("Shape", flat)
    order = em.node("TopK", [flat, M], 2, largest=0, sorted=1, axis=0)[1]
    xr = em("Reshape", "x", em("Concat", em.ints(-1), D, axis=0))
    em.node("Gather", [xr, em("Div", order, k)], outputs=["rows"], axis=0)
    E = _attr_int(em, "num_experts")
    experts = em("Range", em.const(0, "i64"), em("Squeeze", E, em.ints(0)), em.const(1, "i64"))
    counts = em("ReduceSum", em("Cast", em("Equal", em("Unsqueeze", flat, em.ints(1)),
                                         em("Unsqueeze", experts, em.ints(0))), to=TensorProto.INT64),
                em.ints(0), keepdims=0)
    em.node("Concat", [em.ints(0), em("CumSum", counts, em.const(0, "i64"))], outputs=["offsets"], axis=0)
    em.node("Identity", [order], outputs=["order"])
    return ["x", "ids"], ["rows", "offsets", "order"], ["num_experts"]


def grouped_swiglu(em: Emitter):
    """grouped_swiglu(rows, offsets, w13 [E,2I,D], w2 [E,D,I]): a Loop over experts, each
    running SwiGLU (in fp32) on its contiguous block of rows; blocks are concatenated in order."""
    E = em("Squeeze", em("Shape", "w13", start=0, end=1), em.ints(0))
    I = em("Shape", "w2", start=2, end=3)
    rows = em("Cast", "rows", to=FLOAT)
    empty = em("Slice", rows, em.ints(0), em.ints(0), em.ints(0))
    b = em.body(em.prefix + "step_")
    e1 = b("Unsqueeze", "e", b.ints(0))
    s = b("Gather", "offsets", e1)
    t = b("Gather", "offsets", b("Add", e1, b.ints(1)))
    xs = b("Slice", rows, s, t, b.ints(0))
    w13t = b("Transpose", b("Cast", b("Gather", "w13", "e", axis=0), to=FLOAT), perm=[1, 0])    # [D, 2I]
    w1t, w3t = b("Slice", w13t, b.ints(0), I, b.ints(1)), b("Slice", w13t, I, b("Mul", I, b.ints(2)), b.ints(1))
    y = swiglu(b, xs, w1t, w3t, b("Transpose", b("Cast", b("Gather", "w2", "e", axis=0), to=FLOAT), perm=[1, 0]))
    b.node("Identity", ["c_in"], outputs=["c_out"])
    b.node("Concat", ["acc_in", y], outputs=["acc_out"], axis=0)
    body = helper.make_graph(b.nodes, "expert_step",
                             [helper.make_tensor_value_info("e", TensorProto.INT64, []),
                              helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc_in", FLOAT, None)],
                             [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("acc_out", FLOAT, None)])
    out = em.node("Loop", [E, _true(em), empty], 1, body=body)[0]
    em.node("CastLike", [out, "rows"], outputs=["y"])
    return ["rows", "offsets", "w13", "w2"], ["y"], []


def moe_unpermute(em: Emitter):
    """moe_unpermute(y [M,D], order [M], weights [...,k], acc [...,D]) -> acc + sum_j w_j y_j."""
    D = em("Shape", "acc", start=-1)
    k = em("Shape", "weights", start=-1)
    unsorted = em("ScatterND", em("Mul", "y", em("CastLike", em.const(0.0, "f32"), "y")),
                  em("Unsqueeze", "order", em.ints(1)), "y")
    per = em("Reshape", em("CastLike", unsorted, "weights"), em("Concat", em.ints(-1), k, D, axis=0))
    w = em("Reshape", "weights", em("Concat", em.ints(-1), k, em.ints(1), axis=0))
    contrib = em("ReduceSum", em("Mul", per, w), em.ints(1), keepdims=0)
    out = em("Add", em("Reshape", "acc", em("Concat", em.ints(-1), D, axis=0)), em("CastLike", contrib, "acc"))
    em.node("Reshape", [out, em("Shape", "acc")], outputs=["out"])
    return ["y", "order", "weights", "acc"], ["out"], []


BUILDERS = {"moe_permute": moe_permute, "grouped_swiglu": grouped_swiglu, "moe_unpermute": moe_unpermute}


def require(em: Emitter, name: str) -> str:
    """Add the function of MoE dispatch op `name` to the model being emitted; its name."""
    return em.function(name, (name,), lambda _, body: BUILDERS[name](body))


def require_kda_chunkwise(em: Emitter, chunk: int) -> str:
    """Add the chunkwise KDA function for chunks of `chunk` tokens; its name."""
    return em.function("kda_chunkwise", ("kda_chunkwise", chunk), lambda _, body: kda_chunkwise(body, chunk))
