"""The `portable` operator set: standard ONNX ops for primitive ops, and every fused op (and
the KDA recurrence) as one node of our `kimi_graph` domain carrying a function body in
standard ops: generated from the op's decomposition where it has one; the chunkwise KDA from
the op library's chunk_form (functions.py), the MoE dispatch ops hand-written. Runs on any
ONNX runtime, `onnx.reference` included."""
from __future__ import annotations

from kimi_graph.ops.decompose import decomposable_kinds

from . import primitives
from .emitter import DOMAIN, table_registrar
from .functions import KDA_CHUNK, require, require_kda_chunkwise

TABLE = dict(primitives.TABLE)

maps = table_registrar(TABLE)


def zeros(ctx, dims, dtype: str) -> str:
    return ctx.em("ConstantOfShape", ctx.em.shape(dims), value=ctx.zero_tensor(dtype))


def state_or_zeros(ctx, op, ins, index: int, state_type) -> str:
    return ins[index] if len(ins) > index else zeros(ctx, state_type.shape, state_type.dtype)


@maps("causal_conv1d")
def causal_conv1d(ctx, op, ins):
    """Concat(state, x^T) -> depthwise Conv -> (SiLU); the new state is the last K-1 columns."""
    em = ctx.em
    wt = ctx.ty(op.inputs[1])
    C, K = wt.shape[0], wt.shape[2]
    st_ty = ctx.ty(op.outputs[1])
    st = state_or_zeros(ctx, op, ins, 2, st_ty)
    xs = em("Concat", st, em("Transpose", primitives.token_masked(ctx, ins[0]), perm=[0, 2, 1]), axis=2)  # [B,C,K-1+T]
    y = em("Conv", xs, ins[1], group=C, kernel_shape=[K])
    y = em("Transpose", y, perm=[0, 2, 1])
    if op.attrs["activation"] == "silu":
        y = em("Mul", y, em("Sigmoid", y))
    new = em("Slice", xs, em.ints(-(K - 1)), em.ints(2 ** 62), em.ints(2)) if ctx.token_valid is None \
        else primitives.conv_state_at_last_token(ctx, xs, K)
    return [y, new]


@maps("kda_recurrent")
def kda_recurrent(ctx, op, ins):
    """The delta rule in its chunkwise form (ops/kda.chunk_form: a Loop over chunks of the op's
    chunk size, functions.kda_chunkwise)."""
    st = state_or_zeros(ctx, op, ins, 5, ctx.ty(op.outputs[1]))
    g, beta = primitives.kda_hold(ctx, ins[3], ins[4])
    name = require_kda_chunkwise(ctx.em, op.attrs.get("chunk_size") or KDA_CHUNK)
    return ctx.em.node(name, ins[:3] + [g, beta, st], 2, domain=DOMAIN, scale=float(op.attrs["scale"]))


def _decomposition_call(ctx, op, ins):
    from .export import decomposition_call
    return decomposition_call(ctx, op, ins)


maps(*(k for k in decomposable_kinds() if k != "stack"))(_decomposition_call)


@maps("moe_permute")
def moe_permute(ctx, op, ins):
    return ctx.em.node(require(ctx.em, op.kind), ins, 3, domain=DOMAIN, num_experts=op.attrs["num_experts"])


@maps("grouped_swiglu", "moe_unpermute")
def moe_dispatch_call(ctx, op, ins):
    return ctx.em.node(require(ctx.em, op.kind), ins, 1, domain=DOMAIN)


__all__ = ["TABLE"]
