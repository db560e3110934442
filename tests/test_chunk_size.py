"""chunk-kda{chunk-size=N} reaches every backend: Triton launches chunks of N tokens where the
target follows the op (and refuses a size its kernels cannot run), the portable ONNX function runs chunks of N, the standard
LinearAttention gets N as its hint; each still computes the op's reference."""
from __future__ import annotations

import pytest
import torch

from kimi_graph.ops import get_op
from reference_kimi import rel_err


def kda_args(T: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, H, K = 2, 2, 16
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return [r(B, T, H, K), r(B, T, H, K), r(B, T, H, K), r(B, T, H * K), r(B, T, H),
            r(1, 1, H, 1).abs().log1p(), r(H * K), r(B, H, K, K)]


@pytest.mark.parametrize("chunk", [16, 32])
def test_triton_runs_the_ops_chunk_size(chunk, triton_interpret, monkeypatch):
    pytest.importorskip("triton")
    from kimi_graph.lowering.triton import kda
    seen = []
    specs = kda.chunk_specs

    def spy(*a, **kw):
        out = specs(*a, **kw)
        seen.append(out[0].config["BT"])
        return out
    monkeypatch.setattr(kda, "chunk_specs", spy)
    args, attrs = kda_args(37), {"scale": 0.25, "chunk_size": chunk}
    ref = get_op("kda_fused_chunk").ref(args, get_op("kda_fused_chunk").full_attrs(attrs))
    out = kda.op_kda_fused(args, get_op("kda_fused_chunk").full_attrs(attrs))
    assert seen == [chunk]
    assert all(rel_err(o, r) < 1e-5 for o, r in zip(out, ref))


def test_triton_target_may_run_its_own_chunk(triton_interpret, monkeypatch):
    """A target with op_chunk False (sm_90: its tiles are tuned for BT=32) runs its own BT
    whatever the op's chunk size; the results are the op's."""
    pytest.importorskip("triton")
    from kimi_graph.lowering.triton import kda
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "kda_chunk",
                        {**TARGETS["interpret"]["configs"]["kda_chunk"], "op_chunk": False, "BT": 16})
    kda.chunk_specs.cache_clear()
    try:
        args, attrs = kda_args(37), get_op("kda_fused_chunk").full_attrs({"scale": 0.25, "chunk_size": 64})
        assert kda.chunk_specs(2, 16, 16, "f32", True, 0.25, 1e-6, True, "interpret", 64)[0].config["BT"] == 16
        out = kda.op_kda_fused(args, attrs)
    finally:
        kda.chunk_specs.cache_clear()
    ref = get_op("kda_fused_chunk").ref(args, attrs)
    assert all(rel_err(o, r) < 1e-5 for o, r in zip(out, ref))


def test_triton_refuses_a_chunk_size_it_cannot_run():
    pytest.importorskip("triton")
    from kimi_graph.builder import GraphBuilder
    from kimi_graph.lowering.triton.backend import plan
    b = GraphBuilder()
    ins = [b.input(n, s, "f32") for n, s in (("q", ("B", "T", 2, 4)), ("k", ("B", "T", 2, 4)),
                                             ("v", ("B", "T", 2, 4)), ("f", ("B", "T", 8)), ("b", ("B", "T", 2)))]
    b.output(*b.emit("kda_fused_chunk", *ins, b.param("A_log", (1, 1, 2, 1), "f32"), b.param("dt", (8,), "f32"),
                     scale=0.5, chunk_size=24))
    with pytest.raises(ValueError, match="run chunks of 16, 32, 64, 128 tokens, not 24"):
        plan(b.graph)


def test_portable_onnx_runs_the_ops_chunk_size():
    pytest.importorskip("onnx")
    import kimi_graph
    from kimi_graph.lowering.onnx import lower
    from onnx import numpy_helper
    m = kimi_graph.load("tiny", pipeline="canonicalize,fuse-kda-gating,chunk-kda{chunk-size=8}")
    proto = lower(m.get_graph("prefill", True), m.weights, ops="portable")
    kda = next(f for f in proto.functions if f.name == "kda_chunkwise")
    mins = [n for n in kda.node if n.op_type == "Min"]
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t).tolist() for n in kda.node
              if n.op_type == "Constant" and n.attribute[0].name == "value"}
    assert len(mins) == 1 and consts[mins[0].input[1]] == [8]
    assert not any(f.name.startswith("kda_chunkwise_") for f in proto.functions)
    std = lower(m.get_graph("prefill", True), m.weights, ops="standard")
    las = [n for n in std.graph.node if n.op_type == "LinearAttention"]
    assert las and all({a.name: a.i for a in n.attribute}["chunk_size"] == 8 for n in las)
