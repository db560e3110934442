"""The KDA delta rule as one semantic op (token-by-token recurrence, fp32 state)."""
from __future__ import annotations

import torch

from ..dtypes import acc_dtype, acc_torch
from .registry import REQUIRED, OpDef, expect, expect_float, register


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
        state, n = args[5] if len(args) > 5 else None, attrs["chunk_size"]
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
