"""Fused ops that the passes introduce and every lowering maps (kernels, ONNX, torch).

KDA   kda_fused_recurrent / kda_fused_chunk (q, k, v, f, b, A_log, dt_bias, state?)
        q, k [B,T,H,K] after conv+SiLU, *not* normalised; v [B,T,H,V]; f [B,T,H*K] the raw
        f_b output; b [B,T,H] the raw b_proj output; A_log [1,1,H,1]; dt_bias [H*K].
        Inside: g = -exp(A_log) * softplus(f + dt_bias) (fp32), beta = sigmoid(b),
        q, k L2-normalised (eps `l2norm_eps`), then the delta rule -> (o [B,T,H,V], state).
        `_chunk` is the chunkwise (WY/UT) form for prefill, same results.
      gated_rmsnorm(x, weight, gate): rmsnorm(x) * weight * sigmoid(gate) over the last dim.
Norm  add_rmsnorm(x, residual, weight) -> (rmsnorm(x + residual) * weight, x + residual).
MLA   head_matmul(x [B,T,H,N], w [H,N,R]) -> [B,T,H,R]: per-head projection (absorbed weights).
      mla_latent_attention(q_lat [B,T,H,R], q_rope [B,T,H,P], latent [B,S,R], rope_key [B,S,P],
        q_start? [B]) {scale}: softmax((q_lat.latent + q_rope.rope_key) * scale) latent, causal
        as in causal_attention -> [B,T,H,R] (still in latent space).
MoE   moe_route(x, gate_weight [E,D], bias [E]) -> (ids [...,k] i64, weights [...,k]): the
        whole router (fp32 sigmoid scores, biased grouped top-k, renormalise, scale).
      moe_permute(x [...,D], ids [...,k]) {num_experts} -> (rows [M,D], offsets [E+1] i64,
        order [M] i64) with M = N*k: token copies sorted by expert; order[m] = n*k + j.
      grouped_swiglu(rows [M,D], offsets [E+1], w13 [E,2I,D], w2 [E,D,I]) -> [M,D]: for the
        rows of expert e, w2_e (silu(w1_e x) * w3_e x); w13_e = [w1_e; w3_e].
      moe_unpermute(y [M,D], order [M], weights [...,k], acc [...,D]) -> acc + sum_j w_j y_j.
      moe_experts(x, ids, weights, w13, w2, acc) -> acc + sum_j w_j SwiGLU_{ids_j}(x): the three
        above as one op (what ONNX Runtime's MoE computes; legalize-ort-moe introduces it).
      stack(*xs) -> [n, ...]: the compile-time expert packing (folded into parameters).

Each fused op's `decompose(b, ins, attrs)` states its meaning in simpler registry ops through a
builder `b` (a GraphBuilder, or decompose.Eager to run it in torch); targets without a fused
form lower that (see decompose.py). `ref` stays the oracle the decompositions are tested
against. The MoE dispatch ops have none: their layout (rows sorted by expert, offsets) is
data-dependent and every target maps them natively.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dtypes import acc_dtype, acc_torch
from .attention import causal_attention
from .kda import kda_recurrence
from .moe import grouped_topk, swiglu
from .norm import l2_normalize, rms_normalize
from .registry import REQUIRED, OpDef, dim, expect, expect_float, register


def kda_gate(f, A_log, dt_bias, acc):
    """g = -exp(A_log) * softplus(f + dt_bias) in `acc` precision, shaped like [B,T,H,K]."""
    B, T, C = f.shape
    H = A_log.shape[2]
    g = F.softplus(f.to(acc) + dt_bias.to(acc)).view(B, T, H, C // H)
    return -A_log.to(acc).exp() * g


def cast_to(b, x, dtype: str, name: str | None = None):
    """x in `dtype` (a cast op only where it differs)."""
    return x if b.type(x).dtype == dtype else b("cast", x, dtype=dtype, name=name)


def decay_gate(b, f, A_log, dt_bias, shape, acc: str):
    """The decay g = -exp(A_log) * softplus(f + dt_bias) in `acc`, reshaped to `shape`
    [B,T,H,K], through builder `b`: the model declares it so, and KDA's decomposition."""
    f = b("add", b("cast", f, dtype=acc), cast_to(b, dt_bias, acc), name="f")
    f = b("reshape", b("softplus", f, name="f"), shape=list(shape), name="f")
    a = b("neg", b("exp", cast_to(b, A_log, acc), name="A"), name="A")
    return b("mul", f, a, name="decay")

class _KDAFused(OpDef):
    fused = True
    operands = ("q", "k", "v", "f", "b", "A_log", "dt_bias", "state?")
    results = ("o", "state")
    family = "kda"
    attributes = {"scale": REQUIRED(float), "l2norm_eps": 1e-6}

    def infer(self, types, attrs):
        q, k, v, f, b, A, dt = types[:7]
        expect_float(self.kind, *types[:7])
        expect(q.rank == 4 and q.shape == k.shape, self.kind, f"q {q} and k {k} must be [B,T,H,K]")
        B, T, H, K = q.shape
        expect(v.rank == 4 and v.shape[:3] == (B, T, H), self.kind, f"v {v} must be [B,T,H,V]")
        expect(f.shape == (B, T, H * K), self.kind, f"f {f} must be [B,T,{H * K}]")
        expect(b.shape == (B, T, H), self.kind, f"b {b} must be [B,T,{H}]")
        expect(A.shape == (1, 1, H, 1) and dt.shape == (H * K,), self.kind,
               f"A_log {A} / dt_bias {dt} do not fit {H} heads of {K}")
        state = v.with_shape((B, H, K, v.shape[3])).with_dtype(acc_dtype(v.dtype))
        if len(types) > 7:
            expect(types[7] == state, self.kind, f"state must be {state}, got {types[7]}")
        return [v, state]

    def decompose(self, b, ins, attrs):
        """l2norm(q), l2norm(k), the decay gate, sigmoid(b), then kda_recurrent."""
        q, k, v, f, beta_in, A, dt = ins[:7]
        acc = acc_dtype(b.type(v).dtype)
        eps = attrs["l2norm_eps"]
        g = decay_gate(b, f, A, dt, b.type(q).shape, acc)
        beta = b("sigmoid", b("cast", beta_in, dtype=acc), name="beta")
        return b.emit("kda_recurrent", b("l2norm", q, eps=eps, name="q"), b("l2norm", k, eps=eps, name="k"),
                      v, g, beta, ins[7] if len(ins) > 7 else None, scale=attrs["scale"],
                      chunk_size=attrs.get("chunk_size", 0), name="kda")

    def prepare(self, args, attrs):
        q, k, v, f, b, A, dt = args[:7]
        acc = acc_torch(v.dtype)
        g = kda_gate(f, A, dt, acc)
        beta = torch.sigmoid(b.to(acc))
        eps = attrs["l2norm_eps"]
        return l2_normalize(q, eps), l2_normalize(k, eps), v, g, beta, (args[7] if len(args) > 7 else None)

    def flops(self, ins, outs, attrs, dims):
        B, T, H, K = (dim(d, dims) for d in ins[0].shape)
        return 7.0 * B * T * H * K * dim(ins[2].shape[3], dims) + 12.0 * B * T * H * K


@register
class KDAFusedRecurrent(_KDAFused):
    kind = "kda_fused_recurrent"
    doc = "KDA with decay gate, beta sigmoid and q/k L2 norm fused; token-by-token recurrence"

    def ref(self, args, attrs):
        q, k, v, g, beta, s0 = self.prepare(args, attrs)
        o, S = kda_recurrence(q, k, v, g, beta, s0, attrs["scale"])
        return [o.to(v.dtype), S]


@register
class KDAFusedChunk(_KDAFused):
    kind = "kda_fused_chunk"
    doc = "KDA with fused gating in the chunkwise (WY/UT) form for prefill"
    attributes = {"scale": REQUIRED(float), "l2norm_eps": 1e-6, "chunk_size": 64}

    def ref(self, args, attrs):
        from .kda import kda_chunkwise
        q, k, v, g, beta, s0 = self.prepare(args, attrs)
        o, S = kda_chunkwise(q, k, v, g, beta, s0, attrs["scale"], attrs["chunk_size"])
        return [o.to(v.dtype), S]


@register
class GatedRMSNorm(OpDef):
    fused = True
    kind, doc = "gated_rmsnorm", "rmsnorm(x) * weight * sigmoid(gate) over the last dim"
    family = "norm"
    operands = ("x", "weight", "gate")
    attributes = {"eps": REQUIRED(float)}

    def infer(self, types, attrs):
        x, w, g = types
        expect_float(self.kind, x, w, g)
        expect(w.shape == (x.shape[-1],) and g.shape == x.shape, self.kind,
               f"weight {w} / gate {g} do not fit x {x}")
        return [x]

    def ref(self, args, attrs):
        x, w, g = args
        return [w.to(x.dtype) * rms_normalize(x, attrs["eps"]) * torch.sigmoid(g.to(x.dtype))]

    def decompose(self, b, ins, attrs):
        x, w, g = ins
        y = b("rmsnorm", x, w, eps=attrs["eps"], name="norm")
        return [b("mul", y, b("sigmoid", cast_to(b, g, b.type(x).dtype), name="gate"), name="gated")]

    def flops(self, ins, outs, attrs, dims):
        return 9.0 * outs[0].numel(dims)


@register
class AddRMSNorm(OpDef):
    fused = True
    kind, doc = "add_rmsnorm", "(rmsnorm(x + residual) * weight, x + residual)"
    family = "norm"
    results = ("y", "sum")
    operands = ("x", "residual", "weight")
    attributes = {"eps": REQUIRED(float)}

    def infer(self, types, attrs):
        x, r, w = types
        expect_float(self.kind, x, r, w)
        expect(x == r and w.shape == (x.shape[-1],), self.kind, f"x {x}, residual {r}, weight {w}")
        return [x, x]

    def ref(self, args, attrs):
        x, r, w = args
        s = x + r
        return [w.to(x.dtype) * rms_normalize(s, attrs["eps"]), s]

    def decompose(self, b, ins, attrs):
        s = b("add", ins[0], ins[1], name="sum")
        return [b("rmsnorm", s, ins[2], eps=attrs["eps"], name="norm"), s]

    def flops(self, ins, outs, attrs, dims):
        return 5.0 * outs[0].numel(dims)


@register
class HeadMatmul(OpDef):
    fused = True
    kind, doc = "head_matmul", "per-head x[b,t,h,:] @ w[h] : [B,T,H,N] x [H,N,R] -> [B,T,H,R]"
    family = "linear"
    operands = ("x", "weight")

    def infer(self, types, attrs):
        x, w = types
        expect_float(self.kind, x, w)
        expect(x.rank == 4 and w.rank == 3 and w.shape[0] == x.shape[2] and w.shape[1] == x.shape[3],
               self.kind, f"x {x} does not fit weight {w} [H, N, R]")
        return [x.with_shape(x.shape[:3] + (w.shape[2],))]

    def ref(self, args, attrs):
        x, w = args
        return [torch.einsum("bthn,hnr->bthr", x, w.to(x.dtype))]

    def decompose(self, b, ins, attrs):
        """[B,H,T,N] @ [H,N,R] per head, heads first and back."""
        x, w = ins
        y = b("matmul", b("transpose", x, perm=[0, 2, 1, 3], name="x"), w, name="y")
        return [b("transpose", y, perm=[0, 2, 1, 3], name="y")]

    def flops(self, ins, outs, attrs, dims):
        return 2.0 * outs[0].numel(dims) * ins[1].shape[1]


@register
class MLALatentAttention(OpDef):
    fused = True
    kind = "mla_latent_attention"
    doc = "attention in latent space: keys latent ‖ rope_key, values latent (one shared KV head)"
    family = "attention"
    operands = ("q_lat", "q_rope", "latent", "rope_key", "q_start?")
    attributes = {"scale": REQUIRED(float)}

    def infer(self, types, attrs):
        ql, qr, c, kr = types[:4]
        expect_float(self.kind, ql, qr, c, kr)
        expect(ql.rank == qr.rank == 4 and ql.shape[:3] == qr.shape[:3], self.kind,
               f"q_lat {ql} / q_rope {qr} must be [B,T,H,*]")
        expect(c.rank == kr.rank == 3 and c.shape[:2] == kr.shape[:2] and c.shape[0] == ql.shape[0]
               and c.shape[2] == ql.shape[3] and kr.shape[2] == qr.shape[3], self.kind,
               f"caches latent {c} / rope_key {kr} do not fit the queries {ql} / {qr}")
        return [ql]

    def ref(self, args, attrs):
        ql, qr, c, kr = args[:4]
        q = torch.cat([ql, qr.to(ql.dtype)], -1)
        k = torch.cat([c, kr.to(c.dtype)], -1).unsqueeze(2)          # [B,S,1,R+P]
        H = q.shape[2]
        return [causal_attention(q, k.expand(-1, -1, H, -1), c.unsqueeze(2).expand(-1, -1, H, -1),
                                 args[4] if len(args) > 4 else None, attrs["scale"])]

    def decompose(self, b, ins, attrs):
        """causal_attention with queries q_lat ‖ q_rope, keys latent ‖ rope_key and values
        latent, the one KV head expanded to every query head."""
        ql, qr, c, kr = ins[:4]
        B, T, H, R = b.type(ql).shape
        S, P = b.type(c).shape[1], b.type(kr).shape[2]
        q = b("concat", ql, cast_to(b, qr, b.type(ql).dtype), dim=-1, name="q")

        def heads(x, width, name):
            return b("expand", b("reshape", x, shape=[B, S, 1, width], name=name), shape=[B, S, H, width],
                     name=name)
        k = heads(b("concat", c, cast_to(b, kr, b.type(c).dtype), dim=-1, name="k"), R + P, "k")
        return [b("causal_attention", q, k, heads(c, R, "v"), ins[4] if len(ins) > 4 else None,
                  scale=attrs["scale"], name="attn")]

    def flops(self, ins, outs, attrs, dims):
        B, T, H, R = (dim(d, dims) for d in ins[0].shape)
        S, P = dim(ins[2].shape[1], dims), ins[1].shape[3]
        return 2.0 * B * H * T * S * (2 * R + P)


@register
class MoERoute(OpDef):
    fused = True
    kind = "moe_route"
    doc = "the router: sigmoid scores (fp32), + bias for selection, grouped top-k, renormalise, scale"
    family = "moe"
    results = ("ids", "weights")
    operands = ("x", "gate_weight", "bias")
    attributes = {"top_k": REQUIRED(int), "n_group": 1, "topk_group": 1, "renormalize": True,
                  "scaling": 1.0, "weights": "official"}

    def infer(self, types, attrs):
        x, w, bias = types
        expect_float(self.kind, x, w, bias)
        E = w.shape[0]
        expect(w.rank == 2 and w.shape[1] == x.shape[-1] and bias.shape == (E,), self.kind,
               f"gate_weight {w} / bias {bias} do not fit x {x}")
        expect(attrs["weights"] in ("official", "unbiased"), self.kind, "weights: official|unbiased")
        k = attrs["top_k"]
        expect(0 < k <= E and E % attrs["n_group"] == 0, self.kind, f"bad top_k {k} for {E} experts")
        lead = x.shape[:-1] + (k,)
        return [x.with_shape(lead).with_dtype("i64"), bias.with_shape(lead)]

    def ref(self, args, attrs):
        x, w, bias = args
        acc = bias.dtype
        scores = torch.sigmoid(F.linear(x.to(acc), w.to(acc)))
        choice = scores + bias
        ids = grouped_topk(choice, attrs["top_k"], attrs["n_group"], attrs["topk_group"])
        wts = torch.gather(choice if attrs["weights"] == "official" else scores, -1, ids)
        if attrs["top_k"] > 1 and attrs["renormalize"]:
            wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
        return [ids, wts * attrs["scaling"]]

    def decompose(self, b, ins, attrs):
        return route(b, *ins, attrs)

    def flops(self, ins, outs, attrs, dims):
        n = ins[0].numel(dims) / dim(ins[0].shape[-1], dims)
        return n * (2.0 * ins[1].shape[0] * ins[1].shape[1] + 8 * ins[1].shape[0])


def route(b, x, gate_weight, bias, attrs: dict) -> list:
    """The router through builder `b` (the model declares it so; moe_route's decomposition):
    fp32 sigmoid scores, + bias for selection, grouped top-k, weights from the biased
    ("official") or unbiased scores, renormalised (top_k > 1), scaled."""
    scores = b("sigmoid", b("linear", b("cast", x, dtype=b.type(bias).dtype), gate_weight, name="logits"),
               name="scores")
    choice = b("add", scores, bias, name="choice")
    ids = b("grouped_topk", choice, top_k=attrs["top_k"], n_group=attrs["n_group"],
            topk_group=attrs["topk_group"], name="ids")
    w = b("take_along", choice if attrs["weights"] == "official" else scores, ids, name="weights")
    if attrs["top_k"] > 1 and attrs["renormalize"]:
        w = b("renormalize", w, eps=1e-20, name="weights")
    return [ids, b("scale", w, factor=attrs["scaling"], name="weights")]


DISPATCH_LAYOUT = ("its rows are laid out by expert at run time (data-dependent sizes); every "
                   "target maps it natively")


def _rows_dim(x_shape, k: int):
    """M = (product of x's leading dims) * k, as a symbolic dim."""
    ints, syms = k, []
    for d in x_shape[:-1]:
        if isinstance(d, int):
            ints *= d
        else:
            syms.append(d)
    return "*".join(syms + [str(ints)]) if syms else ints


@register
class MoEPermute(OpDef):
    fused = True
    no_decomposition = DISPATCH_LAYOUT
    kind = "moe_permute"
    doc = "token copies sorted by expert: (rows [M,D], offsets [E+1], order [M]), M = N*top_k"
    family = "moe"
    results = ("rows", "offsets", "order")
    operands = ("x", "ids")
    attributes = {"num_experts": REQUIRED(int)}

    def infer(self, types, attrs):
        x, ids = types
        expect(ids.dtype == "i64" and ids.shape[:-1] == x.shape[:-1], self.kind,
               f"ids {ids} do not fit x {x}")
        M = _rows_dim(x.shape, ids.shape[-1])
        return [x.with_shape((M, x.shape[-1])), ids.with_shape((attrs["num_experts"] + 1,)),
                ids.with_shape((M,))]

    def ref(self, args, attrs):
        x, ids = args
        k, D, E = ids.shape[-1], x.shape[-1], attrs["num_experts"]
        flat = ids.reshape(-1)
        order = torch.sort(flat, stable=True)[1]
        counts = torch.bincount(flat, minlength=E)
        offsets = torch.zeros(E + 1, dtype=torch.long, device=x.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return [x.reshape(-1, D)[order // k], offsets, order]

    def flops(self, ins, outs, attrs, dims):
        return 0.0


@register
class GroupedSwiGLU(OpDef):
    fused = True
    no_decomposition = DISPATCH_LAYOUT
    kind = "grouped_swiglu"
    doc = "per-expert SwiGLU over expert-sorted rows with packed weights w13 [E,2I,D], w2 [E,D,I]"
    family = "moe"
    operands = ("rows", "offsets", "w13", "w2")

    def infer(self, types, attrs):
        x, off, w13, w2 = types
        expect_float(self.kind, x, w13, w2)
        E, I2, D = w13.shape
        expect(x.rank == 2 and x.shape[1] == D and off.shape == (E + 1,) and I2 % 2 == 0
               and w2.shape == (E, D, I2 // 2), self.kind,
               f"rows {x}, offsets {off}, w13 {w13}, w2 {w2} do not fit")
        return [x]

    def ref(self, args, attrs):
        x, off, w13, w2 = args
        out = torch.zeros_like(x)
        I = w2.shape[2]
        for e in range(w13.shape[0]):
            s, t = int(off[e]), int(off[e + 1])
            if t > s:
                out[s:t] = swiglu(x[s:t], *(w.to(x.dtype) for w in (w13[e, :I], w13[e, I:], w2[e])))
        return [out]

    def flops(self, ins, outs, attrs, dims):
        E, I2, D = ins[2].shape
        return 2.0 * dim(ins[0].shape[0], dims) * D * (I2 + I2 // 2)

    def bytes_moved(self, ins, outs, attrs, dims):
        M = dim(ins[0].shape[0], dims)
        E = ins[2].shape[0]
        touched = min(E, M)     # at most M experts receive a row
        per_expert = (ins[2].nbytes(dims) + ins[3].nbytes(dims)) / E
        return float(touched * per_expert + ins[0].nbytes(dims) + outs[0].nbytes(dims))


@register
class MoEUnpermute(OpDef):
    fused = True
    no_decomposition = DISPATCH_LAYOUT
    kind = "moe_unpermute"
    doc = "acc[n] + sum_j weights[n, j] * y[row holding copy (n, j)]"
    family = "moe"
    operands = ("y", "order", "weights", "acc")

    def infer(self, types, attrs):
        y, order, w, acc = types
        expect(y.rank == 2 and y.shape[1] == acc.shape[-1] and order.shape == (y.shape[0],)
               and w.shape[:-1] == acc.shape[:-1], self.kind,
               f"y {y}, order {order}, weights {w}, acc {acc} do not fit")
        return [acc]

    def ref(self, args, attrs):
        y, order, w, acc = args
        k, D = w.shape[-1], acc.shape[-1]
        unsorted = torch.empty_like(y)
        unsorted[order] = y
        contrib = (unsorted.view(-1, k, D).to(w.dtype) * w.reshape(-1, k, 1)).sum(1)
        return [(acc.reshape(-1, D) + contrib.to(acc.dtype)).reshape(acc.shape)]


@register
class MoEExperts(OpDef):
    kind = "moe_experts"
    doc = "acc + sum_j weights[..., j] * SwiGLU_{ids[..., j]}(x), packed expert weights (the routed MoE)"
    family = "moe"
    fused = True
    operands = ("x", "ids", "weights", "w13", "w2", "acc")

    def infer(self, types, attrs):
        x, ids, w, w13, w2, acc = types
        expect_float(self.kind, x, w, w13, w2, acc)
        E, I2, D = w13.shape
        expect(ids.dtype == "i64" and ids.shape == w.shape and ids.shape[:-1] == x.shape[:-1]
               and acc.shape == x.shape and x.shape[-1] == D and w2.shape == (E, D, I2 // 2), self.kind,
               f"x {x}, ids {ids}, weights {w}, w13 {w13}, w2 {w2}, acc {acc} do not fit")
        return [acc]

    def ref(self, args, attrs):
        x, ids, w, w13, w2, acc = args
        D, I = x.shape[-1], w2.shape[2]
        xf, idf, wf = x.reshape(-1, D), ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1])
        out = acc.reshape(-1, D).clone()
        for e in range(w13.shape[0]):
            hit = idf == e
            rows = hit.any(-1).nonzero().squeeze(-1)
            if rows.numel():
                y = swiglu(xf[rows], *(t.to(x.dtype) for t in (w13[e, :I], w13[e, I:], w2[e])))
                gate = (wf[rows] * hit[rows]).sum(-1, keepdim=True)
                out[rows] = out[rows] + (gate * y.to(gate.dtype)).to(out.dtype)
        return [out.reshape(acc.shape)]

    def decompose(self, b, ins, attrs):
        x, ids, w, w13, w2, acc = ins
        rows, offsets, order = b.emit("moe_permute", x, ids, num_experts=b.type(w13).shape[0], name="permute")
        return [b("moe_unpermute", b("grouped_swiglu", rows, offsets, w13, w2, name="experts"), order, w, acc,
                  name="unpermute")]

    def flops(self, ins, outs, attrs, dims):
        E, I2, D = ins[3].shape
        return 2.0 * ins[1].numel(dims) * D * (I2 + I2 // 2)     # one SwiGLU per routed copy

    def bytes_moved(self, ins, outs, attrs, dims):
        E = ins[3].shape[0]
        touched = min(E, ins[1].numel(dims))
        per_expert = (ins[3].nbytes(dims) + ins[4].nbytes(dims)) / E
        return float(touched * per_expert + ins[0].nbytes(dims) + 2 * outs[0].nbytes(dims))


@register
class Stack(OpDef):
    fused = True
    kind, doc = "stack", "stack equal-typed operands along a new leading dim"
    family = "moe"
    operands = ("*xs",)

    def infer(self, types, attrs):
        expect(len(types) >= 1 and all(t == types[0] for t in types), self.kind,
               "operands must share one type")
        return [types[0].with_shape((len(types),) + types[0].shape)]

    def ref(self, args, attrs):
        return [torch.stack(list(args))]

    def decompose(self, b, ins, attrs):
        shape = list(b.type(ins[0]).shape)
        return [b("concat", *[b("reshape", x, shape=[1] + shape) for x in ins], dim=0)]

    def flops(self, ins, outs, attrs, dims):
        return 0.0
