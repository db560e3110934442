"""How every op kind of the registry lowers to torch: the one table (`LOWERING`).

Two ways, one per kind:
- CUSTOM: a `torch.library` op `torch.ops.kimi_graph.<kind>` with a fake (meta)
  implementation, opaque to torch.compile and torch.export. Every fused op, and the ops whose
  semantics are data-dependent (top-k routing, per-expert dispatch, cache writes, the KDA loop).
  Implementations per device are chosen in `custom_ops` (`set_impl`).
- INLINE: a plain function the compiler traces through (Inductor fuses it with its
  neighbours): the op's torch reference, wrapped so that it appears as *one* node in the FX
  graphs dynamo builds (`allow_in_graph`), which is what lets the "kimi_graph" compile
  backend read those graphs back into the layer graph.

Some references sync with the host (`int(t)`, `nonzero`, `bincount`): fine on the CPU, but
neither traceable with static shapes nor capturable in a CUDA graph. Their STATIC forms
below compute the same function without host syncs or data-dependent shapes; they serve as
the default CUDA implementations of those custom ops and as the "reference form" that the
MLIR export decomposes custom ops into (`lower(..., decompose=True)`). A fused op with a
decomposition in the op library is decomposed through it, each of its ops in its own
decomposed form, so it needs no form written here. Where torch-mlir cannot lower even that
(the chunkwise KDA's triangular solve), an EXPORT form stands in: the same function through
ops it can lower.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from kimi_graph.ops import REGISTRY, get_op
from kimi_graph.ops.decompose import decomposable, eager_form
from kimi_graph.ops.moe import swiglu

CUSTOM, INLINE = "custom", "inline"


# -- static (sync-free) forms: fn(args, attrs) -> list of results, like OpDef.ref ------------

def _embedding(args, attrs):
    """F.embedding without the reference's range check (a host sync); out-of-range ids still
    raise (IndexError on the CPU, a device assert on the GPU), and executors check them first."""
    return [F.embedding(args[0], args[1])]


def _cache_write(args, attrs):
    """cache[b, pos[b] + t] = new[b, t] as one scatter; the bounds check is the scatter's own."""
    cache, new, pos = args
    idx = pos.view(-1, 1) + torch.arange(new.shape[1], device=pos.device).view(1, -1)
    return [cache.scatter(1, idx.unsqueeze(-1).expand(-1, -1, new.shape[2]), new)]


def _moe_expert(args, attrs):
    """Dense: every token goes through the expert, weighted by its gate (0 where not routed)."""
    acc, x, ids, w, w1, w3, w2 = args
    gate = (w * (ids == attrs["expert"]).to(w.dtype)).sum(-1, keepdim=True)
    y = swiglu(x, w1.to(x.dtype), w3.to(x.dtype), w2.to(x.dtype))
    return [acc + (gate * y.to(gate.dtype)).to(acc.dtype)]


def _moe_permute(args, attrs):
    """As the reference, with expert counts by scatter_add (bincount's size is data-dependent),
    and the stable sort as a plain sort of unique keys id * M + m (torch-mlir has no stable sort)."""
    x, ids = args
    k, D, E = ids.shape[-1], x.shape[-1], attrs["num_experts"]
    flat = ids.reshape(-1)
    M = flat.shape[0]
    order = torch.sort(flat * M + torch.arange(M, device=flat.device))[1]
    counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return [x.reshape(-1, D)[order // k], offsets, order]


def _grouped_swiglu(args, attrs):
    """Every expert over every row, each row keeping its own expert's result."""
    x, off, w13, w2 = args
    I = w2.shape[2]
    rows = torch.arange(x.shape[0], device=x.device)
    expert_of_row = (rows.unsqueeze(1) >= off[1:].unsqueeze(0)).sum(1)   # offsets passed
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        y = swiglu(x, *(w.to(x.dtype) for w in (w13[e, :I], w13[e, I:], w2[e])))
        out = torch.where((expert_of_row == e).unsqueeze(-1), y, out)
    return [out]


def _kda_chunk_as_recurrence(args, attrs):
    """kda_fused_chunk computes what kda_fused_recurrent does (ops/kda.py): the token loop
    avoids linalg_solve_triangular, which torch-mlir does not lower."""
    return get_op("kda_fused_recurrent").ref(args, {k: attrs[k] for k in ("scale", "l2norm_eps")})


def _all_reduce(args, attrs):
    """A functional collective: torch.compile traces it (the reference's in-place call it cannot)."""
    import torch.distributed._functional_collectives as funcol

    from kimi_graph.parallel import process_group
    return [funcol.wait_tensor(funcol.all_reduce(args[0], "sum", process_group(attrs["group"], attrs["size"])))]


def _all_gather(args, attrs):
    import torch.distributed._functional_collectives as funcol

    from kimi_graph.parallel import process_group
    x = args[0].contiguous()
    group = process_group(attrs["group"], attrs["size"])
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor   # torch < 2.12
    return [funcol.wait_tensor(gather(x, attrs["dim"] % x.dim(), group))]


@dataclass(frozen=True)
class Lowering:
    how: str                              # CUSTOM or INLINE
    static: Callable | None = None        # sync-free form where the reference is not one
    export: Callable | None = None        # for decomposition, where the static form will not do


# every op kind, once (tests check that this covers the registry exactly)
LOWERING: dict[str, Lowering] = {
    # elementwise, matrix, normalisation, data movement: traced and fused by the compiler
    **{k: Lowering(INLINE) for k in (
        "add", "sub", "mul", "div", "neg", "exp", "sigmoid", "silu", "softplus", "scale", "cast",
        "linear", "matmul", "rmsnorm", "l2norm", "reshape", "transpose", "slice", "take_last", "concat",
        "expand", "zeros_like", "take_along", "renormalize", "causal_conv1d", "causal_attention",
        "stack", "local_experts")},
    "embedding": Lowering(INLINE, _embedding),
    # collectives of sharded graphs: torch.distributed's functional collectives
    "all_reduce": Lowering(INLINE, _all_reduce),
    "all_gather": Lowering(INLINE, _all_gather),
    # data-dependent primitives
    "grouped_topk": Lowering(CUSTOM),
    "moe_expert": Lowering(CUSTOM, _moe_expert),
    "cache_write": Lowering(CUSTOM, _cache_write),
    "kda_recurrent": Lowering(CUSTOM),
    # fused ops (introduced by passes; see kimi_graph/ops/fused.py for where each lives)
    "kda_fused_recurrent": Lowering(CUSTOM),
    "kda_fused_chunk": Lowering(CUSTOM, export=_kda_chunk_as_recurrence),
    "gated_rmsnorm": Lowering(CUSTOM),
    "add_rmsnorm": Lowering(CUSTOM),
    "head_matmul": Lowering(CUSTOM),
    "mla_latent_attention": Lowering(CUSTOM),
    "moe_route": Lowering(CUSTOM),
    "moe_permute": Lowering(CUSTOM, _moe_permute),
    "grouped_swiglu": Lowering(CUSTOM, _grouped_swiglu),
    "moe_unpermute": Lowering(CUSTOM),
    # ONNX Runtime's legalisation only: traced as its decomposition (the dispatch ops' static forms)
    "moe_experts": Lowering(INLINE),
    # low-bit experts (ops/quant.py): a weight transform, dequantization, the quantized MoE
    "quantize": Lowering(INLINE),
    "dequantize": Lowering(INLINE),
    "quantized_grouped_swiglu": Lowering(CUSTOM, lambda args, attrs: _decomposed_static(
        "quantized_grouped_swiglu", args, attrs)),
    "quantized_moe_experts": Lowering(INLINE),
}


def _decomposed_static(kind: str, args, attrs):
    """`kind`'s decomposition, each op in its static form."""
    return eager_form(kind, static_form)(args, attrs)


def lowering(kind: str) -> Lowering:
    get_op(kind)   # unknown kinds: the registry's error
    try:
        return LOWERING[kind]
    except KeyError:
        raise NotImplementedError(f"op {kind!r} has no torch lowering; add it to LOWERING in "
                                  f"{__name__}") from None


def static_form(kind: str) -> Callable:
    """fn(args, attrs) -> results, free of host syncs and data-dependent shapes."""
    return lowering(kind).static or get_op(kind).ref


def decomposed_form(kind: str) -> Callable:
    """What `lower(..., decompose=True)` traces for a kind: its export form, else its
    decomposition (ops/decompose.py; each op in its decomposed form), else its static form."""
    low = lowering(kind)
    if low.export:
        return low.export
    return eager_form(kind, decomposed_form) if decomposable(kind) else static_form(kind)


def custom_kinds() -> list[str]:
    return [k for k, low in LOWERING.items() if low.how == CUSTOM and k in REGISTRY]


# -- the functions FX nodes call ----------------------------------------------------------

def _as_node_fn(kind: str, impl: Callable) -> Callable:
    """fn(*operands, **attrs) -> result or tuple of results, kept as one node by dynamo."""
    def fn(*args, **attrs):
        out = impl(list(args), attrs)
        return out[0] if len(out) == 1 else tuple(out)
    fn.__name__ = fn.__qualname__ = kind
    fn.__module__ = functional.__name__
    fn = torch._dynamo.allow_in_graph(fn)
    setattr(functional, kind, fn)
    return fn


# the generated node functions live in an importable namespace: `...ops.functional.<kind>`
functional = types.ModuleType(__name__ + ".functional", "node functions of the torch lowering")
sys.modules[functional.__name__] = functional
_FUNCTIONS: dict[tuple[str, bool], Callable] = {}


def node_function(kind: str, decompose: bool = False) -> Callable:
    """What an FX node of this kind calls: the custom op, or (INLINE kinds, and every kind when
    `decompose`) a traced function running the op's decomposed form."""
    low = lowering(kind)
    if low.how == CUSTOM and not decompose:
        from .custom_ops import custom_op
        return custom_op(kind)
    key = (kind, low.how == CUSTOM)
    if key not in _FUNCTIONS:
        _FUNCTIONS[key] = _as_node_fn(kind if low.how == INLINE else kind + "_decomposed",
                                      decomposed_form(kind))
    return _FUNCTIONS[key]


def define_functional() -> None:
    """`functional.<kind>` for every kind: what `node_function(kind)` returns."""
    for kind in LOWERING:
        setattr(functional, kind, node_function(kind))


def kind_of(target) -> str | None:
    """The op kind an FX node target stands for (our node functions and custom ops), or None."""
    from .custom_ops import kind_of_custom
    for (kind, _), fn in _FUNCTIONS.items():
        if fn is target:
            return kind
    return kind_of_custom(target)
