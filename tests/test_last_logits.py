"""Prefill with the last position's logits only (build_graph(..., logits="last")): past the last
layer's attention only the last row runs (output projection, residual, FFN, head), so its logits
[B, 1, V] are the full graph's last row, on every backend; generation's prefill runs it, chunked
or not.

Tolerance: relative max error <= 1e-5 in fp32 (the lm_head GEMM over one row rounds apart
from the same row inside [B*T, D]), 1e-4 through ONNX Runtime.
"""
from __future__ import annotations

import pytest
import torch

import kimi_graph
from kimi_graph.api import graph_key
from kimi_graph.ir import IRError, TensorType
from kimi_graph.model import build_graph
from kimi_graph.ops import get_op
from kimi_graph.runtime import Engine, SamplingParams
from checkpoints import tiny_two_layers

IDS = torch.tensor([[1, 5, 9, 14, 3, 7], [2, 4, 6, 8, 10, 12]])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_the_last_layer_runs_the_last_row_past_its_attention():
    """The last layer's output projection reads take_last of the attention's rows, its residual
    take_last of the stream: its FFN and the head run on [B, 1, D]."""
    cfg = kimi_graph.load("tiny", device="meta").config
    n = len(cfg.layer_kinds) - 1
    for stateful in (False, True):
        g = build_graph(cfg, "prefill", stateful=stateful, logits="last")
        takes = [op for op in g.ops() if op.kind == "take_last"]
        assert sorted(op.outputs[0].split(".")[0] for op in takes) == [f"%l{n}"] * 2
        users = {u.kind for op in takes for u in g.users(op.outputs[0])}
        assert users == {"linear", "add"}
        head = g.defining_op(g.outputs[0])
        assert g.types[head.inputs[0]].shape == ("B", 1, cfg.hidden_size)
        assert g.types[g.outputs[0]].shape == ("B", 1, cfg.vocab_size) and g.meta["logits"] == "last"
        assert g.outputs[1:] == build_graph(cfg, "prefill", stateful=stateful).outputs[1:]
    assert "take_last" not in {op.kind for op in build_graph(cfg, "decode", logits="last").ops()}
    assert graph_key("decode", False, "last") == ("decode", True, "all")
    with pytest.raises(ValueError, match="logits must be one of"):
        build_graph(cfg, "prefill", logits="first")


def test_take_last_types_and_errors():
    op = get_op("take_last")
    assert op.infer([TensorType(("B", "T", 8), "f32")], {"dim": 1, "count": 2})[0].shape == ("B", 2, 8)
    with pytest.raises(IRError, match="cannot take the last 3"):
        op.infer([TensorType(("B", 2, 8), "f32")], {"dim": 1, "count": 3})
    x = torch.arange(12.).view(2, 3, 2)
    assert torch.equal(op.ref([x], {"dim": 1, "count": 2})[0], x[:, -2:])
    with pytest.raises(ValueError, match="fewer than 4"):
        op.ref([x], {"dim": 1, "count": 4})


@pytest.mark.parametrize("pipeline", [None, "default"])
@pytest.mark.parametrize("backend", ["interpreter", "torch", "triton", "onnxruntime"])
def test_every_backend_gives_the_last_row(backend, pipeline, request):
    if backend == "triton":
        pytest.importorskip("triton")
        request.getfixturevalue("triton_interpret")
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    tol = 1e-4 if backend == "onnxruntime" else 1e-5
    m = kimi_graph.load(tiny_two_layers(), seed=3, pipeline=pipeline, backend=backend)
    full = m.execute("prefill", False, {"input_ids": IDS})[0]
    last = m.execute("prefill", False, {"input_ids": IDS}, logits="last")[0]
    assert last.shape == (2, 1, m.config.vocab_size) and rel(last, full[:, -1:]) <= tol
    e = Engine(m, max_batch=2, max_len=16)          # stateful, continuing from the caches
    a, b = e.cache.allocate(2)
    first = e.prefill([a, b], IDS[:, :4].tolist(), last_only=True)
    rest = e.prefill([a, b], IDS[:, 4:].tolist(), last_only=True)
    for i in range(2):
        assert first[i].shape == (1, m.config.vocab_size)
        assert rel(first[i], full[i, 3:4]) <= tol and rel(rest[i], full[i, -1:]) <= tol


def test_generation_prefills_with_the_last_logits_only():
    m = kimi_graph.load("tiny", seed=3)
    calls = []
    execute = m.execute
    m.execute = lambda mode, stateful, inputs, logits="all": calls.append((mode, logits)) or \
        execute(mode, stateful, inputs, logits)
    e = Engine(m, max_batch=2, max_len=16, prefill_chunk=4)
    out = e.generate([IDS[0].tolist(), IDS[1].tolist()], SamplingParams(max_new_tokens=2))
    # each prompt alone (4 tokens per call), in chunks of 4 and 2 tokens
    assert [c for c in calls if c[0] == "prefill"] == [("prefill", "last")] * 4
    full = m(IDS)
    assert [t[0] for t in out] == full[:, -1].argmax(-1).tolist()
