"""Regions for regional compilation (lowering/torch/regions.py), without compiling: an 8-layer
model with the published layer pattern (KDA, KDA, KDA, MLA, ...; layer 0 dense) cuts into
one region per layer plus embedding and head, and only five are distinct (embedding, dense
KDA, KDA + MoE, MLA + MoE, head) whatever the depth; run region by region, the graph
computes exactly what the whole lowered module does. Compiled runs: test_torch_compile_generation.py."""
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
def test_one_region_per_layer_five_distinct(mode, stateful, pipeline):
    cfg = deep_config()
    g = build_graph(cfg, mode, stateful=stateful)
    w = random_weights(g, seed=0)
    if pipeline:
        g = run_pipeline(g, pipeline, weights=w)
    regions = split_regions(g)
    assert [r.name for r in regions] == ["embed", *(f"l{i}" for i in range(8)), "head"]
    keys = {}
    for r, kind in zip(regions[1:-1], cfg.layer_kinds):
        keys.setdefault((kind, r.name == "l0"), set()).add(r.key)
    assert all(len(k) == 1 for k in keys.values()), "layers of one kind differ"
    assert len({r.key for r in regions}) == 5
    # every weight lands in exactly one region
    assert sorted(p for r in regions for p in r.params.values()) == sorted(n[1:] for n in g.params)

    inputs = example_inputs(g, batch=2, seq=5, cache_len=8)
    args = [inputs[n] for n in g.inputs]
    regional = RegionalModule(g, w, compile_fn=None)
    assert regional.kinds == 5
    with torch.no_grad():
        for a, b in zip(regional(*args), lower(g, w)(*args)):
            assert torch.equal(a, b)
