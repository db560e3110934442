"""Weights: the graph declares exactly the HF checkpoint's tensors; safetensors round trips
(single file and sharded, with dtype conversion); seeded random weights."""
from __future__ import annotations

import json

import pytest
import torch

import kimi_graph
from checkpoints import hf_shapes, random_config, random_weights, write_checkpoint
from kimi_graph import KimiLinearConfig, build_graph
from kimi_graph.ops import TORCH_DTYPES
from kimi_graph.presets import PRESETS
from kimi_graph.weights import checkpoint_files, load_safetensors, save_safetensors
from kimi_graph.weights import random_weights as graph_random_weights


@pytest.mark.parametrize("cfg", [random_config(s) for s in range(8)] + list(PRESETS.values()),
                         ids=[f"random{s}" for s in range(8)] + list(PRESETS))
def test_graph_params_are_the_hf_tensors(cfg):
    g = build_graph(KimiLinearConfig.from_dict(cfg), dtype="bf16")
    declared = {n[1:]: tuple(t.shape) for n, t in g.params.items()}
    assert declared == hf_shapes(cfg)
    acc = {n for n, t in g.params.items() if t.dtype == "f32"}      # kept in fp32 in bf16 graphs
    assert acc == {n for n in g.params if n.endswith(("A_log", "dt_bias", "e_score_correction_bias"))}


@pytest.mark.parametrize("shard_bytes", [None, 1500])
def test_save_load_round_trip(tmp_path, shard_bytes):
    cfg = random_config(3)
    w = random_weights(cfg, 0, dtype=torch.bfloat16)
    write_checkpoint(tmp_path, cfg, weights=w, shard_bytes=shard_bytes)
    files = checkpoint_files(tmp_path)
    if shard_bytes:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(w) and len(files) > 1
        assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in w.values())
        assert sorted(f.name for f in files) == sorted(set(index["weight_map"].values()))
    else:
        assert [f.name for f in files] == ["model.safetensors"]
    for dtype in ("f32", "bf16"):
        g = build_graph(KimiLinearConfig.from_dict(cfg), dtype=dtype)
        got = load_safetensors(tmp_path, g, progress=True)
        assert set(got) == set(w)
        for n, t in got.items():
            assert t.dtype == TORCH_DTYPES[g.params["@" + n].dtype]
            assert torch.equal(t.to(torch.bfloat16), w[n]), n      # bf16 values survive exactly


def test_load_by_directory_or_config_path(tmp_path):
    cfg = random_config(5)
    w = write_checkpoint(tmp_path, cfg, seed=2)
    a, b = kimi_graph.load(tmp_path), kimi_graph.load(tmp_path / "config.json")
    assert a.path == b.path == tmp_path and a.config.to_dict() == b.config.to_dict()
    assert all(torch.equal(a.weights[n], w[n]) and torch.equal(b.weights[n], w[n]) for n in w)


def test_single_file_wins_over_stray_shards(tmp_path):
    cfg = random_config(4)
    write_checkpoint(tmp_path, cfg, seed=1)
    save_safetensors({"junk": torch.zeros(1)}, tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").rename(tmp_path / "stray.safetensors")
    assert [f.name for f in checkpoint_files(tmp_path)] == ["model.safetensors"]
    kimi_graph.load(tmp_path)       # the stray file is not read


def test_random_weights_are_seeded_and_typed():
    cfg = KimiLinearConfig.from_dict(PRESETS["tiny"])
    g = build_graph(cfg, dtype="bf16")
    a, b, c = graph_random_weights(g, 0), graph_random_weights(g, 0), graph_random_weights(g, 1)
    assert set(a) == {n[1:] for n in g.params}
    assert all(torch.equal(a[n], b[n]) for n in a) and not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    for n, t in a.items():
        ty = g.params["@" + n]
        assert tuple(t.shape) == ty.shape and t.dtype == TORCH_DTYPES[ty.dtype]
        assert torch.isfinite(t.float()).all()
    assert (a["model.layers.0.self_attn.A_log"].float().exp() >= 1 - 1e-2).all()    # A in [1, 16]


def test_preset_logits_stay_finite_and_order_one():
    m = kimi_graph.load("tiny", seed=0)
    logits = m(torch.arange(1, 33).view(2, 16))
    assert torch.isfinite(logits).all() and 0.1 < logits.std() < 100
