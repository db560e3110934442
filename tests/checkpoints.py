"""Random tiny Kimi Linear checkpoints in Hugging Face layout, for tests.

Written apart from kimi_graph: the tensor names and shapes below are the HF checkpoint's
(ARCHITECTURE.md), so a test that loads these files checks the graph's declarations too.

    cfg = random_config(seed, **overrides)              # a config.json dict
    weights = write_checkpoint(dir, cfg, seed, shard_bytes=None)   # fp32 tensors written
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch


def random_config(seed: int, **overrides) -> dict:
    """A valid tiny config drawn from `seed`: layers, heads, head dims, kv_lora_rank, experts,
    top-k, expert groups, first_k_dense_replace, the kda/full layer split and tied embeddings
    all vary. `overrides` replace top-level keys (and `linear_attn_config` as a whole)."""
    r = random.Random(seed)
    n_layers = r.randint(2, 5)
    layers = list(range(1, n_layers + 1))
    n_full = r.randint(0, n_layers)
    full = sorted(r.sample(layers, n_full))
    kda = [i for i in layers if i not in full]
    groups = r.choice([1, 2, 4])
    per_group = r.choice([2, 3, 4])
    experts = groups * per_group
    topk_group = r.randint(1, groups)
    top_k = r.randint(1, topk_group * per_group)
    cfg = {
        "model_type": "kimi_linear",
        "vocab_size": r.choice([61, 128, 200]),
        "hidden_size": r.choice([16, 24, 32]),
        "intermediate_size": r.choice([20, 32, 48]),
        "num_hidden_layers": n_layers,
        "num_attention_heads": r.randint(1, 4),
        "hidden_act": "silu",
        "rms_norm_eps": r.choice([1e-5, 1e-6]),
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": r.random() < 0.4,
        "moe_intermediate_size": r.choice([8, 12, 16]),
        "moe_renormalize": r.random() < 0.8,
        "moe_router_activation_func": "sigmoid",
        "num_experts": experts,
        "num_experts_per_token": top_k,
        "num_shared_experts": r.choice([0, 1, 2]),
        "routed_scaling_factor": r.choice([1.0, 2.446]),
        "first_k_dense_replace": r.randint(0, n_layers),
        "moe_layer_freq": 1,
        "use_grouped_topk": True,
        "num_expert_group": groups,
        "topk_group": topk_group,
        "q_lora_rank": None,
        "kv_lora_rank": r.choice([8, 12, 16]),
        "qk_nope_head_dim": r.choice([4, 8]),
        "qk_rope_head_dim": r.choice([2, 4]),
        "v_head_dim": r.choice([4, 6, 8]),
        "mla_use_nope": True,
        "linear_attn_config": {"full_attn_layers": full, "kda_layers": kda,
                               "num_heads": r.randint(1, 3), "head_dim": r.choice([4, 8]),
                               "short_conv_kernel_size": r.choice([2, 3, 4])},
    }
    cfg.update(overrides)
    return cfg


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint for `cfg`, name -> shape (weights are [out, in])."""
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    lac = cfg.get("linear_attn_config") or {}     # none: every layer is MLA
    kda_layers = set(lac.get("kda_layers", []))
    s = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.get("tie_word_embeddings", False):
        s["lm_head.weight"] = (V, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (D,)
        s[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if i + 1 in kda_layers:
            H, K, W = lac["num_heads"], lac["head_dim"], lac.get("short_conv_kernel_size", 4)
            C = H * K
            for n in "qkv":
                s[a + f"{n}_proj.weight"] = (C, D)
                s[a + f"{n}_conv1d.weight"] = (C, 1, W)
            s.update({a + "A_log": (1, 1, H, 1), a + "dt_bias": (C,),
                      a + "f_a_proj.weight": (K, D), a + "f_b_proj.weight": (C, K),
                      a + "b_proj.weight": (H, D), a + "g_a_proj.weight": (K, D),
                      a + "g_b_proj.weight": (C, K), a + "o_norm.weight": (K,),
                      a + "o_proj.weight": (D, C)})
        else:
            H, R = cfg["num_attention_heads"], cfg["kv_lora_rank"]
            N, P, Vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
            s.update({a + "q_proj.weight": (H * (N + P), D),
                      a + "kv_a_proj_with_mqa.weight": (R + P, D),
                      a + "kv_a_layernorm.weight": (R,),
                      a + "kv_b_proj.weight": (H * (N + Vd), R),
                      a + "o_proj.weight": (D, H * Vd)})
        moe = (cfg.get("num_experts") and i >= cfg.get("first_k_dense_replace", 0)
               and i % cfg.get("moe_layer_freq", 1) == 0)
        if moe:
            m, E, I = p + "block_sparse_moe.", cfg["num_experts"], cfg["moe_intermediate_size"]
            s[m + "gate.weight"] = (E, D)
            s[m + "gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                s.update({m + f"experts.{e}.w1.weight": (I, D), m + f"experts.{e}.w3.weight": (I, D),
                          m + f"experts.{e}.w2.weight": (D, I)})
            Is = I * cfg.get("num_shared_experts", 0)
            if Is:
                s.update({m + "shared_experts.gate_proj.weight": (Is, D),
                          m + "shared_experts.up_proj.weight": (Is, D),
                          m + "shared_experts.down_proj.weight": (D, Is)})
        else:
            I = cfg["intermediate_size"]
            s.update({p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
                      p + "mlp.down_proj.weight": (D, I)})
    return s


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Scales of a trained model, so activations stay O(1) through the layers."""
    n = torch.randn(shape, generator=gen, dtype=torch.float64)
    if name.endswith("A_log"):
        return torch.empty(shape, dtype=torch.float64).uniform_(1, 16, generator=gen).log()
    if name.endswith("dt_bias"):
        return 0.5 * n
    if name.endswith("e_score_correction_bias"):
        return 0.1 * n
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * n
    if name == "model.embed_tokens.weight":
        return n
    return n / math.sqrt(shape[-1])    # linear [out, in] and conv [C, 1, K]


def random_weights(cfg: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: random_tensor(n, s, gen).to(dtype) for n, s in hf_shapes(cfg).items()}


def write_checkpoint(path, cfg: dict, seed: int = 0, shard_bytes: int | None = None,
                     weights: dict[str, torch.Tensor] | None = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Write config.json and the weights (random from `seed` unless given) in HF layout:
    one model.safetensors, or shards of at most `shard_bytes` plus model.safetensors.index.json
    (kimi_graph's writer; the reference reads the files on its own). Returns the tensors."""
    from kimi_graph.weights import save_safetensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    if weights is None:
        weights = random_weights(cfg, seed, dtype)
    save_safetensors(weights, path, max_shard_bytes=shard_bytes)
    return weights


def tie_routers(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Routers whose scores tie exactly, in place: about half the gate rows zero (score exactly
    sigmoid(0) = 0.5 for every token) and biases from {-20, 0.25, 0.5}: equal experts, equal
    groups, and kept experts (bias -20) below the zeroed experts of unchosen groups. No sum
    of up to 12 selected weights comes near 0, so renormalising stays well-conditioned."""
    gen = torch.Generator().manual_seed(seed)
    for name, w in weights.items():
        if name.endswith("gate.weight"):
            w[torch.rand(w.shape[0], generator=gen) < 0.5] = 0.0
        elif name.endswith("gate.e_score_correction_bias"):
            w.copy_(torch.tensor([-20.0, 0.25, 0.5])[torch.randint(0, 3, w.shape, generator=gen)])
    return weights


def tiny_two_layers():
    """The tiny preset's widths on two layers (KDA with the dense MLP, then MLA with the MoE):
    every kind of layer it has, at half its interpreted cost."""
    from kimi_graph.config import KimiLinearConfig
    from kimi_graph.presets import PRESETS
    cfg = {**PRESETS["tiny"], "num_hidden_layers": 2}
    cfg["linear_attn_config"] = {**cfg["linear_attn_config"], "kda_layers": [1], "full_attn_layers": [2]}
    return KimiLinearConfig.from_dict(cfg)
