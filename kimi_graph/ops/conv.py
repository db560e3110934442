"""Causal depthwise conv1d over time with a carried state (the KDA short convolution)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import OpDef, expect, expect_float, register


def causal_conv1d(x: torch.Tensor, w: torch.Tensor, state: torch.Tensor | None):
    """x [B, T, C], w [C, 1, K], state [B, C, K-1] (the K-1 inputs before x; zeros if None).
    Returns y [B, T, C] (no activation) and the new state [B, C, K-1]."""
    B, T, C = x.shape
    K = w.shape[-1]
    if state is None:
        state = x.new_zeros(B, C, K - 1)
    xs = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=2)          # [B, C, K-1+T]
    y = F.conv1d(xs, w.to(x.dtype), groups=C)                                # [B, C, T]
    return y.transpose(1, 2), xs[:, :, xs.shape[2] - (K - 1):].contiguous()


@register
class CausalConv1d(OpDef):
    kind = "causal_conv1d"
    doc = "y[t, c] = sum_i w[c, 0, i] * x[t - K + 1 + i, c], inputs before t=0 from `state`"
    family = "elementwise"
    results = ("y", "state")
    operands = ("x", "weight", "state?")
    attributes = {"activation": "none"}   # "silu": fused SiLU on the output

    def infer(self, types, attrs):
        expect(attrs["activation"] in ("none", "silu"), self.kind,
               f"activation must be 'none' or 'silu', got {attrs['activation']!r}")
        x, w = types[0], types[1]
        expect_float(self.kind, x, w)
        expect(x.rank == 3 and w.rank == 3 and w.shape[0] == x.shape[2] and w.shape[1] == 1,
               self.kind, f"x {x} [B, T, C] does not fit weight {w} [C, 1, K]")
        K = w.shape[2]
        state = x.with_shape((x.shape[0], x.shape[2], K - 1))
        if len(types) > 2:
            expect(types[2] == state, self.kind, f"state must be {state}, got {types[2]}")
        return [x, state]

    def ref(self, args, attrs):
        y, state = causal_conv1d(args[0], args[1], args[2] if len(args) > 2 else None)
        return [F.silu(y) if attrs["activation"] == "silu" else y, state]

    def flops(self, ins, outs, attrs, dims):
        return 2.0 * outs[0].numel(dims) * ins[1].shape[2]
