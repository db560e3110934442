"""The torch backend under torch.compile (Inductor, CPU in CI): prefill and decode match the
interpreter (fp32, relative Frobenius error per output <= 1e-5), before and after the default
pipeline; the compiled decode step is one graph with no breaks (torch._dynamo.explain); the
custom ops' fake implementations carry symbolic sizes (dynamic=True). On a GPU (the device
tool, not CI) the decode step also runs under mode="reduce-overhead" (CUDA graphs)."""
from __future__ import annotations

import os

import pytest
import torch

from kimi_graph.api import load
from kimi_graph.interpreter import run_graph
from kimi_graph.lowering.mlir.export import example_inputs
from kimi_graph.lowering.torch import lower
from checkpoints import random_config
from kimi_graph.config import KimiLinearConfig
from kimi_graph.model import build_graph
from kimi_graph.passes import run_pipeline
from kimi_graph.weights import random_weights
from test_lowering_torch import check_outputs, generate_states


def config(seed: int) -> KimiLinearConfig:
    """Random and small, to keep Inductor's work short: a KDA layer with the dense FFN, then an
    MLA layer with a grouped MoE of 4 experts."""
    return KimiLinearConfig.from_dict(random_config(
        seed, num_hidden_layers=2, first_k_dense_replace=1, num_experts=4, num_expert_group=2,
        topk_group=1, num_experts_per_token=2,
        linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "num_heads": 2,
                            "head_dim": 4, "short_conv_kernel_size": 3}))


def graph_and_weights(seed, mode, stateful, pipeline=None):
    g = build_graph(config(seed), mode, stateful=stateful)
    w = random_weights(g, seed=seed)
    return (run_pipeline(g, pipeline, weights=w) if pipeline else g), w


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True, scope="module")
def serial_inductor():
    """Tiny graphs on a 2-core CI box: compiling in-process beats starting a worker pool."""
    from torch._inductor import config as inductor_config
    with inductor_config.patch(compile_threads=1):
        yield


@pytest.mark.parametrize("pipeline", [None, "default"])
def test_compiled_decode_step_is_one_graph(pipeline):
    g, w = graph_and_weights(0, "decode", True, pipeline=pipeline)
    inputs = example_inputs(g, batch=2, cache_len=8)
    explain = torch._dynamo.explain(lower(g, w))(*[inputs[n] for n in g.inputs])
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


@pytest.mark.parametrize("pipeline", [None, "default"])
def test_compiled_prefill_and_decode_match_the_interpreter(pipeline):
    cfg = config(4)
    ref = load(cfg, pipeline=pipeline, seed=4)
    compiled = load(cfg, pipeline=pipeline, seed=4, backend="torch", compile=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    for a, b in zip(generate_states(compiled, ids, 3), generate_states(ref, ids, 3)):
        check_outputs(a, b, "f32")
    assert len(compiled.executor._fns) == 2       # one compiled module per graph


def test_executor_through_the_kimi_graph_compile_backend():
    """compile_backend="kimi_graph": dynamo's graph of the declared model goes back to the
    layer graph, through the default pipeline, then Inductor (5e-5: the passes reassociate)."""
    cfg = config(6)
    model = load(cfg, seed=6, backend="torch", compile=True, compile_backend="kimi_graph")
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    ref = load(cfg, seed=6)(ids)
    out = model(ids)
    assert float((out - ref).norm() / ref.norm()) <= 5e-5


def test_dynamic_shapes_through_the_fake_implementations():
    g, w = graph_and_weights(1, "prefill", False, pipeline="default")
    fn = torch.compile(lower(g, w), dynamic=True, fullgraph=True)
    for B, T in [(2, 5), (3, 7)]:
        ids = torch.randint(0, config(1).vocab_size, (B, T))
        check_outputs(fn(ids), run_graph(g, {"input_ids": ids}, w), "f32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device tool)")
@pytest.mark.parametrize("pipeline", [None, "default"])
def test_decode_under_cuda_graphs(pipeline):
    cfg = config(5)
    ref = load(cfg, pipeline=pipeline, seed=5, device="cuda")
    graphs = load(cfg, pipeline=pipeline, seed=5, device="cuda", backend="torch", compile=True,
                  mode="reduce-overhead")
    ids = torch.randint(0, cfg.vocab_size, (2, 5), device="cuda")
    for a, b in zip(generate_states(graphs, ids, 4), generate_states(ref, ids, 4)):
        check_outputs(a, b, "f32")


def test_custom_op_kernels_share_inductors_triton_cache(monkeypatch, tmp_path):
    """A compiled CUDA executor points Triton at Inductor's cache under TORCHINDUCTOR_CACHE_DIR
    before any kernel launches, so a warm process finds the custom ops' kernels that the cold
    one compiled; a TRITON_CACHE_DIR the user set stays."""
    from kimi_graph.lowering.torch.backend import pin_triton_cache
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    pin_triton_cache(torch.device("cuda", 1))
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "triton" / "1")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    pin_triton_cache(torch.device("cuda", 0))
    assert os.environ["TRITON_CACHE_DIR"] == "/elsewhere"
