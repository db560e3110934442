"""The `portable` operator set: standard ONNX ops for primitive ops, and for every fused op
(and the KDA recurrence) one node of our `kimi_graph` domain carrying a function body in
standard ops (functions.py). Runs on any ONNX runtime, `onnx.reference` included."""
from __future__ import annotations

from onnx import TensorProto

from . import standard
from .emitter import DOMAIN, FLOAT, table_registrar
from .functions import require

TABLE = dict(standard.TABLE)

maps = table_registrar(TABLE)


def call(ctx, name: str, ins, n_out: int, **attrs) -> list[str]:
    require(ctx.em, name)
    return ctx.em.node(name, ins, n_out, domain=DOMAIN, **attrs)


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
    xs = em("Concat", st, em("Transpose", standard.token_masked(ctx, ins[0]), perm=[0, 2, 1]), axis=2)  # [B,C,K-1+T]
    y = em("Conv", xs, ins[1], group=C, kernel_shape=[K])
    y = em("Transpose", y, perm=[0, 2, 1])
    if op.attrs["activation"] == "silu":
        y = em("Mul", y, em("Sigmoid", y))
    new = em("Slice", xs, em.ints(-(K - 1)), em.ints(2 ** 62), em.ints(2)) if ctx.token_valid is None \
        else standard.conv_state_at_last_token(ctx, xs, K)
    return [y, new]


@maps("kda_recurrent")
def kda_recurrent(ctx, op, ins):
    """The delta rule in its chunkwise form (a Loop over chunks, see functions.kda_chunkwise)."""
    st = state_or_zeros(ctx, op, ins, 5, ctx.ty(op.outputs[1]))
    g, beta = standard.kda_hold(ctx, ins[3], ins[4])
    return call(ctx, "kda_chunkwise", ins[:3] + [g, beta, st], 2, scale=float(op.attrs["scale"]))


@maps("kda_fused_recurrent", "kda_fused_chunk")
def kda_fused(ctx, op, ins):
    st = state_or_zeros(ctx, op, ins, 7, ctx.ty(op.outputs[1]))
    if ctx.token_valid is not None:      # padded batch: gate here, held on pads, then the core
        em = ctx.em
        q, k, v, f, b, A, dt = ins[:7]
        eps = em.const(float(op.attrs["l2norm_eps"]), "f32")
        g, beta = standard.kda_hold(ctx, standard.kda_gate(em, f, A, dt, em("Shape", q, start=2, end=4)),
                                    em("Sigmoid", em("Cast", b, to=FLOAT)))
        return call(ctx, "kda_chunkwise", [standard.l2_unit(em, q, eps), standard.l2_unit(em, k, eps), v, g, beta, st],
                    2, scale=float(op.attrs["scale"]))
    attrs = {"scale": float(op.attrs["scale"]), "l2norm_eps": float(op.attrs["l2norm_eps"])}
    if op.kind == "kda_fused_chunk":
        attrs["chunk_size"] = int(op.attrs["chunk_size"])
    return call(ctx, op.kind, ins[:7] + [st], 2, **attrs)


@maps("gated_rmsnorm", "add_rmsnorm")
def norms(ctx, op, ins):
    return call(ctx, op.kind, ins, len(op.outputs), eps=float(op.attrs["eps"]))


@maps("head_matmul", "moe_unpermute", "grouped_swiglu")
def plain(ctx, op, ins):
    return call(ctx, op.kind, ins, len(op.outputs))


def default_q_start(ctx, q: str, cache: str) -> str:
    """S - T for every sequence: a prefill with nothing cached before it."""
    em = ctx.em
    st = em("Sub", em("Shape", cache, start=1, end=2), em("Shape", q, start=1, end=2))
    return em("Expand", st, em("Shape", q, start=0, end=1))


@maps("mla_latent_attention")
def mla_latent_attention(ctx, op, ins):
    em = ctx.em
    qs = ins[4] if len(ins) > 4 else default_q_start(ctx, ins[0], ins[2])
    keys = ctx.key_valid or em("ConstantOfShape", em("Shape", ins[2], start=0, end=2), value=ctx.one_tensor("bool"))
    return call(ctx, op.kind, ins[:4] + [qs, keys], 1, scale=float(op.attrs["scale"]))


@maps("moe_route")
def moe_route(ctx, op, ins):
    a = op.attrs
    return call(ctx, op.kind, ins, 2, top_k=a["top_k"], n_group=a["n_group"], topk_group=a["topk_group"],
                renormalize=int(bool(a["renormalize"]) and a["top_k"] > 1), scaling=float(a["scaling"]),
                unbiased=int(a["weights"] == "unbiased"))


@maps("moe_permute")
def moe_permute(ctx, op, ins):
    return call(ctx, op.kind, ins, 3, num_experts=op.attrs["num_experts"])


@maps("stack")
def stack(ctx, op, ins):
    em = ctx.em
    return [em("Concat", *[em("Unsqueeze", x, em.ints(0)) for x in ins], axis=0)]


__all__ = ["TABLE", "FLOAT", "TensorProto"]
