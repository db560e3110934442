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


# -- requests: token ids, stops, sampling, engine sizing ------------------------------------
def _tiny_call(fn):
    return lambda tmp: fn(kimi_graph.load("tiny"))


for id_, fn, error, phrase in [
    ("ids_as_string", lambda m: m("1,2,3"), ValueError, "input_ids must be token ids"),
    ("ids_as_strings_list", lambda m: m([["a", "b"]]), ValueError, "nested lists of integers"),
    ("stop_ids_int", lambda m: m.generate([[1]], stop_ids=5), ValueError, "stop_ids must be a list of token ids, got int"),
    ("stop_ids_string", lambda m: m.generate([[1]], stop_ids="5"), ValueError, "stop_ids must be a list of token ids, got str"),
    ("stop_ids_out_of_vocab", lambda m: m.generate([[1]], stop_ids=[10 ** 6]), ValueError,
     "stop_ids [1000000] are outside the vocabulary [0, 512)"),
    ("stop_ids_negative", lambda m: m.generate([[1]], stop_ids=[-1]), ValueError, "stop_ids must be token ids (integers >= 0)"),
    ("stop_ids_letters", lambda m: m.generate([[1]], stop_ids=["a"]), ValueError, "stop_ids must be token ids"),
    ("ignore_eos_string", lambda m: m.generate([[1]], ignore_eos="no"), ValueError, "ignore_eos must be True or False"),
    ("temperature_inf", lambda m: m.generate([[1]], temperature=math.inf), ValueError,
     "temperature must be a finite number >= 0"),
    ("temperature_nan", lambda m: m.generate([[1]], temperature=math.nan), ValueError, "temperature must be a finite"),
    ("window_block_negative", lambda m: m.generate([[1]], engine_options={"window_block": -4}),
     ValueError, "window_block must be a positive integer or None, got -4"),
    ("prompt_not_a_list", lambda m: m.generate([[1, 2], 7]), ValueError, "a prompt must be a list of token ids"),
]:
    CASES.append((id_, _tiny_call(fn), error, phrase))


# -- load() options and devices -----------------------------------------------------------
for id_, options, phrase in [
    ("torch_dtype", {"torch_dtype": torch.float16},
     "unknown option(s) torch_dtype for backend 'interpreter' (did you mean torch_dtype -> dtype?)"),
    ("pipline", {"pipline": "default"}, "pipline -> pipeline"),
    ("interpreter_compile", {"compile": True}, "unknown option(s) compile for backend 'interpreter'"),
    ("triton_bogus", {"backend": "triton", "bogus": 1}, "bogus for backend 'triton'; it takes no options"),
    ("torch_bogus", {"backend": "torch", "bogus": 1}, "it takes check_inputs, compile"),
    ("onnxruntime_thread", {"backend": "onnxruntime", "thread": 2}, "thread -> threads"),
    ("device_tpu", {"device": "tpu"}, "device 'tpu' is not supported"),
    ("device_gpu", {"device": "gpu"}, "device 'gpu' is not supported"),
    ("bf16_on_onnxruntime", {"backend": "onnxruntime", "dtype": torch.bfloat16}, "bf16 models do not run"),
    ("dtype_as_string", {"dtype": "float32"}, "unsupported dtype 'float32': use torch.float32"),
    ("seed_as_string", {"seed": "a"}, "seed must be an integer, got 'a'"),
    ("router_weights_unknown", {"router_weights": "vllm"}, "router_weights must be one of ('official', 'unbiased')"),
    ("pipeline_unknown", {"pipeline": "nope"}, "unknown pass 'nope'"),
    ("backend_unknown", {"backend": "tpu"}, "unknown backend 'tpu'"),
]:
    CASES.append((id_, (lambda o: lambda tmp: kimi_graph.load("tiny", **o))(options), ValueError, phrase))


@case("device_tpu_on_a_checkpoint", ValueError, "device 'tpu' is not supported")
def _(tmp):
    write_checkpoint(tmp, TINY, seed=0)
    kimi_graph.load(tmp, device="tpu")


@case("index_weight_map_list", WeightError, "weight_map must be an object (tensor name -> shard file), got list")
def _(tmp):
    write_checkpoint(tmp, TINY, seed=0, shard_bytes=100_000)
    index = tmp / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"] = list(d["weight_map"].values())
    index.write_text(json.dumps(d))
    kimi_graph.load(tmp)


# -- export directories that check themselves ----------------------------------------------
_EXPORT = {}


def export_copy(tmp):
    """A fresh copy of one tiny fp32 export (made once)."""
    import shutil
    import tempfile
    from kimi_graph.lowering.onnx.package import export_model
    if "dir" not in _EXPORT:
        _EXPORT["dir"] = tempfile.mkdtemp(prefix="kimi_graph_corpus_")
        export_model(kimi_graph.load("tiny"), _EXPORT["dir"], genai=False, check_models=False)
    out = tmp / "export"
    shutil.copytree(_EXPORT["dir"], out)
    return out


def broken_export(edit):
    def make(tmp):
        out = export_copy(tmp)
        edit(out)
        kimi_graph.load(out, backend="onnxruntime")
    return make


def _edit_json(name, fn):
    def edit(out):
        d = json.loads((out / name).read_text())
        fn(d)
        (out / name).write_text(json.dumps(d))
    return edit


for id_, edit, phrase in [
    ("manifest_missing", lambda out: (out / "kimi_graph_onnx.json").unlink(),
     "holds ONNX models but no kimi_graph_onnx.json"),
    ("manifest_not_json", lambda out: (out / "kimi_graph_onnx.json").write_text("{oops"), "is not valid JSON"),
    ("manifest_without_dtype", _edit_json("kimi_graph_onnx.json", lambda d: d.pop("dtype")),
     "lacks or misstates dtype"),
    ("manifest_dtype_float99", _edit_json("kimi_graph_onnx.json", lambda d: d.update(dtype="float99")),
     "dtype 'float99' is not one of"),
    ("manifest_without_hashes", _edit_json("kimi_graph_onnx.json", lambda d: d.pop("sha256")),
     "lacks or misstates sha256"),
    ("decode_over_prefill", lambda out: (out / "prefill.onnx").write_bytes((out / "decode.onnx").read_bytes()),
     "prefill.onnx changed since the export"),
    ("config_gained_a_layer", _edit_json("config.json", lambda d: d.update(
        num_hidden_layers=5, linear_attn_config={**d["linear_attn_config"], "kda_layers": [1, 3, 5]})),
     "config.json changed since the export"),
    ("vocabulary_enlarged", _edit_json("config.json", lambda d: d.update(vocab_size=1024)),
     "config.json changed since the export"),
    ("model_file_missing", lambda out: (out / "decode.onnx").unlink(), "decode.onnx is missing"),
]:
    CASES.append((id_, broken_export(edit), ValueError, phrase))


@case("bf16_export_on_onnxruntime", ValueError, "bf16 models do not run")
def _(tmp):
    out = export_copy(tmp)
    _edit_json("kimi_graph_onnx.json", lambda d: d.update(dtype="bfloat16"))(out)
    kimi_graph.load(out, backend="onnxruntime")


@case("export_loaded_on_another_backend", ValueError, "is an ONNX export (kimi-graph export-onnx)")
def _(tmp):
    kimi_graph.load(export_copy(tmp))


# -- the corpus runs ------------------------------------------------------------------------
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_finite_check_and_auto_device(tmp_path):
    from kimi_graph.api import resolve_device
    assert resolve_device("auto") == "cuda"
    w = random_weights(TINY, 0)
    w["model.layers.2.self_attn.kv_b_proj.weight"][1, 1] = math.inf
    write_checkpoint(tmp_path, TINY, weights=w)
    with pytest.raises(NonFiniteError, match="model.layers.2.self_attn.kv_b_proj.weight"):
        kimi_graph.load(tmp_path, device="auto")
    m = kimi_graph.load(tmp_path, device="cuda", check_finite=False)
    assert m.weights["model.norm.weight"].is_cuda
    with pytest.raises(ValueError, match="there are"):
        kimi_graph.load("tiny", device=f"cuda:{torch.cuda.device_count()}")
