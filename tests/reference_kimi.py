"""An eager float64 Kimi Linear, written from the published math (ARCHITECTURE.md and the
official modeling code), apart from kimi_graph: plain torch, no kimi_graph.ops.

    cfg, weights = read_checkpoint(dir)        # config.json + safetensors (sharded or not)
    logits = forward(cfg, weights, input_ids, router_weights="official")   # [B, T, V] f64
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

KV_A_NORM_EPS = 1e-6    # kv_a_layernorm is built with the RMSNorm default eps
L2NORM_EPS = 1e-6       # KDA's q/k L2 normalisation


def read_checkpoint(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config dict and every tensor as float64, read straight from the safetensors files."""
    from safetensors import safe_open

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    weights = {}
    for f in files:
        with safe_open(str(path / f), framework="pt") as h:
            for name in h.keys():
                weights[name] = h.get_tensor(name).to(torch.float64)
    return cfg, weights


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error ||got - want|| / ||want|| (Frobenius), in float64."""
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all(), "non-finite values"
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def rmsnorm(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def short_conv(x, w):
    """Causal depthwise conv over time, zero history: x [B, T, C], w [C, 1, K]."""
    B, T, C = x.shape
    K = w.shape[-1]
    y = torch.zeros_like(x)
    for t in range(T):
        for i in range(K):
            src = t - (K - 1) + i
            if src >= 0:
                y[:, t] += w[:, 0, i] * x[:, src]
    return y


def kda(cfg, W, p, x):
    lac = cfg["linear_attn_config"]
    H, K = lac["num_heads"], lac["head_dim"]
    B, T, _ = x.shape

    def proj(n):
        y = F.silu(short_conv(x @ W[p + f"{n}_proj.weight"].T, W[p + f"{n}_conv1d.weight"]))
        return y.view(B, T, H, K)

    q, k, v = proj("q"), proj("k"), proj("v")
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + L2NORM_EPS)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + L2NORM_EPS)
    f = (x @ W[p + "f_a_proj.weight"].T) @ W[p + "f_b_proj.weight"].T + W[p + "dt_bias"]
    g = (-torch.exp(W[p + "A_log"]) * F.softplus(f.view(B, T, H, K)))        # log decay
    beta = torch.sigmoid(x @ W[p + "b_proj.weight"].T)                         # [B, T, H]
    S = torch.zeros(B, H, K, K, dtype=x.dtype)
    o = torch.zeros(B, T, H, K, dtype=x.dtype)
    for t in range(T):                                  # the delta rule, token by token
        S = S * torch.exp(g[:, t]).unsqueeze(-1)
        kt = k[:, t]
        pred = (kt.unsqueeze(-1) * S).sum(-2)           # k^T S  [B, H, V]
        S = S + kt.unsqueeze(-1) * (beta[:, t].unsqueeze(-1) * (v[:, t] - pred)).unsqueeze(-2)
        o[:, t] = ((q[:, t] * K ** -0.5).unsqueeze(-1) * S).sum(-2)
    gate = torch.sigmoid((x @ W[p + "g_a_proj.weight"].T) @ W[p + "g_b_proj.weight"].T)
    o = rmsnorm(o, W[p + "o_norm.weight"], cfg["rms_norm_eps"]) * gate.view(B, T, H, K)
    return o.reshape(B, T, H * K) @ W[p + "o_proj.weight"].T


def mla(cfg, W, p, x):
    H, R = cfg["num_attention_heads"], cfg["kv_lora_rank"]
    N, P, Vd = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    B, T, _ = x.shape
    q = (x @ W[p + "q_proj.weight"].T).view(B, T, H, N + P)
    ckv = x @ W[p + "kv_a_proj_with_mqa.weight"].T
    latent = rmsnorm(ckv[..., :R], W[p + "kv_a_layernorm.weight"], KV_A_NORM_EPS)
    k_shared = ckv[..., R:]                                          # NoPE: never rotated
    kv = (latent @ W[p + "kv_b_proj.weight"].T).view(B, T, H, N + Vd)
    k = torch.cat([kv[..., :N], k_shared.unsqueeze(2).expand(B, T, H, P)], dim=-1)
    v = kv[..., N:]
    scores = torch.einsum("bthd,bshd->bhts", q, k) * (N + P) ** -0.5
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    o = torch.einsum("bhts,bshd->bthd", probs, v)
    return o.reshape(B, T, H * Vd) @ W[p + "o_proj.weight"].T


def best_first(values, k):
    """Per row, the indices of the k largest values, largest first; among equal values the
    lower index first (the tie rule of ONNX TopK, which every backend follows)."""
    rows = values.tolist()
    return torch.tensor([sorted(range(len(r)), key=lambda i: (-r[i], i))[:k] for r in rows],
                        dtype=torch.int64).view(values.shape[0], k)


def route(cfg, W, p, x, router_weights):
    """The official router: sigmoid scores; selection on scores + e_score_correction_bias by
    grouped top-k (group score = sum of its top 2, unselected groups' experts set to 0, which
    makes exact ties: the lowest index wins, for groups and experts);
    weights gathered from the biased ("official") or unbiased scores, renormalised, scaled."""
    E, k = cfg["num_experts"], cfg["num_experts_per_token"]
    G, TG = cfg["num_expert_group"], cfg["topk_group"]
    scores = torch.sigmoid(x @ W[p + "gate.weight"].T)                    # [N, E]
    biased = scores + W[p + "gate.e_score_correction_bias"]
    n = biased.shape[0]
    group_scores = biased.view(n, G, E // G).topk(min(2, E // G), dim=-1).values.sum(-1)
    keep_groups = best_first(group_scores, TG)
    group_mask = torch.zeros(n, G, dtype=torch.bool)
    group_mask[torch.arange(n).unsqueeze(1), keep_groups] = True
    expert_mask = group_mask.repeat_interleave(E // G, dim=1)
    ids = best_first(biased.masked_fill(~expert_mask, 0.0), k)
    w = torch.gather(biased if router_weights == "official" else scores, 1, ids)
    if k > 1 and cfg.get("moe_renormalize", True):
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * cfg.get("routed_scaling_factor", 1.0)


def moe(cfg, W, p, x, router_weights):
    B, T, D = x.shape
    xs = x.reshape(-1, D)
    ids, w = route(cfg, W, p, xs, router_weights)
    out = torch.zeros_like(xs)
    for n in range(xs.shape[0]):
        for j in range(ids.shape[1]):
            e = p + f"experts.{int(ids[n, j])}."
            out[n] += w[n, j] * swiglu(xs[n], W[e + "w1.weight"], W[e + "w3.weight"], W[e + "w2.weight"])
    if cfg.get("num_shared_experts", 0):
        s = p + "shared_experts."
        out = out + swiglu(xs, W[s + "gate_proj.weight"], W[s + "up_proj.weight"], W[s + "down_proj.weight"])
    return out.view(B, T, D)


def forward(cfg: dict, W: dict[str, torch.Tensor], input_ids: torch.Tensor,
            router_weights: str = "official") -> torch.Tensor:
    """Logits [B, T, vocab] in float64 for input_ids [B, T], from an empty cache."""
    eps = cfg["rms_norm_eps"]
    kda_layers = set((cfg.get("linear_attn_config") or {}).get("kda_layers", []))
    h = W["model.embed_tokens.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rmsnorm(h, W[p + "input_layernorm.weight"], eps)
        h = h + (kda if i + 1 in kda_layers else mla)(cfg, W, p + "self_attn.", x)
        x = rmsnorm(h, W[p + "post_attention_layernorm.weight"], eps)
        if (cfg.get("num_experts") and i >= cfg.get("first_k_dense_replace", 0)
                and i % cfg.get("moe_layer_freq", 1) == 0):
            h = h + moe(cfg, W, p + "block_sparse_moe.", x, router_weights)
        else:
            h = h + swiglu(x, W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"],
                           W[p + "mlp.down_proj.weight"])
    h = rmsnorm(h, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
    return h @ head.T
