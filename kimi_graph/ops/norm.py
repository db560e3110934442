"""Normalisations over the last dim: RMSNorm (Kimi's: fp32 stats, weight after the cast) and L2."""
from __future__ import annotations

import torch

from ..dtypes import acc_torch
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
