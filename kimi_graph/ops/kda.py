"""The KDA delta rule as one semantic op (token-by-token recurrence, fp32 state)."""
from __future__ import annotations

import torch

from .registry import REQUIRED, OpDef, expect, expect_float, register


def state_dtype(x: torch.dtype) -> torch.dtype:
    return torch.float64 if x == torch.float64 else torch.float32


def kda_recurrence(q, k, v, g, beta, state, scale):
    """q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state [B, H, K, V] or None.
    Per token: S = S*exp(g)[:, None]; S += k (beta (v - k^T S))^T; o = (scale q)^T S."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    acc = state_dtype(v.dtype)
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
    doc = "gated delta rule per head with per-channel log decay g; state [B, H, K, V] in fp32"
    operands = ("q", "k", "v", "g", "beta", "state?")
    attributes = {"scale": REQUIRED}

    def infer(self, types, attrs):
        q, k, v, g, beta = types[:5]
        expect_float(self.kind, q, k, v, g, beta)
        expect(q.rank == 4 and q.shape == k.shape == g.shape, self.kind,
               f"q {q}, k {k}, g {g} must be equal [B, T, H, K]")
        expect(v.rank == 4 and v.shape[:3] == q.shape[:3], self.kind, f"v {v} must be [B, T, H, V]")
        expect(beta.shape == q.shape[:3], self.kind, f"beta {beta} must be [B, T, H]")
        B, _, H, K = q.shape
        state = v.with_shape((B, H, K, v.shape[3])).with_dtype("f64" if v.dtype == "f64" else "f32")
        if len(types) > 5:
            expect(types[5] == state, self.kind, f"state must be {state}, got {types[5]}")
        return [v, state]

    def ref(self, args, attrs):
        q, k, v, g, beta = args[:5]
        o, S = kda_recurrence(q, k, v, g, beta, args[5] if len(args) > 5 else None, attrs["scale"])
        return [o.to(v.dtype), S]

    def flops(self, ins, outs, attrs, dims):
        B, T, H, K = (d if isinstance(d, int) else dims[d] for d in ins[0].shape)
        return 7.0 * B * T * H * K * outs[0].shape[3]


def kda_chunkwise(q, k, v, g, beta, state, scale, chunk_size):
    """The chunkwise (WY/UT) form of `kda_recurrence`: same inputs, same results.
    Implemented by the chunk-kda pass work; until then this raises."""
    raise NotImplementedError("kda_chunkwise: chunkwise KDA reference not implemented yet")
