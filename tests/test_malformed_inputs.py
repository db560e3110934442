"""The malformed-input corpus: each case is a bad input to the public API, and asserts the
error class and a phrase of its message (never a silent answer, never an error from deep
inside a library). Property-based and fuzzed tests live elsewhere; this is the table.

Each case is (id, make, error class, phrase): `make(tmp_path)` performs the bad call."""
from __future__ import annotations

import json
import math

import pytest
import torch

import kimi_graph
from checkpoints import random_weights, write_checkpoint
from kimi_graph import ConfigError, KimiLinearConfig, WeightError
from kimi_graph.finite import NonFiniteError
from kimi_graph.presets import TINY

CASES: list[tuple[str, object, type, str]] = []


def case(id_: str, error: type, phrase: str):
    def add(make):
        CASES.append((id_, make, error, phrase))
        return make
    return add


def tiny(**changes) -> dict:
    cfg = json.loads(json.dumps(TINY))
    cfg.update(changes)
    return cfg


def config(**changes):
    return lambda tmp: KimiLinearConfig.from_dict(tiny(**changes))


# -- config.json values no one used to check -------------------------------------------------
for id_, changes, phrase in [
    ("model_type_llama", {"model_type": "llama"}, "model_type 'llama' is not Kimi Linear's"),
    ("architectures_llama", {"architectures": ["LlamaForCausalLM"]}, "names no Kimi Linear model"),
    ("architectures_string", {"architectures": "KimiLinearForCausalLM"}, "names no Kimi Linear model"),
    ("kv_heads_3_of_2", {"num_attention_heads": 2, "num_key_value_heads": 3},
     "num_key_value_heads (3) must equal num_attention_heads (2)"),
    ("eos_out_of_vocab", {"eos_token_id": 512}, "eos_token_id 512 is outside the vocabulary [0, 512)"),
    ("eos_string", {"eos_token_id": "7"}, "eos_token_id must be an integer or a list of integers"),
    ("eos_list_out_of_vocab", {"eos_token_id": [2, 9999]}, "eos_token_id [9999] is outside the vocabulary"),
    ("bos_float", {"bos_token_id": 1.0}, "bos_token_id must be an integer"),
    ("pad_negative", {"pad_token_id": -1}, "pad_token_id -1 is outside the vocabulary"),
    ("model_max_length_negative", {"model_max_length": -5}, "model_max_length must be a positive integer, got -5"),
    ("rms_norm_eps_inf", {"rms_norm_eps": math.inf}, "rms_norm_eps must be finite"),
    ("rms_norm_eps_nan", {"rms_norm_eps": math.nan}, "rms_norm_eps must be > 0"),
    ("routed_scaling_nan", {"routed_scaling_factor": math.nan}, "routed_scaling_factor must be a finite number > 0"),
    ("routed_scaling_inf", {"routed_scaling_factor": math.inf}, "routed_scaling_factor must be a finite number > 0"),
    ("attention_bias", {"attention_bias": True}, "attention_bias must be false"),
    ("layer_types_bad_entry", {"linear_attn_config": None, "layer_types": ["kda"] * 4},
     "layer_types must be a list of 'linear_attention' or 'full_attention'"),
    ("layer_types_disagree", {"layer_types": ["full_attention"] * 4},
     "layer_types and linear_attn_config name different layers"),
    ("mlp_layer_types_short", {"mlp_layer_types": ["dense"]}, "mlp_layer_types must be a list of 4"),
    ("alias_disagrees", {"n_group": 4}, "n_group (4) and num_expert_group (2) disagree"),
    ("linear_fields_without_layers", {"linear_attn_config": None, "linear_num_heads": 4},
     "no layer_types or linear_attn_config says which layers are KDA"),
]:
    CASES.append((id_, config(**changes), ConfigError, phrase))


@case("ten_million_layers_message_is_short", ConfigError, "(9999996 in all)")
def _(tmp):
    try:
        KimiLinearConfig.from_dict(tiny(num_hidden_layers=10 ** 7))
    except ConfigError as e:
        assert len(str(e)) < 1000
        raise


@case("huge_string_value_is_cut", ConfigError, "characters)")
def _(tmp):
    try:
        KimiLinearConfig.from_dict(tiny(hidden_act="x" * 10 ** 6))
    except ConfigError as e:
        assert len(str(e)) < 1000
        raise


# -- weights -----------------------------------------------------------------------------------
def checkpoint_with(tmp, edit):
    w = random_weights(TINY, 0)
    edit(w)
    write_checkpoint(tmp, TINY, weights=w)
    return kimi_graph.load(tmp)


@case("nan_weight", NonFiniteError, "weights hold NaN or inf: model.layers.1.self_attn.q_proj.weight")
def _(tmp):
    checkpoint_with(tmp, lambda w: w["model.layers.1.self_attn.q_proj.weight"].view(-1)[3].fill_(math.nan))


@case("inf_embedding", NonFiniteError, "model.embed_tokens.weight")
def _(tmp):
    checkpoint_with(tmp, lambda w: w["model.embed_tokens.weight"][5].fill_(math.inf))


@case("inf_A_log", NonFiniteError, "model.layers.0.self_attn.A_log")
def _(tmp):
    checkpoint_with(tmp, lambda w: w["model.layers.0.self_attn.A_log"].fill_(math.inf))


@case("f16_overflow", NonFiniteError, "model.norm.weight")
def _(tmp):
    w = {k: v.half() for k, v in random_weights(TINY, 0).items()}
    w["model.norm.weight"][0] = 1e6            # fp16's range ends at 65504: stored as inf
    write_checkpoint(tmp, TINY, weights=w)
    kimi_graph.load(tmp)


@case("payload_overwritten", NonFiniteError, "weights hold NaN or inf")
def _(tmp):
    write_checkpoint(tmp, TINY, seed=0)
    f = tmp / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-4096:] = b"\xff" * 4096               # NaN bit patterns over the last tensors' bytes
    f.write_bytes(bytes(data))
    kimi_graph.load(tmp)


@case("nan_logits_from_model_call", NonFiniteError, "logits hold NaN or inf")
def _(tmp):
    m = kimi_graph.load("tiny", check_finite=False)
    m.weights["model.norm.weight"][0] = math.nan
    m(torch.tensor([[1, 2, 3]]))


@case("nan_logits_in_generation", NonFiniteError, "next-token logits hold NaN or inf")
def _(tmp):
    m = kimi_graph.load("tiny", check_finite=False)
    m.weights["lm_head.weight"][:] = math.inf
    m.generate([[1, 2, 3]], max_new_tokens=2)


@pytest.mark.parametrize("make,error,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input(make, error, phrase, tmp_path):
    with pytest.raises(error) as e:
        make(tmp_path)
    assert phrase in str(e.value), str(e.value)[:2000]


def test_trusted_weights_skip_the_check(tmp_path):
    w = random_weights(TINY, 0)
    w["model.norm.weight"][0] = math.nan
    write_checkpoint(tmp_path, TINY, weights=w)
    assert torch.isnan(kimi_graph.load(tmp_path, check_finite=False).weights["model.norm.weight"][0])
