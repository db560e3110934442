"""Matrix ops: linear (x @ W^T with HF's [out, in] weight layout), matmul, and the fused
head_matmul(x [B,T,H,N], w [H,N,R]) -> [B,T,H,R]: per-head projection (absorbed MLA weights)."""
from __future__ import annotations

import torch

from .registry import OpDef, broadcast_shapes, dim, expect, expect_float, register


@register
class Linear(OpDef):
    kind, doc = "linear", "x[..., in] @ weight[out, in]^T -> [..., out] (fp32 accumulation)"
    family = "linear"
    operands = ("x", "weight")

    def infer(self, types, attrs):
        x, w = types
        expect_float(self.kind, x, w)
        expect(w.rank == 2 and x.shape[-1] == w.shape[1], self.kind,
               f"x {x} does not match weight {w} (expects weight [out, {x.shape[-1]}])")
        return [x.with_shape(x.shape[:-1] + (w.shape[0],))]

    def ref(self, args, attrs):
        x, w = args
        return [torch.nn.functional.linear(x, w.to(x.dtype))]

    def flops(self, ins, outs, attrs, dims):
        return 2.0 * outs[0].numel(dims) * ins[1].shape[1]


@register
class Matmul(OpDef):
    kind, doc = "matmul", "batched a[..., m, k] @ b[..., k, n]"
    family = "linear"
    operands = ("a", "b")

    def infer(self, types, attrs):
        a, b = types
        expect_float(self.kind, a, b)
        expect(a.rank >= 2 and b.rank >= 2 and a.shape[-1] == b.shape[-2], self.kind,
               f"inner dims of {a} and {b} differ")
        batch = broadcast_shapes(self.kind, a.shape[:-2], b.shape[:-2])
        return [a.with_shape(batch + (a.shape[-2], b.shape[-1]))]

    def ref(self, args, attrs):
        a, b = args
        return [torch.matmul(a, b.to(a.dtype))]

    def flops(self, ins, outs, attrs, dims):
        return 2.0 * outs[0].numel(dims) * dim(ins[0].shape[-1], dims)


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
