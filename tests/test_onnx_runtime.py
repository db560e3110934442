"""The ONNX Runtime engine: greedy generation through `backend="onnxruntime"` (lowered on
the fly, or from an export-onnx directory) gives the tokens of the torch runtime, batches of
prompts of different lengths included; the export command writes a complete directory."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import kimi_graph  # noqa: E402
from kimi_graph.api import BACKENDS  # noqa: E402
from kimi_graph.cli import main  # noqa: E402

PROMPTS = [[1, 5, 9, 14, 3], [7, 8], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]]


@pytest.fixture(scope="module")
def reference_tokens():
    backend = "torch" if "torch" in BACKENDS else "interpreter"
    return kimi_graph.load("tiny", backend=backend).generate(PROMPTS, max_new_tokens=6)


@pytest.mark.parametrize("ops", ["ort", "portable"])
def test_greedy_generation_matches_torch_runtime(ops, reference_tokens):
    m = kimi_graph.load("tiny", backend="onnxruntime", ops=ops, threads=2)
    assert m.generate(PROMPTS, max_new_tokens=6) == reference_tokens
    assert list(m.stream(PROMPTS[0], max_new_tokens=6)) == reference_tokens[0]


def test_generation_from_an_export_directory(tmp_path, reference_tokens):
    out = tmp_path / "tiny_onnx"
    assert main(["export-onnx", "tiny", "--out", str(out)]) == 0
    man = json.loads((out / "kimi_graph_onnx.json").read_text())
    assert man["models"] == {"prefill": "prefill.onnx", "prefill_last": "prefill_last.onnx",
                             "decode": "decode.onnx", "genai": "genai.onnx"}
    assert man["external_weights"] is None and man["ir_version"] == 11
    for f in ("config.json", "genai_config.json", "prefill.onnx", "prefill_last.onnx", "decode.onnx",
              "genai.onnx"):
        assert (out / f).is_file()
    m = kimi_graph.load(out, backend="onnxruntime")
    assert m.weights == {}                      # everything runs from the exported models
    assert m.generate(PROMPTS, max_new_tokens=6) == reference_tokens
    ref = kimi_graph.load("tiny")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    got, want = m(ids), ref(ids)                 # stateless call on the stateful export
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
    # generation's prefill ran the last-position model; an export without one cuts the full logits
    assert ("prefill", True, "last") in m.executor._sessions and not m.executor._cut_last
    man["models"].pop("prefill_last")
    (out / "kimi_graph_onnx.json").write_text(json.dumps(man))
    old = kimi_graph.load(out, backend="onnxruntime")
    assert old.generate(PROMPTS, max_new_tokens=6) == reference_tokens
    assert old.executor._cut_last == {("prefill", True, "last")}


def test_external_weights_are_shared_by_the_models(tmp_path, monkeypatch):
    """Past the 2 GB threshold (lowered here to test it) the models reference one weights.bin."""
    from kimi_graph.lowering.onnx import package
    monkeypatch.setattr(package, "TWO_GB", 1)
    out = tmp_path / "ext"
    man = package.export_model(kimi_graph.load("tiny"), out, ops="ort")
    assert man["external_weights"] == "weights.bin"
    size = (out / "weights.bin").stat().st_size
    total = sum(w.numel() * w.element_size() for w in kimi_graph.load("tiny").weights.values())
    assert size < 1.3 * total                     # written once (plus page alignment and derived layouts)
    m = kimi_graph.load(out, backend="onnxruntime")
    ref = kimi_graph.load("tiny")
    assert m.generate([[1, 2, 3]], max_new_tokens=4) == ref.generate([[1, 2, 3]], max_new_tokens=4)


def test_fp16_export_runs(tmp_path):
    out = tmp_path / "f16"
    assert main(["export-onnx", "tiny", "--out", str(out), "--dtype", "fp16", "--no-genai"]) == 0
    m = kimi_graph.load(out, backend="onnxruntime")         # dtype from the export's manifest
    assert m.dtype == torch.float16
    ref = kimi_graph.load("tiny")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    got, want = m(ids).float(), ref(ids)
    assert float((got - want).abs().max() / want.abs().max()) <= 3e-2    # fp16 weights and activations


def test_export_errors(tmp_path, capsys):
    assert main(["export-onnx", "tiny", "--out", str(tmp_path), "--opset", "17"]) == 2
    assert "too old" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a complete kimi-graph export"):
        from kimi_graph.runtime.ort_engine import OrtExecutor
        m = kimi_graph.load("tiny")
        m.options["onnx_dir"] = str(tmp_path)
        OrtExecutor(m)


@pytest.mark.parametrize("opset", [24, 25])
def test_newer_opsets(tmp_path, opset, reference_tokens):
    out = tmp_path / f"op{opset}"
    assert main(["export-onnx", "tiny", "--out", str(out), "--opset", str(opset), "--no-genai"]) == 0
    assert json.loads((out / "kimi_graph_onnx.json").read_text())["opset"] == opset
    m = kimi_graph.load(out, backend="onnxruntime")
    assert m.generate(PROMPTS[:1], max_new_tokens=6) == reference_tokens[:1]
