"""Function bodies (standard ONNX ops only) for the nodes of our `kimi_graph` domain that have
no decomposition in the op library: the KDA recurrence in its chunkwise form (a Loop over
chunks: the op library's chunk_form run on ONNX values, OnnxArrays) and the MoE dispatch ops
(hand-written). (The fused ops' bodies are generated from their decompositions:
export.decomposition_call.)

Bodies are generic in the model dtype (CastLike back to an input's type) and compute in
fp32, as the op library does. Float/int attributes of the calling node reach the body
through attribute references."""
from __future__ import annotations

import numpy as np
from onnx import AttributeProto, TensorProto, helper

from kimi_graph.ops.kda import SUB, chunk_form

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
    fp32) {scale} -> (o [B,T,H,V] like v, state): the op library's chunk_form (ops/kda.py) on
    ONNX values, in chunks of min(T, `chunk`) tokens; everything but the state update is
    batched over all chunks, a Loop carries the state."""
    x = OnnxArrays(em, chunk)
    scale = em.node("Constant", [], value_float=attr_ref("value_float", "scale", AttributeProto.FLOAT))[0]
    o, S = chunk_form(x, "q", "k", "v", "g", "beta", em("Cast", "state", to=FLOAT), scale, chunk)
    em.node("CastLike", [o, "v"], outputs=["o"])
    em.node("Identity", [S], outputs=["state_out"])
    return ["q", "k", "v", "g", "beta", "state"], ["o", "state_out"], ["scale"]


class OnnxArrays:
    """chunk_form's array namespace on ONNX values (fp32) of emitter `em`; chunks of C =
    min(T, chunk) tokens (T read from q)."""

    def __init__(self, em: Emitter, chunk: int):
        self.em = em
        T = em("Shape", "q", start=1, end=2)
        self.T, self.C = T, em("Min", T, em.ints(chunk))
        n = em("Div", em("Sub", em("Add", T, self.C), em.ints(1)), self.C)
        self.n, self.pad = n, em("Sub", em("Mul", n, self.C), T)

    def __call__(self, op, *ins, **attrs):
        return self.em(op, *ins, **attrs)

    def chunks(self, t):
        """[B,T,H,D] -> [B,H,n,C,D], zero-padded."""
        em = self.em
        t = em("Transpose", em("Cast", t, to=FLOAT), perm=[0, 2, 1, 3])                  # [B,H,T,D]
        t = em("Pad", t, em("Concat", em.ints(0, 0, 0, 0, 0, 0), self.pad, em.ints(0), axis=0))
        return em("Reshape", t, em("Concat", em.ints(0, 0, -1), self.C, em("Shape", t, start=3), axis=0))

    def unchunk(self, o, v):
        em = self.em
        o = em("Transpose", o, perm=[0, 2, 3, 1, 4])                                    # [B,n,C,H,V]
        o = em("Reshape", o, em("Concat", em.ints(0, -1), em("Shape", v, start=2, end=4), axis=0))
        return em("Slice", o, em.ints(0), self.T, em.ints(1))

    def lower(self, d, strict):
        em = self.em
        r = em("Range", em.const(0, "i64"), em("Squeeze", self.C, em.ints(0)), em.const(1, "i64"))
        rr, ii = em("Unsqueeze", r, em.ints(1)), em("Unsqueeze", r, em.ints(0))
        keep = em("Greater" if strict else "GreaterOrEqual", rr, ii)
        return em("Where", em("Unsqueeze", keep, em.ints(-1)), d, em.const(float("-inf"), "f32"))

    def scan(self, step, S0, per_chunk):
        """A Loop over the n chunks: the body gathers chunk i of each `per_chunk` value (outer
        scope) and runs `step`; outputs gathered as a carried [n, B,H,C,V] tensor (not a scan
        output: onnx.reference concatenates scan outputs of rank > 1 instead of stacking)."""
        em = self.em
        body = OnnxArrays.__new__(OnnxArrays)
        body.em = em.body(em.prefix + "step_")
        o, S = step(body, "S_in", *(body("Gather", t, "i", axis=2) for t in per_chunk))
        body.em.node("Identity", ["cond_in"], outputs=["cond_out"])
        body.em.node("Identity", [S], outputs=["S_out"])
        body.em.node("Concat", ["O_in", body("Unsqueeze", o, body.em.ints(0))], outputs=["O_out"], axis=0)
        graph = helper.make_graph(
            body.em.nodes, "kda_chunk_step",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("S_in", FLOAT, None),
             helper.make_tensor_value_info("O_in", FLOAT, None)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("S_out", FLOAT, None),
             helper.make_tensor_value_info("O_out", FLOAT, None)])
        U = per_chunk[3]
        empty = em("Slice", em("Transpose", U, perm=[2, 0, 1, 3, 4]), em.ints(0), em.ints(0), em.ints(0))
        S_end, os = em.node("Loop", [em("Squeeze", self.n, em.ints(0)), _true(em), S0, empty], 2, body=graph)
        return em("Transpose", os, perm=[1, 2, 0, 3, 4]), S_end                       # [B,H,n,C,V]

    def cumsum(self, t):
        return self("CumSum", t, self.em.const(3, "i64"))

    def exp(self, t):
        return self("Exp", t)

    def neg(self, t):
        return self("Neg", t)

    def add(self, a, b):
        return self("Add", a, b)

    def sub(self, a, b):
        return self("Sub", a, b)

    def mul(self, a, b):
        return self("Mul", a, b)

    def matmul(self, a, b):
        return self("MatMul", a, b)

    def unsqueeze(self, t, axis):
        return self("Unsqueeze", t, self.em.ints(axis))

    def sum_last(self, t):
        return self("ReduceSum", t, self.em.ints(-1), keepdims=0)

    def scale(self, t, s):
        return self("Mul", t, s)

    def transpose(self, t):
        return self("Transpose", t, perm=[0, 1, 3, 2])

    def last(self, G):
        return self("Gather", G, self.em("Sub", self.C, self.em.ints(1)), axis=3)

    def block(self, A, J, I, n):
        return self("Slice", A, self.em.ints(J * n, I * n), self.em.ints((J + 1) * n, (I + 1) * n),
                    self.em.ints(-2, -1))

    def block_rows(self, X, I, n):
        return self("Slice", X, self.em.ints(I * n), self.em.ints((I + 1) * n), self.em.ints(-2))

    def concat_rows(self, rows):
        return self("Concat", *rows, axis=-2)

    def eye_like(self, N):
        """The identity of N's (square, at most SUB) last two dims."""
        em = self.em
        eye = em.const(np.eye(SUB).tolist(), "f32")
        return em("Slice", eye, em.ints(0, 0), em("Shape", N, start=-2), em.ints(0, 1))


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
