"""Bad inputs each get a clear error: unknown models, invalid configs, mismatched or corrupt
weights, bad token ids, bad graph inputs and options."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import kimi_graph
from checkpoints import random_config, random_weights, write_checkpoint
from kimi_graph import ConfigError, IRError, KimiLinearConfig, WeightError
from kimi_graph.interpreter import run_graph


def base_config(**overrides) -> dict:
    cfg = random_config(7, num_hidden_layers=3, num_experts=4, num_expert_group=2, topk_group=1,
                        num_experts_per_token=2, first_k_dense_replace=1,
                        linear_attn_config={"kda_layers": [1, 2], "full_attn_layers": [3],
                                            "num_heads": 2, "head_dim": 4})
    cfg.update(overrides)
    return cfg


def config_error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as e:
        KimiLinearConfig.from_dict(cfg)
    return str(e.value)


# -- models and configs ----------------------------------------------------------------------

def test_unknown_preset_or_path(tmp_path):
    with pytest.raises(ConfigError, match="'no-such-model' is neither a preset .*tiny.* nor a model directory"):
        kimi_graph.load("no-such-model")
    with pytest.raises(ConfigError, match="no config.json at"):
        kimi_graph.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        kimi_graph.load(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config must be a JSON object, got list"):
        kimi_graph.load(tmp_path)


def test_config_missing_required_keys():
    cfg = base_config()
    del cfg["hidden_size"], cfg["vocab_size"]
    assert "missing required key(s): vocab_size, hidden_size" in config_error(cfg)
    cfg = base_config()
    del cfg["linear_attn_config"]["head_dim"]
    assert "linear_attn_config is missing 'head_dim'" in config_error(cfg)
    cfg = base_config(kv_lora_rank=None)
    assert "MLA layers need kv_lora_rank" in config_error(cfg)


@pytest.mark.parametrize("change,message", [
    ({"lac": {"kda_layers": [1], "full_attn_layers": [3]}},
     "layers [2] (1-based) are in neither kda_layers nor full_attn_layers; together they must cover 1..3"),
    ({"lac": {"kda_layers": [1, 2, 3], "full_attn_layers": [3]}},
     "layers [3] are in both kda_layers and full_attn_layers"),
    ({"lac": {"kda_layers": [0, 1, 2], "full_attn_layers": [3]}},
     "layer numbers [0] are outside 1..3 (lists are 1-based)"),
    ({"lac": {"kda_layers": [1, 2, 2], "full_attn_layers": [3]}}, "layer lists contain duplicates"),
    ({"lac": {"kda_layers": ["1", 2], "full_attn_layers": [3]}}, "layer lists must hold integers"),
    ({"num_experts_per_token": 5}, "num_experts_per_token (5) > num_experts (4)"),
    ({"num_expert_group": 3}, "num_experts (4) is not divisible by num_expert_group (3)"),
    ({"topk_group": 3}, "topk_group (3) > num_expert_group (2)"),
    ({"num_experts_per_token": 3}, "num_experts_per_token (3) exceeds the experts in 1 selected group(s)"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
    ({"num_hidden_layers": "3"}, "num_hidden_layers must be a positive integer, got '3'"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be > 0"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"moe_router_activation_func": "softmax"}, "moe_router_activation_func 'softmax' is not supported"),
    ({"q_lora_rank": 16}, "q_lora_rank must be null"),
    ({"mla_use_nope": False}, "mla_use_nope must be true"),
    ({"pad_token_id": 100000}, "pad_token_id 100000 is outside the vocabulary"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace must be >= 0"),
    ({"lac": {"kda_layers": 3}}, "kda_layers and full_attn_layers must be lists of layer numbers"),
    ({"num_shared_experts": "1"}, "num_shared_experts must be an integer >= 0, got '1'"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, got 'yes'"),
    ({"moe_renormalize": 1}, "moe_renormalize must be true or false, got 1"),
    ({"routed_scaling_factor": "2.4"}, "routed_scaling_factor must be a finite number > 0, got '2.4'"),
])
def test_config_inconsistent_values(change, message):
    cfg = base_config()
    if "lac" in change:
        cfg["linear_attn_config"].update(change.pop("lac"))
    cfg.update(change)
    assert message in config_error(cfg)


def test_config_errors_are_reported_together_with_the_file(tmp_path):
    cfg = base_config(hidden_size=-4, hidden_act="relu")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        kimi_graph.load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and "hidden_size" in msg and "hidden_act" in msg


# -- weights ---------------------------------------------------------------------------------

def weight_error(path) -> str:
    with pytest.raises(WeightError) as e:
        kimi_graph.load(path)
    return str(e.value)


def test_missing_extra_and_misshaped_weights_in_one_error(tmp_path):
    cfg = base_config()
    w = random_weights(cfg, 0)
    del w["model.norm.weight"], w["model.layers.1.self_attn.A_log"]
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    w["model.layers.2.self_attn.q_proj.weight"] = w["model.layers.2.self_attn.q_proj.weight"].T.contiguous()
    q = w["model.layers.2.self_attn.q_proj.weight"]
    write_checkpoint(tmp_path, cfg, weights=w, shard_bytes=2000)
    msg = weight_error(tmp_path)
    assert "missing (2): model.layers.1.self_attn.A_log, model.norm.weight" in msg
    assert "unexpected (1): model.layers.0.self_attn.rotary_emb.inv_freq" in msg
    assert (f"misshaped (1): model.layers.2.self_attn.q_proj.weight: expected {list(q.T.shape)}, "
            f"got {list(q.shape)}") in msg


def test_non_float_and_duplicated_weights(tmp_path):
    from safetensors.torch import save_file
    cfg = base_config()
    w = random_weights(cfg, 0)
    w["model.norm.weight"] = torch.ones(cfg["hidden_size"], dtype=torch.int32)
    write_checkpoint(tmp_path, cfg, weights=w)
    save_file({"model.layers.0.input_layernorm.weight": torch.ones(cfg["hidden_size"])},
              str(tmp_path / "extra.safetensors"))      # not listed: only model.safetensors is read
    assert "not floating point (1): model.norm.weight: stored as I32" in weight_error(tmp_path)
    (tmp_path / "model.safetensors").unlink()            # no single file: every *.safetensors
    w["model.norm.weight"] = torch.ones(cfg["hidden_size"])
    write_checkpoint(tmp_path / "sh", cfg, weights=w, shard_bytes=4000)
    for f in (tmp_path / "sh").glob("*.safetensors"):
        shutil.copy(f, tmp_path / f.name)
    msg = weight_error(tmp_path)
    assert "in two files (1): model.layers.0.input_layernorm.weight" in msg


@pytest.mark.parametrize("corrupt", ["garbage", "truncated", "empty", "header_length", "header_json"])
def test_corrupt_safetensors(corrupt, tmp_path):
    write_checkpoint(tmp_path, base_config(), seed=0)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    f.write_bytes({"garbage": b"this is not a safetensors file",
                   "truncated": data[: len(data) - 16],
                   "empty": b"",
                   "header_length": (1 << 40).to_bytes(8, "little") + data[8:],
                   "header_json": data[:8] + b"[" * n + data[8 + n:]}[corrupt])
    assert f"cannot read {f}" in weight_error(tmp_path)


def test_sharded_checkpoint_errors(tmp_path):
    write_checkpoint(tmp_path, base_config(), seed=0, shard_bytes=2000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    assert f"shards named in model.safetensors.index.json are missing: ['{shards[-1]}']" in weight_error(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "is not a valid safetensors index" in weight_error(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    for s in shards[:-1]:
        s.unlink()
    assert "no safetensors weights in" in weight_error(tmp_path)


# -- token ids, graph inputs, options ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return kimi_graph.load("tiny")


@pytest.mark.parametrize("ids,message", [
    ([[1, 512, 3]], r"token ids out of range \[0, 512\): \[512\]"),
    ([[-1, 5, 7000]], r"token ids out of range \[0, 512\): \[-1, 7000\]"),
    ([[1.0, 2.0]], "input_ids must be an integer tensor"),
    ([[[1, 2]]], "input_ids must be an integer tensor"),
    (torch.zeros(1, 0, dtype=torch.int64), "input_ids is empty"),
])
def test_bad_token_ids(tiny, ids, message):
    with pytest.raises(ValueError, match=message):
        tiny(torch.as_tensor(ids))


def test_out_of_range_ids_straight_into_the_graph(tiny):
    with pytest.raises(ValueError, match=r"token ids out of range \[0, 512\): \[600\]"):
        run_graph(tiny.graph, {"input_ids": torch.tensor([[1, 600]])}, tiny.weights)


def test_bad_graph_inputs(tiny):
    g, w = tiny.graph, tiny.weights
    ids = torch.tensor([[1, 2]])
    cases = [
        ({}, "missing graph input %input_ids"),
        ({"input_ids": ids[0]}, r"input %input_ids: expected rank 2"),
        ({"input_ids": ids.int()}, "input %input_ids: expected dtype i64, got torch.int32"),
        ({"input_ids": ids, "extra": ids}, r"unknown graph inputs \['%extra'\]"),
    ]
    for inputs, message in cases:
        with pytest.raises(IRError, match=message):
            run_graph(g, inputs, w)
    with pytest.raises(IRError, match="no weight for parameter @model.norm.weight"):
        run_graph(g, {"input_ids": ids}, {k: v for k, v in w.items() if k != "model.norm.weight"})
    dec = tiny.get_graph("decode")
    states = {n: torch.zeros([2 if d == "B" else 4 if d == "S" else d for d in dec.inputs[n].shape])
              for n in dec.meta["state_inputs"]}
    with pytest.raises(IRError, match="dim B is 2 here but 1 elsewhere"):
        run_graph(dec, {"input_ids": ids[:, :1], "cache_pos": torch.tensor([0]), **states}, w)


def test_bad_options():
    with pytest.raises(ValueError, match="router_weights must be one of"):
        kimi_graph.load("tiny", router_weights="vllm")
    with pytest.raises(ValueError, match="unsupported dtype torch.int64"):
        kimi_graph.load("tiny", dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        kimi_graph.load("tiny", backend="nope")
    with pytest.raises(ValueError, match="mode must be one of"):
        kimi_graph.load("tiny").build("train")
