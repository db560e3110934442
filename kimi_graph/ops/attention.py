"""Causal softmax attention with an absolute query offset (for prefill over a cache)."""
from __future__ import annotations

import torch

from ..dtypes import acc_torch
from .registry import REQUIRED, OpDef, dim, expect, expect_float, register


def causal_attention(q, k, v, q_start, scale):
    """q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv]; query i of sequence b sits at
    position q_start[b] + i (default S - T) and sees keys j <= that position."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    acc = acc_torch(q.dtype)
    if q_start is None:
        q_start = torch.full((B,), S - T, dtype=torch.long, device=q.device)
    pos = q_start.view(B, 1) + torch.arange(T, device=q.device).view(1, T)           # [B, T]
    visible = torch.arange(S, device=q.device).view(1, 1, S) <= pos.unsqueeze(-1)   # [B, T, S]
    scores = torch.einsum("bthd,bshd->bhts", q.to(acc), k.to(acc)) * scale
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v.to(acc)).to(v.dtype)


@register
class CausalAttention(OpDef):
    kind = "causal_attention"
    doc = "softmax(q k^T * scale, causal from q_start) v; keys past a query's position are masked"
    family = "attention"
    operands = ("q", "k", "v", "q_start?")
    attributes = {"scale": REQUIRED(float)}

    def infer(self, types, attrs):
        q, k, v = types[:3]
        expect_float(self.kind, q, k, v)
        expect(q.rank == k.rank == v.rank == 4, self.kind, "q, k, v must be [B, T|S, H, D]")
        expect(q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2] and q.shape[3] == k.shape[3],
               self.kind, f"q {q} and k {k} do not match")
        expect(v.shape[:3] == k.shape[:3], self.kind, f"v {v} and k {k} do not match")
        if len(types) > 3:
            expect(types[3].rank == 1 and types[3].dtype in ("i64", "i32"), self.kind,
                   f"q_start must be [B] ints, got {types[3]}")
        return [v.with_shape(q.shape[:3] + (v.shape[3],))]

    def ref(self, args, attrs):
        return [causal_attention(args[0], args[1], args[2], args[3] if len(args) > 3 else None,
                                 attrs["scale"])]

    def flops(self, ins, outs, attrs, dims):
        B, T, H, D = (dim(d, dims) for d in ins[0].shape)
        S, Dv = dim(ins[1].shape[1], dims), dim(ins[2].shape[3], dims)
        return 2.0 * B * H * T * S * (D + Dv)
