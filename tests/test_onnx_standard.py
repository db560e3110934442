"""The `standard` operator set (`export-onnx --ops standard`): default-domain ops only at
opset 27 (LinearAttention, CausalConvWithState, Attention, RMSNormalization; the MoE from
TopK / Gather / MatMul ...), no functions. Checked with onnx.checker's full check, run in
ONNX Runtime and onnx.reference against the interpreter, prefill and decode, as declared
and after the default pipeline; within 1e-4 (measured about 2e-6). Prefill then decode steps
carrying the states: test_onnx_lowering.test_prefill_then_decode_steps_carry_states."""
from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
if "LinearAttention" not in {s.name for s in onnx.defs.get_all_schemas_with_history() if s.since_version >= 27}:
    pytest.skip("this onnx has no opset-27 LinearAttention (needs onnx >= 1.22)", allow_module_level=True)

from onnx.reference import ReferenceEvaluator  # noqa: E402
from test_onnx_lowering import CASES, RTOL, all_nodes, inputs_for, model_for, rel_err, session  # noqa: E402

from kimi_graph.interpreter import run_graph  # noqa: E402
from kimi_graph.lowering.onnx import lower  # noqa: E402


def standard_model(g, weights):
    proto = lower(g, weights, ops="standard")
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    assert not proto.functions
    assert {o.domain: o.version for o in proto.opset_import} == {"": 27}
    assert {n.domain for n in all_nodes(proto.graph)} == {""}
    return proto


@pytest.mark.parametrize("seed", [None, 3], ids=["tiny", "random3"])
@pytest.mark.parametrize("pipeline", [None, "default"], ids=["declared", "default_pipeline"])
def test_standard_runs_in_onnxruntime_and_reference(pipeline, seed):
    m = model_for(seed, pipeline)
    for mode, stateful, T in CASES:
        g = m.get_graph(mode, stateful)
        S = T + 5 if stateful else T
        feeds = inputs_for(g, 2, T, S, seed=7, pos=[5, 2] if stateful else None)
        ref = run_graph(g, feeds, m.weights)
        proto = standard_model(g, m.weights)
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        for outs in (session(proto).run(None, np_feeds), ReferenceEvaluator(proto).run(None, np_feeds)):
            errs = [rel_err(o, r) for o, r in zip(outs, ref)]
            assert len(outs) == len(ref) and max(errs) <= RTOL, (mode, stateful, errs)


def test_standard_uses_the_standard_fused_ops():
    m = model_for(None, "default")
    for mode in ("prefill", "decode"):
        kinds = {n.op_type for n in all_nodes(standard_model(m.get_graph(mode, True), m.weights).graph)}
        assert {"LinearAttention", "CausalConvWithState", "Attention", "RMSNormalization", "TopK"} <= kinds


def test_standard_refuses_an_older_opset():
    m = model_for(None)
    with pytest.raises(ValueError, match="opset 23 is too old for the standard operator set"):
        lower(m.build(), m.weights, ops="standard", opset=23)
