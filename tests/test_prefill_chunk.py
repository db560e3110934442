"""The engine's prefill chunk: activation bytes of a graph (kimi_graph.liveness: values freed
after their last reader, views holding their source) and the chunk sized from free memory."""
from __future__ import annotations

import pytest

import kimi_graph
from kimi_graph.api import resolve_config
from kimi_graph.builder import GraphBuilder
from kimi_graph.liveness import peak_activation_bytes
from kimi_graph.model import build_graph
from kimi_graph.passes import run_pipeline
from kimi_graph.runtime import Engine, GenerationError
from kimi_graph.runtime import engine as engine_mod
from kimi_graph.weight_transforms import WeightTransforms


def test_values_are_freed_after_their_last_reader_and_views_hold_their_source():
    b = GraphBuilder("prefill")
    x = b.input("x", ("T", 8), "f32")                     # an input: not counted
    a = b("silu", x, name="a")                             # 32 T bytes
    v = b("reshape", a, shape=["T", 2, 4], name="v")       # a view of a: a lives on through v
    c = b("exp", x, name="c")                              # a, c alive: 64 T
    d = b("add", b("reshape", v, shape=["T", 8], name="v2"), c, name="d")   # a, c, d: 96 T
    e = b("sigmoid", d, name="e")                          # a, c freed at d; d, e: 64 T
    b.output(e)
    g = b.graph
    assert peak_activation_bytes(g, {"T": 1}) == 96 and peak_activation_bytes(g, {"T": 10}) == 960


def test_the_published_prefill_per_token_bytes():
    """The stateful prefill with last-position logits, published config, bf16: tens of KB per
    token at 16k tokens, and the MLA rows rebuilt per cached row on top."""
    cfg = resolve_config("kimi-linear-48b-a3b")[0]
    g = build_graph(cfg, "prefill", stateful=True, dtype="bf16", logits="last")
    g = run_pipeline(g, "default", transforms=WeightTransforms())
    per_token = peak_activation_bytes(g, {"B": 1, "T": 16384, "S": 16384}) / 16384
    assert 40e3 < per_token < 200e3
    long = peak_activation_bytes(g, {"B": 1, "T": 4096, "S": 131072})
    assert long > 2 * peak_activation_bytes(g, {"B": 1, "T": 4096, "S": 4096})


def test_auto_chunk_fits_the_free_memory():
    g = kimi_graph.load("tiny", pipeline="default").get_graph("prefill", True, "last")
    assert engine_mod.auto_prefill_chunk(g, 64, 1 << 40) == engine_mod.MAX_PREFILL_CHUNK
    need = lambda chunk: engine_mod.KERNEL_SCRATCH * peak_activation_bytes(g, {"B": 1, "T": chunk, "S": chunk})
    free = int(need(2048) / engine_mod.ACTIVATION_SHARE) + 1
    assert engine_mod.auto_prefill_chunk(g, 64, free) == 2048
    assert engine_mod.auto_prefill_chunk(g, 64, 1) == engine_mod.MIN_PREFILL_CHUNK
    # long cached contexts take their share: a smaller chunk for the same free memory
    assert engine_mod.auto_prefill_chunk(g, 1 << 20, free) < 2048
    # unless the backend rebuilds their keys and values a block of rows at a time
    assert engine_mod.auto_prefill_chunk(g, 1 << 20, free, key_rows=2048) == 2048


def test_the_engine_default_and_bad_values():
    m = kimi_graph.load("tiny")
    assert Engine(m, 1, 16).prefill_chunk == engine_mod.PREFILL_CHUNK         # off CUDA
    for bad in ("big", 0, 2.5, True):
        with pytest.raises(GenerationError, match="prefill_chunk must be a positive integer or 'auto'"):
            Engine(m, 1, 16, prefill_chunk=bad)
