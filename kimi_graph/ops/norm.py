"""Normalisations over the last dim: RMSNorm (Kimi's: fp32 stats, weight after the cast) and L2;
the fused gated_rmsnorm(x, weight, gate) = rmsnorm(x) * weight * sigmoid(gate) and
add_rmsnorm(x, residual, weight) -> (rmsnorm(x + residual) * weight, x + residual)."""
from __future__ import annotations

import torch

from ..dtypes import acc_torch
from .decompose import cast_to
from .registry import REQUIRED, OpDef, expect, expect_float, register


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps), computed in at least fp32, returned in x's dtype."""
    xf = x.to(acc_torch(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def l2_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, computed in at least fp32."""
    xf = x.to(acc_torch(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


@register
class RMSNorm(OpDef):
    kind, doc = "rmsnorm", "weight * x / sqrt(mean(x^2) + eps) over the last dim"
    family = "norm"
    operands = ("x", "weight")
    attributes = {"eps": REQUIRED(float)}

    def infer(self, types, attrs):
        x, w = types
        expect_float(self.kind, x, w)
        expect(w.rank == 1 and w.shape[0] == x.shape[-1], self.kind, f"weight {w} does not fit x {x}")
        return [x]

    def ref(self, args, attrs):
        x, w = args
        return [w.to(x.dtype) * rms_normalize(x, attrs["eps"])]

    def flops(self, ins, outs, attrs, dims):
        return 4.0 * outs[0].numel(dims)


@register
class L2Norm(OpDef):
    kind, doc = "l2norm", "x / sqrt(sum(x^2) + eps) over the last dim"
    family = "norm"
    operands = ("x",)
    attributes = {"eps": REQUIRED(float)}

    def infer(self, types, attrs):
        expect_float(self.kind, types[0])
        return [types[0]]

    def ref(self, args, attrs):
        return [l2_normalize(args[0], attrs["eps"])]

    def flops(self, ins, outs, attrs, dims):
        return 3.0 * outs[0].numel(dims)


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
