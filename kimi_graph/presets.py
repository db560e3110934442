"""Built-in configs: `tiny` (the demo's default, seeded random weights) and the published
`kimi-linear-48b-a3b` (its graph builds without weights)."""
from __future__ import annotations

KIMI_LINEAR_48B_A3B = {
    "architectures": ["KimiLinearForCausalLM"],
    "model_type": "kimi_linear",
    "vocab_size": 163840, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 27, "num_attention_heads": 32, "num_key_value_heads": 32,
    "head_dim": 72, "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-5,
    "bos_token_id": 163584, "eos_token_id": 163586, "pad_token_id": 163839,
    "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
    "model_max_length": 1048576,
    "moe_intermediate_size": 1024, "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
    "num_experts": 256, "num_experts_per_token": 8, "num_shared_experts": 1,
    "routed_scaling_factor": 2.446, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "mla_use_nope": True, "num_nextn_predict_layers": 0,
    "linear_attn_config": {
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "num_heads": 32, "head_dim": 128, "short_conv_kernel_size": 4,
    },
}

TINY = {
    "model_type": "kimi_linear",
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
    "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
    "model_max_length": 4096,
    "moe_intermediate_size": 32, "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
    "num_experts": 8, "num_experts_per_token": 2, "num_shared_experts": 1,
    "routed_scaling_factor": 2.446, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "use_grouped_topk": True, "num_expert_group": 2, "topk_group": 1,
    "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "mla_use_nope": True,
    "linear_attn_config": {"full_attn_layers": [2, 4], "kda_layers": [1, 3],
                           "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4},
}

PRESETS = {"tiny": TINY, "kimi-linear-48b-a3b": KIMI_LINEAR_48B_A3B}
