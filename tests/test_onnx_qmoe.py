"""Low-bit experts in ONNX: `--ops ort` maps int4 / int8 experts to ONNX Runtime's
com.microsoft QMoE fed by our router; the portable and standard sets dequantize
(DequantizeLinear, blocked along K) and run the float MoE. Each export runs in stock
onnxruntime (CPU) against our interpreter with the same quantized weights.

ONNX Runtime 1.32's CPU QMoE has no fp32 kernel for block-wise 8-bit experts: it quantizes
the activations to int8 (its schema: "Block-wise 8-bit experts have no fp32 kernel and use
int8 activations at every level"), so int8 with groups shorter than a row is within 3e-2
there, not 1e-3; per-row int8 and int4 (per-row or blocked) run in fp32."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import kimi_graph  # noqa: E402
from kimi_graph.config import KimiLinearConfig  # noqa: E402
from kimi_graph.lowering.onnx.package import export_model  # noqa: E402
from kimi_graph.presets import PRESETS  # noqa: E402
from reference_kimi import rel_err  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 3, 7, 2], [8, 8, 1, 4, 60, 2]])


def blocked_config() -> KimiLinearConfig:
    """tiny with hidden 256 and expert width 128: both projections in groups of 128."""
    cfg = json.loads(json.dumps(PRESETS["tiny"]))
    cfg.update(hidden_size=256, moe_intermediate_size=128)
    return KimiLinearConfig.from_dict(cfg)


def export_and_run(tmp_path, model, ops, genai=False):
    export_model(model, tmp_path, ops=ops, genai=genai)
    got = kimi_graph.load(tmp_path, backend="onnxruntime")(IDS)
    nodes = [n for n in onnx.load(str(tmp_path / "prefill.onnx"), load_external_data=False).graph.node]
    return rel_err(got, model(IDS)), nodes


@pytest.mark.parametrize("fmt,blocked,tol", [("int4", False, 1e-3), ("int8", False, 1e-3),
                                             ("int4", True, 1e-3), ("int8", True, 3e-2)])
def test_ort_export_runs_qmoe(tmp_path, fmt, blocked, tol):
    model = kimi_graph.load(blocked_config() if blocked else "tiny", experts=fmt)
    err, nodes = export_and_run(tmp_path, model, "ort")
    qmoe = [n for n in nodes if n.op_type == "QMoE"]
    assert len(qmoe) == 3 and not any(n.op_type == "MoE" for n in nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe[0].attribute}
    assert attrs["expert_weight_bits"] == (4 if fmt == "int4" else 8)
    assert attrs.get("block_size") == (128 if blocked else None)
    assert err <= tol, err


def test_portable_export_dequantizes_blocked(tmp_path):
    model = kimi_graph.load(blocked_config(), experts="int4")
    export_model(model, tmp_path, ops="portable", genai=False)
    proto = onnx.load(str(tmp_path / "prefill.onnx"), load_external_data=False)
    body = [n for f in proto.functions for n in f.node if n.op_type == "DequantizeLinear"]
    assert body and all(onnx.helper.get_attribute_value(a) == 128 for n in body for a in n.attribute
                        if a.name == "block_size")
    assert rel_err(kimi_graph.load(tmp_path, backend="onnxruntime")(IDS), model(IDS)) <= 1e-4


def test_genai_config_of_an_int4_export_loads(tmp_path):
    model = kimi_graph.load("tiny", experts="int4")
    err, _ = export_and_run(tmp_path, model, "ort", genai=True)
    assert err <= 1e-3
    cfg = json.loads((tmp_path / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["filename"]
    og = pytest.importorskip("onnxruntime_genai")
    og.Model(str(tmp_path))
