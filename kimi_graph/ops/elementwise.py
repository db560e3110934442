"""Elementwise ops: binary with numpy broadcasting, unary activations, scalar scale, cast."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import (REQUIRED, TORCH_DTYPES, OpDef, broadcast_shapes, expect,
                       expect_float, register)


class _Binary(OpDef):
    family = "elementwise"
    operands = ("lhs", "rhs")
    fn = None

    def infer(self, types, attrs):
        a, b = types
        expect(a.dtype == b.dtype, self.kind, f"dtype mismatch {a} vs {b}")
        return [a.with_shape(broadcast_shapes(self.kind, a.shape, b.shape))]

    def ref(self, args, attrs):
        return [type(self).fn(*args)]


@register
class Add(_Binary):
    kind, doc = "add", "lhs + rhs"
    fn = staticmethod(torch.add)


@register
class Sub(_Binary):
    kind, doc = "sub", "lhs - rhs"
    fn = staticmethod(torch.sub)


@register
class Mul(_Binary):
    kind, doc = "mul", "lhs * rhs"
    fn = staticmethod(torch.mul)


@register
class Div(_Binary):
    kind, doc = "div", "lhs / rhs"
    fn = staticmethod(torch.div)


class _Unary(OpDef):
    family = "elementwise"
    operands = ("x",)
    fn = None
    flops_per_element = 1

    def infer(self, types, attrs):
        expect_float(self.kind, types[0])
        return [types[0]]

    def ref(self, args, attrs):
        return [type(self).fn(args[0])]

    def flops(self, ins, outs, attrs, dims):
        return float(self.flops_per_element * outs[0].numel(dims))


@register
class Neg(_Unary):
    kind, doc = "neg", "-x"
    fn = staticmethod(torch.neg)


@register
class Exp(_Unary):
    kind, doc = "exp", "e^x"
    fn = staticmethod(torch.exp)


@register
class Sigmoid(_Unary):
    kind, doc, flops_per_element = "sigmoid", "1 / (1 + e^-x)", 4
    fn = staticmethod(torch.sigmoid)


@register
class Silu(_Unary):
    kind, doc, flops_per_element = "silu", "x * sigmoid(x)", 5
    fn = staticmethod(F.silu)


@register
class Softplus(_Unary):
    kind, doc, flops_per_element = "softplus", "log(1 + e^x) (torch's threshold 20)", 4
    fn = staticmethod(F.softplus)


@register
class Scale(OpDef):
    family = "elementwise"
    kind, doc = "scale", "x * factor (a scalar attribute)"
    operands = ("x",)
    attributes = {"factor": REQUIRED(float)}

    def infer(self, types, attrs):
        expect_float(self.kind, types[0])
        return [types[0]]

    def ref(self, args, attrs):
        return [args[0] * attrs["factor"]]


@register
class Cast(OpDef):
    family = "elementwise"
    kind, doc = "cast", "convert x to `dtype`"
    operands = ("x",)
    attributes = {"dtype": REQUIRED(str)}

    def infer(self, types, attrs):
        expect(attrs["dtype"] in TORCH_DTYPES, self.kind, f"unknown dtype {attrs['dtype']!r}")
        return [types[0].with_dtype(attrs["dtype"])]

    def ref(self, args, attrs):
        return [args[0].to(TORCH_DTYPES[attrs["dtype"]])]

    def flops(self, ins, outs, attrs, dims):
        return 0.0

