"""Causal softmax attention with an absolute query offset (for prefill over a cache), and the
fused mla_latent_attention(q_lat [B,T,H,R], q_rope [B,T,H,P], latent [B,S,R], rope_key [B,S,P],
q_start? [B]) {scale}: softmax((q_lat.latent + q_rope.rope_key) * scale) latent, causal as in
causal_attention -> [B,T,H,R] (still in latent space)."""
from __future__ import annotations

import torch

from ..dtypes import acc_torch
from .decompose import cast_to
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
