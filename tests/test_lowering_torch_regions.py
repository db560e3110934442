"""Regions for regional compilation (lowering/torch/regions.py), without compiling: an 8-layer
model with the published layer pattern (KDA, KDA, KDA, MLA, ...; layer 0 dense) cuts into an
attention and an FFN region per layer plus embedding and head, and after the default pipeline
only six are distinct (embedding, KDA attention, MLA attention, dense FFN, MoE FFN, head)
whatever the depth: a layer's attention is the same region whatever its FFN, and the last
layer's FFN the same as the others. Run region by region, the graph computes exactly what the
whole lowered module does. Compiled runs: test_torch_compile_generation.py."""
from __future__ import annotations

import copy

import pytest
import torch

from kimi_graph.config import KimiLinearConfig
from kimi_graph.lowering.mlir.export import example_inputs
from kimi_graph.lowering.torch import lower
from kimi_graph.lowering.torch.regions import RegionalModule, split_regions
from kimi_graph.model import build_graph
from kimi_graph.passes import run_pipeline
from kimi_graph.presets import TINY
from kimi_graph.weights import random_weights

GRAPHS = [("prefill", False), ("prefill", True), ("decode", True)]


def deep_config(layers: int = 8) -> KimiLinearConfig:
    d = copy.deepcopy(TINY)
    d["num_hidden_layers"] = layers
    full = [i for i in range(4, layers + 1, 4)]
    d["linear_attn_config"].update(full_attn_layers=full,
                                   kda_layers=[i for i in range(1, layers + 1) if i not in full])
    return KimiLinearConfig.from_dict(d)


@pytest.mark.parametrize("pipeline", [None, "default"])
@pytest.mark.parametrize("mode,stateful", GRAPHS)
def test_two_regions_per_layer_six_distinct(mode, stateful, pipeline):
    cfg = deep_config()
    g = build_graph(cfg, mode, stateful=stateful)
    w = random_weights(g, seed=0)
    if pipeline:
        g = run_pipeline(g, pipeline, weights=w)
    regions = split_regions(g)
    layers = [f"l{i}_{part}" for i in range(8) for part in ("attn", "ffn")]
    assert [r.name for r in regions] == ["embed", *layers, "head"]
    keys = {}
    for i, kind in enumerate(cfg.layer_kinds):
        attn, ffn = regions[1 + 2 * i], regions[2 + 2 * i]
        keys.setdefault(kind, set()).add(attn.key)
        last = pipeline is None and i == 7     # declared graph: the residual after it is unread
        keys.setdefault("dense" if i == 0 else "last" if last else "moe", set()).add(ffn.key)
    assert all(len(k) == 1 for k in keys.values()), "parts of one kind differ"
    distinct = 6 if pipeline else 7
    assert len({r.key for r in regions}) == distinct
    # every weight lands in exactly one region
    assert sorted(p for r in regions for p in r.params.values()) == sorted(n[1:] for n in g.params)

    inputs = example_inputs(g, batch=2, seq=5, cache_len=8)
    args = [inputs[n] for n in g.inputs]
    regional = RegionalModule(g, w, compile_fn=None)
    assert regional.kinds == distinct
    with torch.no_grad():
        for a, b in zip(regional(*args), lower(g, w)(*args)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode,stateful", [("prefill", True), ("decode", True)])
def test_one_region_per_layer(mode, stateful):
    """per="layer": a region per decoder layer (its attention and FFN, then the next layer's
    norm), four distinct after the pipeline (first dense layer, KDA + MoE, MLA + MoE) besides
    embedding and head; the same values as the whole module."""
    cfg = deep_config()
    g = build_graph(cfg, mode, stateful=stateful)
    w = random_weights(g, seed=0)
    g = run_pipeline(g, "default", weights=w)
    regions = split_regions(g, per="layer")
    assert [r.name for r in regions] == ["embed", *(f"l{i}" for i in range(8)), "head"]
    assert sorted(p for r in regions for p in r.params.values()) == sorted(n[1:] for n in g.params)
    inputs = example_inputs(g, batch=2, seq=5, cache_len=8)
    args = [inputs[n] for n in g.inputs]
    regional = RegionalModule(g, w, compile_fn=None, per="layer")
    assert regional.kinds == len({r.key for r in regions}) == 5
    with torch.no_grad():
        for a, b in zip(regional(*args), lower(g, w)(*args)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="regions per"):
        split_regions(g, per="block")
