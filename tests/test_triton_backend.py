"""kimi_graph.load(..., backend="triton") through the Triton interpreter (CPU, fp32): the tiny
model's logits and decode states match the reference interpreter, as declared and after the
default pass pipeline (fused ops). Tolerance: rel. error <= 1e-5 (fp32, different summation order)."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

import kimi_graph  # noqa: E402
from kimi_graph.lowering.triton.backend import Group, covered, plan  # noqa: E402
from reference_kimi import rel_err as rel  # noqa: E402

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("triton_interpret")



def state_inputs(g, ids, pos, B=2, S=12):
    gen = torch.Generator().manual_seed(3)
    inputs = {"input_ids": ids, "cache_pos": pos}
    for name in g.meta["state_inputs"]:
        shape = [B if d == "B" else S if d == "S" else d for d in g.inputs[name].shape]
        inputs[name[1:]] = torch.randn(*shape, generator=gen)
    return inputs


@pytest.mark.parametrize("pipeline", [None, "default"])
def test_tiny_model_on_triton_matches_interpreter(pipeline):
    ref = kimi_graph.load("tiny", pipeline=pipeline)
    tri = kimi_graph.load("tiny", pipeline=pipeline, backend="triton")
    g = tri.get_graph()
    kernel_ops = [op.kind for op in g.ops() if covered(g, op)]
    assert kernel_ops and ("kda_fused_chunk" in kernel_ops if pipeline else "kda_recurrent" in kernel_ops)
    ids = torch.tensor([[1, 5, 9, 100, 7, 3, 2, 8, 9], [4, 4, 8, 9, 10, 11, 12, 0, 1]])
    assert rel(tri(ids), ref(ids)) < TOL
    # decode, and (pipeline) a stateful prefill continuing sequences at different positions
    steps = [("decode", torch.tensor([[3], [7]]), torch.tensor([4, 9]))]
    if pipeline:
        steps.append(("prefill", torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), torch.tensor([2, 7])))
    for mode, step_ids, pos in steps:
        inputs = state_inputs(tri.get_graph(mode, True), step_ids, pos)
        outs, expect = tri.execute(mode, True, inputs), ref.execute(mode, True, inputs)
        assert len(outs) == len(expect)
        for a, b in zip(outs, expect):
            assert a.shape == b.shape and rel(a, b) < TOL


def test_plan_fuses_elementwise_chains_into_groups():
    g = kimi_graph.load("tiny").get_graph()
    sched = plan(g)
    groups = [s for s in sched if isinstance(s, Group)]
    assert any(len(x.ops) >= 3 for x in groups)               # cast -> add(dt_bias) -> softplus
    ew = sum(1 for op in g.ops() if op.kind in ("add", "sub", "mul", "neg", "exp", "sigmoid", "silu",
                                                "softplus", "scale", "cast"))
    assert sum(len(x.ops) for x in groups) == ew              # every elementwise op runs in a group
    pos = {}                                                  # the schedule respects dependencies
    for i, item in enumerate(sched):
        for op in (item.ops if isinstance(item, Group) else [item]):
            pos.update({v: i for v in op.outputs})
    for i, item in enumerate(sched):
        for op in (item.ops if isinstance(item, Group) else [item]):
            assert all(pos.get(v, -1) <= i for v in op.inputs)


def test_triton_backend_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = kimi_graph.load("tiny", backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError), match="TRITON_INTERPRET"):
            m(torch.tensor([[1, 2]]))


def test_kernels_register_as_torch_custom_op_impls():
    custom = pytest.importorskip("kimi_graph.lowering.torch.custom_ops")
    from kimi_graph.lowering.triton.backend import KERNELS, register_custom_ops
    kinds = register_custom_ops("cpu")
    try:
        assert "kda_fused_chunk" in kinds and "grouped_swiglu" in kinds
        assert all(custom.get_impl(k, "cpu") is KERNELS[k][0] for k in kinds)
    finally:
        for k in kinds:
            custom.set_impl(k, "cpu", None)


def test_activations_are_dropped_after_their_last_reader():
    """`run` frees each value after its last reader: the values alive between schedule items do
    not grow with depth (a 27-layer prefill otherwise holds every layer's activations)."""
    from kimi_graph.lowering.triton.backend import dead_after, legalize, reads

    def peak_live(layers):
        d = copy.deepcopy(kimi_graph.presets.PRESETS["tiny"])
        d["num_hidden_layers"] = layers
        d["linear_attn_config"].update(full_attn_layers=list(range(2, layers + 1, 2)),
                                       kda_layers=list(range(1, layers + 1, 2)))
        m = kimi_graph.load(kimi_graph.KimiLinearConfig.from_dict(d), pipeline="default")
        g = legalize(m.get_graph())
        sched = plan(g)
        drops = dead_after(g, sched)
        live, peak, dropped = set(g.inputs), 0, set()
        for item, gone in zip(sched, drops):
            assert not dropped & set(reads(item))              # nothing reads a dropped value
            live |= set(item.outputs)
            peak = max(peak, len(live))
            live -= set(gone)
            dropped |= set(gone)
        return peak

    assert peak_live(4) == peak_live(8)
