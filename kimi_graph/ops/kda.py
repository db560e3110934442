"""KDA: the delta rule as one semantic op (kda_recurrent: token-by-token recurrence, or the
chunkwise WY/UT form, fp32 state), and the fused ops the passes make of it with its gating:

kda_fused_recurrent / kda_fused_chunk (q, k, v, f, b, A_log, dt_bias, state?)
  q, k [B,T,H,K] after conv+SiLU, *not* normalised; v [B,T,H,V]; f [B,T,H*K] the raw f_b
  output; b [B,T,H] the raw b_proj output; A_log [1,1,H,1]; dt_bias [H*K]. Inside:
  g = -exp(A_log) * softplus(f + dt_bias) (fp32), beta = sigmoid(b), q, k L2-normalised (eps
  `l2norm_eps`), then the delta rule -> (o [B,T,H,V], state). `_chunk` is the chunkwise form
  for prefill in chunks of `chunk_size`, same results.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dtypes import acc_dtype, acc_torch
from .decompose import cast_to
from .norm import l2_normalize
from .registry import REQUIRED, OpDef, dim, expect, expect_float, register


def kda_recurrence(q, k, v, g, beta, state, scale):
    """q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state [B, H, K, V] or None.
    Per token: S = S*exp(g)[:, None]; S += k (beta (v - k^T S))^T; o = (scale q)^T S."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    acc = acc_torch(v.dtype)
    S = torch.zeros(B, H, K, V, dtype=acc, device=v.device) if state is None else state.to(acc).clone()
    q, k, v, g, beta = (t.to(acc) for t in (q, k, v, g, beta))
    out = torch.empty(B, T, H, V, dtype=acc, device=v.device)
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)
        kt = k[:, t]
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + torch.einsum("bhk,bhv->bhkv", kt, beta[:, t].unsqueeze(-1) * err)
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
    return out, S


@register
class KDARecurrent(OpDef):
    kind = "kda_recurrent"
    doc = ("gated delta rule per head with per-channel log decay g; state [B, H, K, V] in fp32; "
           "chunk_size > 0: computed in the chunkwise form (same results), 0: the target's choice")
    family = "kda"
    results = ("o", "state")
    operands = ("q", "k", "v", "g", "beta", "state?")
    attributes = {"scale": REQUIRED(float), "chunk_size": 0}

    def infer(self, types, attrs):
        q, k, v, g, beta = types[:5]
        expect_float(self.kind, q, k, v, g, beta)
        expect(q.rank == 4 and q.shape == k.shape == g.shape, self.kind,
               f"q {q}, k {k}, g {g} must be equal [B, T, H, K]")
        expect(v.rank == 4 and v.shape[:3] == q.shape[:3], self.kind, f"v {v} must be [B, T, H, V]")
        expect(beta.shape == q.shape[:3], self.kind, f"beta {beta} must be [B, T, H]")
        B, _, H, K = q.shape
        state = v.with_shape((B, H, K, v.shape[3])).with_dtype(acc_dtype(v.dtype))
        if len(types) > 5:
            expect(types[5] == state, self.kind, f"state must be {state}, got {types[5]}")
        return [v, state]

    def ref(self, args, attrs):
        q, k, v, g, beta = args[:5]
        state, n = args[5] if len(args) > 5 else None, attrs.get("chunk_size", 0)
        o, S = (kda_chunkwise(q, k, v, g, beta, state, attrs["scale"], n) if n
                else kda_recurrence(q, k, v, g, beta, state, attrs["scale"]))
        return [o.to(v.dtype), S]

    def flops(self, ins, outs, attrs, dims):
        B, T, H, K = (d if isinstance(d, int) else dims[d] for d in ins[0].shape)
        return 7.0 * B * T * H * K * outs[0].shape[3]


def kda_chunkwise(q, k, v, g, beta, state, scale, chunk_size):
    """The chunkwise (WY/UT) form of `kda_recurrence`: same inputs, same results up to fp
    rounding. Per chunk of C tokens with cumulative log decay G_r = sum_{i<=r} g_i:
      A[r,i] = beta_r sum_d k_rd k_id exp(G_rd - G_id)            (i < r, strictly lower)
      u = (I + A)^-1 diag(beta) (v - (k * exp(G)) S0)             (UT transform, one solve)
      o_r = scale (q_r * exp(G_r)) S0 + scale sum_{i<=r} (q_r . k_i exp(G_r - G_i)) u_i
      S_C = exp(G_C) * S0 + sum_i (k_i * exp(G_C - G_i)) u_i^T
    Decay ratios are taken as exp of differences, masked before the exp, so no factor
    overflows however strong the decay. The last chunk may be shorter (any T)."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"kda_chunkwise: chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, K = k.shape
    V = v.shape[-1]
    acc = acc_torch(v.dtype)
    S = torch.zeros(B, H, K, V, dtype=acc, device=v.device) if state is None else state.to(acc).clone()
    # heads first: [B, H, T, *]
    q, k, v, g = (t.to(acc).transpose(1, 2) for t in (q, k, v, g))
    beta = beta.to(acc).transpose(1, 2)
    out = torch.empty(B, H, T, V, dtype=acc, device=v.device)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        C = e - s
        qc, kc, vc, bc = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], beta[:, :, s:e]
        G = g[:, :, s:e].cumsum(2)                                         # [B,H,C,K]
        diff = G.unsqueeze(3) - G.unsqueeze(2)                             # [B,H,r,i,K]
        tri = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
        incl = torch.where(tri[..., None], diff, diff.new_tensor(float("-inf"))).exp()
        strict = incl * (~torch.eye(C, dtype=torch.bool, device=v.device))[..., None]
        A = torch.einsum("bhrd,bhid,bhrid->bhri", kc, kc, strict) * bc.unsqueeze(-1)
        eye = torch.eye(C, dtype=acc, device=v.device)
        rhs = bc.unsqueeze(-1) * (vc - torch.einsum("bhrd,bhdv->bhrv", kc * G.exp(), S))
        u = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        qk = torch.einsum("bhrd,bhid,bhrid->bhri", qc, kc, incl)
        out[:, :, s:e] = scale * (torch.einsum("bhrd,bhdv->bhrv", qc * G.exp(), S)
                                  + torch.einsum("bhri,bhiv->bhrv", qk, u))
        last = G[:, :, -1:]                                                # [B,H,1,K]
        S = S * last.transpose(2, 3).exp() + torch.einsum(
            "bhid,bhiv->bhdv", kc * (last - G).exp(), u)
    return out.transpose(1, 2), S


def kda_gate(f, A_log, dt_bias, acc):
    """g = -exp(A_log) * softplus(f + dt_bias) in `acc` precision, shaped like [B,T,H,K]."""
    B, T, C = f.shape
    H = A_log.shape[2]
    g = F.softplus(f.to(acc) + dt_bias.to(acc)).view(B, T, H, C // H)
    return -A_log.to(acc).exp() * g


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
