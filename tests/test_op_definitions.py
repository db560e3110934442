"""The op registry as the one source of truth: every OpDef's metadata, every fused op's
decomposition checked against its reference (run eagerly, and as a graph through the
interpreter), and every per-target table covering every kind (a lowering, or a refusal
with its reason), so adding a kind without them fails here."""
from __future__ import annotations

import pytest
import torch

from kimi_graph.interpreter import run_graph
from kimi_graph.ops import REGISTRY, TORCH_DTYPES, get_op
from kimi_graph.ops.decompose import decomposable_kinds, run_eager, subgraph
from kimi_graph.ops.registry import FAMILIES, Required
from reference_kimi import rel_err

B, T, H, K, V, D, E, S = 2, 11, 2, 4, 5, 6, 4, 13


def _kda(chunk: bool, state: bool):
    def make(dt, gen):
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dt)  # noqa: E731
        acc = torch.float64 if dt == torch.float64 else torch.float32
        args = [r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), r(B, T, H * K), r(B, T, H),
                r(1, 1, H, 1).abs().log1p().to(acc), r(H * K).to(acc)]
        if state:
            args.append(r(B, H, K, V).to(acc))
        return args, {"scale": K ** -0.5, **({"chunk_size": 4} if chunk else {})}
    return make


def _mla(q_start: bool):
    def make(dt, gen):
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dt)  # noqa: E731
        args = [r(B, T, H, D), r(B, T, H, 3), r(B, S, D), r(B, S, 3)]
        if q_start:
            args.append(torch.tensor([S - T, 1]))
        return args, {"scale": 0.3}
    return make


def _route(weights: str, n_group: int):
    def make(dt, gen):
        acc = torch.float64 if dt == torch.float64 else torch.float32
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        return [r(B, T, D).to(dt), r(E, D).to(dt), (0.1 * r(E)).to(acc)], \
            {"top_k": 2, "n_group": n_group, "topk_group": 1, "scaling": 2.5, "weights": weights}
    return make


def _experts(dt, gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dt)  # noqa: E731
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(B * T)]).view(B, T, 2)
    return [r(B, T, D), ids, r(B, T, 2), r(E, 6, D), r(E, D, 3), r(B, T, D)], {}


def _quantized(kind: str, fmt: str, symmetric: bool = True):
    """Quantized expert weights (w13 [E,6,D], w2 [E,D,4]: D=6 and I=4 rows are one group)."""
    from kimi_graph.ops.quant import quantize

    def make(dt, gen):
        args, _ = _experts(dt, gen)
        if kind == "quantized_grouped_swiglu":
            rows = args[0].reshape(-1, D)[:7]
            lead, tail = [rows, torch.tensor([0, 2, 2, 5, 7])], []
        else:
            lead, tail = args[:3], args[5:]
        w13 = torch.randn(E, 8, D, generator=gen, dtype=torch.float64).to(dt)
        w2 = torch.randn(E, D, 4, generator=gen, dtype=torch.float64).to(dt)
        (q13, s13, z13), (q2, s2, z2) = (quantize(w, fmt, 128, symmetric) for w in (w13, w2))
        zeros = [] if symmetric else [z13, z2]
        return lead + [q13, s13, q2, s2] + tail + zeros, {"format": fmt}
    return make


def _simple(shapes, **attrs):
    def make(dt, gen):
        return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dt) for s in shapes], attrs
    return make


SAMPLES = {
    "kda_fused_recurrent": [_kda(False, False), _kda(False, True)],
    "kda_fused_chunk": [_kda(True, True), _kda(True, False)],
    "gated_rmsnorm": [_simple([(B, T, D), (D,), (B, T, D)], eps=1e-5)],
    "add_rmsnorm": [_simple([(B, T, D), (B, T, D), (D,)], eps=1e-6)],
    "head_matmul": [_simple([(B, T, H, K), (H, K, V)])],
    "mla_latent_attention": [_mla(True), _mla(False)],
    "moe_route": [_route("official", 2), _route("unbiased", 1)],
    "stack": [_simple([(3, D), (3, D), (3, D)])],
    "moe_experts": [_experts],
    **{k: [_quantized(k, "int4"), _quantized(k, "int8", False), _quantized(k, "fp8")]
       for k in ("quantized_grouped_swiglu", "quantized_moe_experts")},
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def test_every_op_declares_its_metadata():
    for kind, op in REGISTRY.items():
        assert op.kind == kind and op.family in FAMILIES, kind
        assert op.results and len(set(op.results)) == len(op.results), kind
        for name, ty in op.attr_types().items():
            assert ty in (bool, int, float, str, list), (kind, name)
        assert not any(isinstance(d, Required) and d.type is None for d in op.attributes.values())


def test_every_fused_op_decomposes_or_says_why():
    for kind, op in REGISTRY.items():
        if op.fused:
            assert (op.decompose is None) == bool(op.no_decomposition), kind
        else:
            assert op.decompose is None and not op.no_decomposition, kind
    assert set(decomposable_kinds()) == set(SAMPLES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_decomposition_matches_reference(kind, dtype):
    """Eagerly, and as a graph of registry ops run by the interpreter."""
    gen = torch.Generator().manual_seed(0)
    for make in SAMPLES[kind]:
        args, attrs = make(dtype, gen)
        full = get_op(kind).full_attrs(attrs)
        ref = get_op(kind).ref(args, full)
        eager = run_eager(kind, args, attrs)
        from kimi_graph.ops.decompose import Eager
        g = subgraph(kind, [Eager.type(a) for a in args], attrs)
        graph = run_graph(g, dict(zip(g.inputs, args)), {})
        for outs in (eager, graph):
            assert len(outs) == len(ref) == len(get_op(kind).results)
            for o, r in zip(outs, ref):
                assert o.dtype == r.dtype and o.shape == r.shape, kind
                if r.dtype in (torch.int64, torch.int32):
                    assert torch.equal(o, r), kind
                else:
                    assert rel_err(o, r) <= TOL[dtype], (kind, rel_err(o, r))


# -- every per-target table covers every kind ------------------------------------------------

def test_torch_table_covers_every_kind():
    from kimi_graph.lowering.torch.ops import LOWERING
    assert set(LOWERING) == set(REGISTRY)


def test_triton_table_covers_every_kind():
    from kimi_graph.lowering.triton.backend import KERNELS, REFERENCE
    from kimi_graph.lowering.triton.elementwise import KINDS
    kernels = set(KERNELS) | set(KINDS)
    assert not kernels & set(REFERENCE)
    assert kernels | set(REFERENCE) == set(REGISTRY)
    assert all(reason for reason in REFERENCE.values())


def test_onnx_tables_cover_every_kind():
    pytest.importorskip("onnx")
    from kimi_graph.lowering.onnx.export import OP_SETS, refusals, tables
    for ops in OP_SETS:
        table, refused = tables()[ops], refusals()[ops]
        assert not set(table) & set(refused), ops
        assert set(table) | set(refused) == set(REGISTRY), (ops, set(REGISTRY) - set(table) - set(refused))


def test_drawing_colours_every_family():
    from kimi_graph.svg import COLOURS
    assert set(COLOURS) == set(FAMILIES)
    assert TORCH_DTYPES   # the dtype module feeds the registry
