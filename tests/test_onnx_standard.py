"""The `standard` operator set (`export-onnx --ops standard`): default-domain ops only at
opset 27 (LinearAttention, CausalConvWithState, Attention, RMSNormalization; the MoE from
TopK / Gather / MatMul ...), no functions. Its numbers (ONNX Runtime and onnx.reference against
the interpreter, prefill, decode and the two chained, within 1e-4; measured about 2e-6) are
checked with the other operator sets in test_onnx_lowering.py."""
from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
if "LinearAttention" not in {s.name for s in onnx.defs.get_all_schemas_with_history() if s.since_version >= 27}:
    pytest.skip("this onnx has no opset-27 LinearAttention (needs onnx >= 1.22)", allow_module_level=True)

from test_onnx_lowering import all_nodes, model_for  # noqa: E402

from kimi_graph.lowering.onnx import lower  # noqa: E402


@pytest.mark.parametrize("pipeline", [None, "default"], ids=["declared", "default_pipeline"])
def test_standard_is_default_domain_only(pipeline):
    m = model_for(None, pipeline)
    for mode in ("prefill", "decode"):
        proto = lower(m.get_graph(mode, True), m.weights, ops="standard")
        onnx.checker.check_model(proto, full_check=True)
        assert not proto.functions
        assert {o.domain: o.version for o in proto.opset_import} == {"": 27}
        assert {n.domain for n in all_nodes(proto.graph)} == {""}
        kinds = {n.op_type for n in all_nodes(proto.graph)}
        assert {"LinearAttention", "CausalConvWithState", "Attention", "RMSNormalization", "TopK"} <= kinds


def test_standard_refuses_an_older_opset():
    m = model_for(None)
    with pytest.raises(ValueError, match="opset 23 is too old for the standard operator set"):
        lower(m.build(), m.weights, ops="standard", opset=23)
