"""The command line as a new user meets it: each mistake gives one line `kimi-graph CMD: error:
...` and exit code 2 (no traceback); exports refuse to mix with earlier output; sizes in human
units; --version, `python -m kimi_graph`, defaults in --help."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import kimi_graph
from kimi_graph.cli import main


def mistake(capsys, argv: list[str], phrase: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kimi-graph {argv[0]}: error: ") and "Traceback" not in err, err
    assert phrase in err, err
    return err


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "export"
    assert main(["export-onnx", "tiny", "--out", str(out), "--no-genai", "--no-check"]) == 0
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys):
    mistake(capsys, ["generate", "tiny", "--ids", "1,2", "--device", "cuda"], "CUDA is not available")


@pytest.mark.parametrize("device", ["gpu", "tpu"])
def test_unknown_device(capsys, device):
    mistake(capsys, ["generate", "tiny", "--ids", "1,2", "--device", device],
            f"device '{device}' is not supported")


def test_out_is_a_file_or_a_directory(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    mistake(capsys, ["export-onnx", "tiny", "--out", str(f)], "is a file; give a directory")
    mistake(capsys, ["export-mlir", "tiny", "--out", str(tmp_path)], "is a directory; give a file path")
    mistake(capsys, ["export-mlir", "tiny", "--out", str(f)], "exists; --force replaces it")
    mistake(capsys, ["compile", "tiny", "--out", str(f)], "is a file; give a directory")


def test_export_refuses_a_non_empty_directory_and_force_clears_only_its_files(capsys, export_dir, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    for f in export_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "stale.onnx").write_text("")               # an earlier export's leftover, not in the manifest
    (out / "notes.txt").write_text("mine")
    mistake(capsys, ["export-onnx", "tiny", "--out", str(out)], "is not empty")
    assert main(["export-onnx", "tiny", "--out", str(out), "--no-genai", "--no-check", "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    man = json.loads((out / "kimi_graph_onnx.json").read_text())
    assert set(man["models"].values()) == {"prefill.onnx", "prefill_last.onnx", "decode.onnx"}


def test_generate_notices_an_onnx_export(capsys, export_dir):
    assert main(["generate", str(export_dir), "--ids", "1,5,9", "--max-new-tokens", "3", "--print-ids"]) == 0
    capsys.readouterr()
    mistake(capsys, ["generate", str(export_dir), "--ids", "1,5", "--backend", "interpreter"],
            "is an ONNX export (kimi-graph export-onnx): load it with backend='onnxruntime'")


@pytest.mark.parametrize("argv,phrase", [
    (["generate", "tiny", "--ids", "1,x"], "--ids must be comma-separated integers"),
    (["generate", "tiny", "--ids", "1,2", "--backend", "tpu"], "unknown backend 'tpu'"),
    (["generate", "no-such-model", "--ids", "1"], "is neither a preset"),
    (["generate", "tiny", "--ids", "1", "--temperature", "inf"], "temperature must be a finite number"),
    (["generate", "tiny", "--ids", "1", "--stop-ids", "999999"], "outside the vocabulary"),
    (["inspect", "tiny", "--layer", "1"], "--layer selects what --svg draws"),
    (["export-mlir", "tiny", "--out", "x.mlir", "--batch", "0"], "--batch must be at least 1"),
])
def test_other_mistakes(capsys, argv, phrase):
    mistake(capsys, argv, phrase)


def test_human_units_and_defaults_in_help(capsys):
    assert main(["inspect", "tiny", "--no-ir"]) == 0
    out = capsys.readouterr().out
    assert "total params            335 K" in out and "KDA state / sequence    10.2 KiB" in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: auto)" in capsys.readouterr().out


def test_compile_count_line(capsys, monkeypatch, tmp_path):
    import kimi_graph.lowering.triton.aot as aot
    kernels = [{"kernel": k, "target": t} for t in ("sm_80", "sm_90") for k in ("a", "a", "b")]
    monkeypatch.setattr(aot, "compile_model", lambda *a, **k: {"kernels": kernels, "triton_version": "x"})
    assert main(["compile", "tiny", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "6 kernel binaries in" in out and "(3 for sm_80, 3 for sm_90; 2 distinct kernels)" in out


def test_version_module_entry_and_broken_pipe():
    run = subprocess.run([sys.executable, "-m", "kimi_graph", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"kimi-graph {kimi_graph.__version__}"
    # `kimi-graph inspect ... | head -1`: the reader closes the pipe early
    p = subprocess.Popen([sys.executable, "-m", "kimi_graph", "inspect", "tiny"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
