"""transformers >= 5's own KimiLinearForCausalLM as an independent oracle: a checkpoint its
`save_pretrained` writes loads unmodified (its config form, its dense-MLP names), and so
does its in-memory state_dict (packed experts, stacked convs); logits match within 1e-5
relative (fp32) with router_weights="unbiased" (transformers, like vLLM, weights the chosen experts
by the unbiased scores) and greedy tokens are equal."""
from __future__ import annotations

import json
import math

import pytest
import torch

import kimi_graph
from reference_kimi import rel_err

transformers = pytest.importorskip("transformers", minversion="5.0")   # a test dependency

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
              num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,
              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_local_experts=6,
              num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
              linear_head_dim=8, linear_num_heads=2, linear_conv_kernel_dim=3,
              layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
              mlp_layer_types=["dense", "sparse", "dense", "sparse"],
              pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def hf_model():
    """transformers' model with random weights at a trained model's scales (its own init
    leaves the router bias zero, which would hide the router modes' difference)."""
    torch.manual_seed(0)
    model = transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith(("dt_bias", "e_score_correction_bias")):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.is_floating_point():
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(path)
    return path


def ids():
    return torch.randint(0, CONFIG["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))


def test_save_pretrained_form_is_what_we_read(saved):
    cfg = json.loads((saved / "config.json").read_text())
    assert "layer_types" in cfg and "linear_attn_config" not in cfg and "mla_use_nope" not in cfg
    ours = kimi_graph.KimiLinearConfig.from_json(saved / "config.json")
    assert ours.layer_kinds == ["kda", "mla", "kda", "mla"]
    assert [ours.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert (ours.kda_heads, ours.kda_head_dim, ours.conv_kernel) == (2, 8, 3)


def test_logits_and_greedy_tokens_match_transformers(hf_model, saved):
    x = ids()
    with torch.no_grad():
        ref = hf_model(x).logits
    model = kimi_graph.load(saved, router_weights="unbiased")
    err = rel_err(model(x), ref)                 # fp32: 1.1e-6 here (max abs 9e-6, logits up to 4.3)
    assert err <= 1e-5, err
    official = kimi_graph.load(saved)            # the remote code's weights: a different model
    assert rel_err(official(x), ref) > 1e-3
    prompt = x[:1]
    gen = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
    with torch.no_grad():
        theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt),   # 0 is pad
                                   generation_config=gen)[0, prompt.shape[1]:].tolist()
    assert model.generate([prompt[0].tolist()], max_new_tokens=6, ignore_eos=True)[0] == theirs


def test_in_memory_names_load(hf_model, saved, tmp_path):
    """A state_dict saved as transformers holds it: packed experts, stacked convs."""
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    assert "model.layers.0.self_attn.conv1d.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    a = kimi_graph.load(tmp_path, router_weights="unbiased")
    b = kimi_graph.load(saved, router_weights="unbiased")
    assert a.weights.keys() == b.weights.keys()
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k]), k
