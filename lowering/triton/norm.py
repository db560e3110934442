"""Row norms: rmsnorm, add_rmsnorm (fused residual add, returns the sum too) and gated_rmsnorm
(times sigmoid(gate)), one generated kernel per variant. Statistics in fp32."""
from __future__ import annotations

import functools

import torch

from .codegen import KernelSpec, launch, next_pow2, render, row_view
from .elementwise import ir_dtype, ptr_type
from .targets import config, current_target

_NORM = """
@triton.jit
def rmsnorm_rows(x_ptr, r_ptr, g_ptr, w_ptr, y_ptr, s_ptr, rows, xs):
    # BR rows a program (one [BR, BN] tile: short rows, e.g. KDA's per-head norm over 128, go
    # many to a program); N (the normalised dim) fits one block; x's rows xs apart
    row = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, BN)
    md = d < N
    m = (row < rows)[:, None] & md[None, :]
    r64 = row.to(tl.int64)[:, None]
    o = r64 * N + d[None, :]
    x = tl.load(x_ptr + r64 * xs + d[None, :], mask=m, other=0.0)
    if RESIDUAL:
        x = x + tl.load(r_ptr + o, mask=m, other=0.0)
        tl.store(s_ptr + o, x, mask=m)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / N + EPS)
    w = tl.load(w_ptr + d, mask=md, other=0.0).to(tl.float32)
    y = (xf * rstd[:, None]).to(DT).to(tl.float32) * w[None, :]
    if GATED:
        y = y * tl.sigmoid(tl.load(g_ptr + o, mask=m, other=0.0).to(tl.float32))
    tl.store(y_ptr + o, y.to(DT), mask=m)
"""


@functools.lru_cache(maxsize=None)
def norm_spec(N: int, dtype: str, eps: float, residual: bool, gated: bool, target: str) -> KernelSpec:
    """Rows of N; a program takes BR = tile // BN rows (at least one), BN = N's power of two;
    its warps: `num_warps`, or `num_warps_wide` for rows of `wide` elements and more."""
    cfg = config("norm", target)
    from .codegen import TL_DTYPES
    BN = next_pow2(N)
    consts = {"N": N, "BN": BN, "BR": max(1, next_pow2(cfg["tile"]) // BN), "EPS": float(eps),
              "RESIDUAL": residual, "GATED": gated, "DT": TL_DTYPES[dtype]}
    p = ptr_type(dtype)
    sig = {"x_ptr": p, "r_ptr": p, "g_ptr": p, "w_ptr": p, "y_ptr": p, "s_ptr": p, "rows": "i32", "xs": "i32"}
    name = "add_rmsnorm" if residual else "gated_rmsnorm" if gated else "rmsnorm"
    warps = cfg["num_warps_wide"] if BN >= cfg["wide"] else cfg["num_warps"]
    return KernelSpec(name, "rmsnorm_rows", render(name, _NORM, consts), sig, warps, 1, consts)


def rmsnorm(x, weight, eps, residual=None, gate=None):
    """rmsnorm(x [+ residual]) * weight [* sigmoid(gate)] over the last dim; with a residual
    also returns x + residual."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    for t in (residual, gate):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"residual/gate {tuple(t.shape)} must match x {tuple(x.shape)}")
    N = x.shape[-1]
    xc, xs = row_view(x)
    rows = xc.shape[0]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    s = torch.empty_like(y) if residual is not None else y
    spec = norm_spec(N, ir_dtype(x), float(eps), residual is not None, gate is not None, current_target())
    cast = lambda t: xc if t is None else t.to(x.dtype).contiguous()
    if rows:
        launch(spec, (-(-rows // spec.config["BR"]),), xc, cast(residual), cast(gate), weight.to(x.dtype).contiguous(), y, s, rows, xs)
    return (y, s) if residual is not None else y


def op_rmsnorm(args, attrs):
    return [rmsnorm(args[0], args[1], attrs["eps"])]


def op_add_rmsnorm(args, attrs):
    return list(rmsnorm(args[0], args[2], attrs["eps"], residual=args[1]))


def op_gated_rmsnorm(args, attrs):
    return [rmsnorm(args[0], args[1], attrs["eps"], gate=args[2])]


def specs_for(kind, ins, outs, attrs, target):
    x = ins[0]
    return [norm_spec(x.shape[-1], x.dtype, float(attrs["eps"]), kind == "add_rmsnorm", kind == "gated_rmsnorm",
                      target)]
