"""The custom ops' fake implementations under symbolic shapes, before and after the default
pipeline: every axis the layer graph leaves symbolic (batch B, sequence T, cache window S)
gets its own symbol per tensor, as dynamo may hand them (two caches of one layer, equal by
design, can carry two symbols). The fake implementation must then constrain, not compare:
it runs, its result sizes equal the real op's, and sizes symbolic in the graph stay
symbolic. torch.library.opcheck checks the same samples with dynamic shapes
(test_aot_dispatch_dynamic)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from kimi_graph.interpreter import run_graph
from kimi_graph.lowering.mlir.export import example_inputs
from kimi_graph.lowering.torch import custom_ops
from kimi_graph.lowering.torch.ops import custom_kinds
from kimi_graph.ops import get_op
from test_lowering_torch import GRAPHS, graph_and_weights

PIPELINES = (None, "default", "default,quantize-experts,fold-constants")   # the last: int4 experts


def samples_by_pipeline() -> dict[tuple[str | None, str], tuple]:
    """(pipeline, kind) -> (operands, attributes, the operands' IR types): the first op of each
    custom kind in the graphs run by the interpreter (B=2, T=5, S=8: distinct sizes)."""
    out = {}
    for pipeline in PIPELINES:
        for mode, stateful in GRAPHS:
            g, w = graph_and_weights(1, mode, stateful, pipeline=pipeline)
            ops = iter([op for op in g.ops() if op.kind in custom_kinds()])

            def spy(args, attrs):
                op = next(ops)
                out.setdefault((pipeline, op.kind), (
                    [a.clone() if a is not None else None for a in args], dict(attrs),
                    [g.types[v] for v in op.inputs]))
                return get_op(op.kind).ref(args, attrs)

            run_graph(g, example_inputs(g, batch=2, seq=5, cache_len=8), w,
                      impls={k: spy for k in custom_kinds()})
    return out


@pytest.fixture(scope="module")
def samples():
    out = samples_by_pipeline()
    covered = {k for _, k in out}
    assert covered == set(custom_kinds()), f"no sample for {set(custom_kinds()) - covered}"
    return out


def symbolic(fake_mode, t: torch.Tensor, ty) -> torch.Tensor:
    """A fake of `t` with a fresh symbol for every axis the IR type leaves symbolic."""
    dyn = [DimDynamic.DYNAMIC if isinstance(d, str) else DimDynamic.STATIC for d in ty.shape]
    return fake_mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn))


def check_fake(kind, args, attrs, types):
    op, attrs = custom_ops.custom_op(kind), custom_ops.coerce_attrs(kind, attrs)
    real = op(*args, **attrs)
    real = list(real) if isinstance(real, tuple) else [real]
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fakes = [symbolic(mode, a, ty) if a is not None else None for a, ty in zip(args, types)]
        out = op(*fakes, **attrs)
    out = list(out) if isinstance(out, tuple) else [out]
    out_types = get_op(kind).infer(types, get_op(kind).full_attrs(attrs))
    assert len(out) == len(real) == len(out_types)
    for o, r, ty in zip(out, real, out_types):
        assert o.dtype == r.dtype
        for d, irdim in zip(o.shape, ty.shape):     # symbolic in the graph: not specialized
            assert isinstance(d, torch.SymInt) == isinstance(irdim, str), (o.shape, ty)
        assert [int(d) for d in o.shape] == list(r.shape)


def each_kind(samples, pipeline, check) -> None:
    failed = {}
    for (p, kind), sample in sorted(samples.items(), key=str):
        if p == pipeline:
            try:
                check(kind, *sample)
            except Exception as e:      # noqa: BLE001 -- collected, reported together
                failed[kind] = f"{type(e).__name__}: {str(e)[:300]}"
    assert not failed, failed


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_fake_implementations_with_a_symbol_per_varying_axis(pipeline, samples):
    each_kind(samples, pipeline, check_fake)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_opcheck_with_dynamic_shapes(pipeline, samples):
    def check(kind, args, attrs, _types):
        torch.library.opcheck(custom_ops.custom_op(kind), tuple(args), custom_ops.coerce_attrs(kind, attrs),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    each_kind(samples, pipeline, check)
