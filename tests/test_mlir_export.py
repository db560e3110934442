"""MLIR export: the decomposed lowering (custom ops replaced by their static reference forms)
that torch-mlir imports, checked without torch-mlir (no custom ops left, torch.export traces
it, same outputs as the interpreter: fp32 relative error per output <= 1e-5); then, where
torch-mlir is installed (the `mlir` extra), `kimi-graph export-mlir` for each dialect on a
two-layer checkpoint (KDA, then MLA with MoE), parsed back with torch-mlir's own parser."""
from __future__ import annotations

import sys

import pytest
import torch

from kimi_graph.cli import main
from kimi_graph.interpreter import run_graph
from kimi_graph.lowering.mlir.export import (DIALECTS, decomposed_kinds, example_inputs,
                                             require_torch_mlir)
from kimi_graph.lowering.torch import lower
from test_lowering_torch import GRAPHS, check_outputs, graph_and_weights


def custom_targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("kimi_graph.")]


@pytest.mark.parametrize("pipeline", [None, "default"])
@pytest.mark.parametrize("mode,stateful", GRAPHS)
def test_decomposed_module_has_no_custom_ops_and_matches(pipeline, mode, stateful):
    g, w = graph_and_weights(0, mode, stateful, pipeline=pipeline)
    assert custom_targets(lower(g, w)), "the ordinary lowering keeps custom ops"
    gm = lower(g, w, decompose=True)
    assert custom_targets(gm) == []
    inputs = example_inputs(g, batch=2, seq=5, cache_len=8)
    if "%cache_pos" in inputs:
        inputs["%cache_pos"] = torch.tensor([1, 3])
    check_outputs(gm(*[inputs[n] for n in g.inputs]), run_graph(g, inputs, w), "f32")


@pytest.mark.parametrize("pipeline", [None, "default"])
def test_decomposed_decode_exports_with_torch_export(pipeline):
    """What torch-mlir's importer consumes: an ExportedProgram of aten ops only."""
    g, w = graph_and_weights(1, "decode", True, pipeline=pipeline)
    inputs = example_inputs(g, batch=1, cache_len=6)
    ep = torch.export.export(lower(g, w, decompose=True), tuple(inputs[n] for n in g.inputs))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert targets and all(t.startswith("aten.") or t.startswith("<built-in") for t in targets), targets
    check_outputs(ep.module()(*[inputs[n] for n in g.inputs]), run_graph(g, inputs, w), "f32")


def test_missing_torch_mlir_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)
    monkeypatch.setitem(sys.modules, "torch_mlir.fx", None)
    with pytest.raises(ImportError, match=r"pip install 'kimi-graph\[mlir\]'"):
        require_torch_mlir()
    assert main(["export-mlir", "tiny", "--out", str(tmp_path / "x.mlir")]) == 2
    assert "needs torch-mlir" in capsys.readouterr().err
    assert not (tmp_path / "x.mlir").exists()


def test_export_mlir_refuses_bad_sizes(capsys, tmp_path):
    assert main(["export-mlir", "tiny", "--batch", "0", "--out", str(tmp_path / "x.mlir")]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("dialect", DIALECTS)
def test_export_mlir_command_writes_parseable_modules(dialect, tmp_path, kda_mla_checkpoint):
    pytest.importorskip("torch_mlir", reason="torch-mlir not installed (the `mlir` extra)")
    from kimi_graph.lowering.mlir.export import parse_mlir

    out = tmp_path / "tiny.mlir"
    assert main(["export-mlir", str(kda_mla_checkpoint), "--dialect", dialect, "--out", str(out), "--mode", "decode",
                 "--cache-len", "8"]) == 0
    text = out.read_text()
    assert text.startswith("// kimi-graph: graph 'decode' (decode), dialect " + dialect)
    assert "decomposed to their reference form" in text and "moe_expert" in text.splitlines()[2]
    module = parse_mlir(text)
    body = str(module.operation)
    assert "func.func @decode" in body
    marker = {"torch": "torch.aten.", "linalg-on-tensors": "linalg.", "stablehlo": "stablehlo."}[dialect]
    assert marker in body
    assert "kimi_graph" not in body.split("{-#")[0]        # no custom op survived


def test_export_mlir_of_the_optimized_prefill(tmp_path, kda_mla_checkpoint):
    pytest.importorskip("torch_mlir", reason="torch-mlir not installed (the `mlir` extra)")
    from kimi_graph.lowering.mlir.export import parse_mlir

    out = tmp_path / "opt.mlir"
    assert main(["export-mlir", str(kda_mla_checkpoint), "--pipeline", "default", "--out", str(out),
                 "--batch", "2", "--seq", "4"]) == 0
    text = out.read_text()
    for kind in ("kda_fused_chunk", "moe_route", "grouped_swiglu", "add_rmsnorm"):
        assert kind in text.splitlines()[2]
    assert "-> !torch.vtensor<[2,4,61],f32>" in str(parse_mlir(text).operation)   # logits [B,T,V]


def test_decomposed_kinds_lists_the_custom_ops_in_the_graph():
    g, _ = graph_and_weights(0, "decode", True, pipeline="default")
    kinds = decomposed_kinds(g)
    assert "kda_fused_recurrent" in kinds and "linear" not in kinds
