"""Kimi Linear declared as a layer graph, from a KimiLinearConfig.

One declaration serves every mode (state-passing style):
- mode="prefill", stateful=False: input_ids [B, T] -> logits [B, T, V]; no caches.
- mode="prefill", stateful=True: also takes and returns every cache and state, continuing
  sequences whose first new token sits at `cache_pos[b]`.
- mode="decode": stateful, with T = 1.
`logits="last"` (prefill) computes the head at each sequence's last position only: logits
[B, 1, V], the next-token logits generation needs, without the [B, T, V] of every position
(sequences of one call have equal length, so the last position is the last row); past the last
layer's attention only that row runs (its output projection, residual, FFN and the head).
Caches: per MLA layer the normalised latent [B, S, kv_lora_rank] and the shared key slice
[B, S, qk_rope_head_dim]; per KDA layer the recurrent state [B, H, K, V] (fp32) and the q/k/v
conv states [B, C, kernel-1]. Parameter names are the HF checkpoint names.
"""
from __future__ import annotations

from .builder import GraphBuilder
from .config import KimiLinearConfig
from .dtypes import acc_dtype
from .ir import Graph, TensorType, gc_paused
from .ops.kda import decay_gate
from .ops.moe import route

ROUTER_WEIGHTS = ("official", "unbiased")
MODES = ("prefill", "decode")
LOGITS = ("all", "last")    # logits at every position, or at each sequence's last one
L2NORM_EPS = 1e-6       # q/k L2 norm inside KDA (fla's use_qk_l2norm_in_kernel)
KV_A_NORM_EPS = 1e-6    # the official code builds kv_a_layernorm with the RMSNorm default


def state_types(cfg: KimiLinearConfig, dtype: str = "f32") -> dict[str, TensorType]:
    """Every cache and recurrent state a stateful graph takes (and returns), in order:
    input name -> type. Dims "B" (sequences) and "S" (MLA cache slots) stay symbolic."""
    acc, out = acc_dtype(dtype), {}
    for i, kind in enumerate(cfg.layer_kinds):
        if kind == "kda":
            C, K, W = cfg.kda_heads * cfg.kda_head_dim, cfg.kda_head_dim, cfg.conv_kernel
            for n in "qkv":
                out[f"%state.l{i}.conv_{n}"] = TensorType(("B", C, W - 1), dtype)
            out[f"%state.l{i}.kda"] = TensorType(("B", cfg.kda_heads, K, K), acc)
        else:
            out[f"%cache.l{i}.latent"] = TensorType(("B", "S", cfg.kv_lora_rank), dtype)
            out[f"%cache.l{i}.rope_key"] = TensorType(("B", "S", cfg.qk_rope_head_dim), dtype)
    return out


class ModelDeclaration:
    """Builds one graph (mode, statefulness, dtype, router weights) from the config."""

    def __init__(self, cfg: KimiLinearConfig, mode: str, stateful: bool, dtype: str,
                 router_weights: str, logits: str = "all"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
        if router_weights not in ROUTER_WEIGHTS:
            raise ValueError(f"router_weights must be one of {ROUTER_WEIGHTS}, got {router_weights!r}")
        self.cfg, self.dtype, self.acc = cfg, dtype, acc_dtype(dtype)
        self.stateful = stateful or mode == "decode"
        self.router_weights = router_weights
        self.logits = "all" if mode == "decode" else logits     # one position: the same graph
        self.b = GraphBuilder(mode)
        self.T = 1 if mode == "decode" else "T"
        self.state_specs = state_types(cfg, dtype) if self.stateful else {}
        self.state_inputs: list[str] = []
        self.state_outputs: list[str] = []
        self.pos = None

    def p(self, name: str, shape, dtype: str | None = None) -> str:
        return self.b.param(name, shape, dtype or self.dtype)

    def state(self, name: str) -> str:
        ty = self.state_specs["%" + name]
        v = self.b.input(name, ty.shape, ty.dtype)
        self.state_inputs.append(v)
        return v

    # -- the model ----------------------------------------------------------
    def build(self) -> Graph:
        cfg, b = self.cfg, self.b
        ids = b.input("input_ids", ("B", self.T), "i64")
        if self.stateful:
            self.pos = b.input("cache_pos", ("B",), "i64")
        D = cfg.hidden_size
        emb = self.p("model.embed_tokens.weight", (cfg.vocab_size, D))
        with b.scope("embed"):
            h = b("embedding", ids, emb)
        for i, kind in enumerate(cfg.layer_kinds):
            pre = f"model.layers.{i}."
            # logits="last": past the last layer's attention (its caches and states written for
            # every position) only each sequence's last row reaches the logits: its output
            # projection, residual and FFN run on that row alone
            last = self.logits == "last" and i == len(cfg.layer_kinds) - 1
            with b.scope(f"l{i}"):
                x = b("rmsnorm", h, self.p(pre + "input_layernorm.weight", (D,)),
                      eps=cfg.rms_norm_eps, name="attn_norm")
                with b.scope(kind):
                    a = self.kda(i, x, last) if kind == "kda" else self.mla(i, x, last)
                if last:
                    h = b("take_last", h, dim=1, name="last")
                h = b("add", h, a, name="attn_res")
                x = b("rmsnorm", h, self.p(pre + "post_attention_layernorm.weight", (D,)),
                      eps=cfg.rms_norm_eps, name="ffn_norm")
                if cfg.is_moe_layer(i):
                    with b.scope("moe"):
                        f = self.moe(pre + "block_sparse_moe.", x)
                else:
                    with b.scope("mlp"):
                        f = self.mlp(pre + "mlp.", x, cfg.intermediate_size)
                h = b("add", h, f, name="ffn_res")
        with b.scope("head"):
            h = b("rmsnorm", h, self.p("model.norm.weight", (D,)), eps=cfg.rms_norm_eps, name="norm")
            if self.logits == "last" and not cfg.layer_kinds:
                h = b("take_last", h, dim=1, name="last")
            head = emb if cfg.tie_word_embeddings else self.p("lm_head.weight", (cfg.vocab_size, D))
            logits = b("linear", h, head, name="logits")
        b.output(logits, *self.state_outputs)
        g = b.graph
        g.meta = {"model": "kimi_linear", "mode": g.name, "stateful": self.stateful,
                  "dtype": self.dtype, "router_weights": self.router_weights, "logits": self.logits,
                  "layers": cfg.layer_kinds, "state_inputs": self.state_inputs}
        return g

    def kda(self, i: int, x: str, last: bool = False) -> str:
        cfg, b = self.cfg, self.b
        pre = f"model.layers.{i}.self_attn."
        D, H, K, W = cfg.hidden_size, cfg.kda_heads, cfg.kda_head_dim, cfg.conv_kernel
        C = H * K
        shp = ("B", self.T, H, K)
        qkv = []
        for n in "qkv":
            y = b("linear", x, self.p(pre + f"{n}_proj.weight", (C, D)), name=n)
            st = self.state(f"state.l{i}.conv_{n}") if self.stateful else None
            y, st_out = b.emit("causal_conv1d", y, self.p(pre + f"{n}_conv1d.weight", (C, 1, W)), st,
                               name=f"{n}_conv")
            if self.stateful:
                self.state_outputs.append(st_out)
            y = b("reshape", b("silu", y, name=n), shape=list(shp), name=n)
            qkv.append(b("l2norm", y, eps=L2NORM_EPS, name=n) if n != "v" else y)
        q, k, v = qkv
        # decay: g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias), per channel, in fp32
        f = b("linear", b("linear", x, self.p(pre + "f_a_proj.weight", (K, D)), name="f_a"),
              self.p(pre + "f_b_proj.weight", (C, K)), name="f_b")
        dt_bias = self.p(pre + "dt_bias", (C,), self.acc)
        g = decay_gate(b, f, self.p(pre + "A_log", (1, 1, H, 1), self.acc), dt_bias, shp, self.acc)
        beta = b("sigmoid", b("cast", b("linear", x, self.p(pre + "b_proj.weight", (H, D)), name="b"),
                             dtype=self.acc), name="beta")
        st = self.state(f"state.l{i}.kda") if self.stateful else None
        o, st_out = b.emit("kda_recurrent", q, k, v, g, beta, st, scale=K ** -0.5, name="kda")
        if self.stateful:
            self.state_outputs.append(st_out)
        # output: RMSNorm per head, times sigmoid(g_b(g_a(x))), then o_proj
        gate = b("linear", b("linear", x, self.p(pre + "g_a_proj.weight", (K, D)), name="g_a"),
                 self.p(pre + "g_b_proj.weight", (C, K)), name="g_b")
        gate = b("sigmoid", b("reshape", gate, shape=list(shp), name="gate"), name="gate")
        o = b("rmsnorm", o, self.p(pre + "o_norm.weight", (K,)), eps=cfg.rms_norm_eps, name="o_norm")
        o = b("reshape", b("mul", o, gate, name="o_gated"), shape=["B", self.T, C], name="o")
        if last:
            o = b("take_last", o, dim=1, name="o_last")
        return b("linear", o, self.p(pre + "o_proj.weight", (D, C)), name="out")

    def mla(self, i: int, x: str, last: bool = False) -> str:
        cfg, b = self.cfg, self.b
        pre = f"model.layers.{i}.self_attn."
        D, H, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        N, P, V = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        T = self.T
        q = b("reshape", b("linear", x, self.p(pre + "q_proj.weight", (H * (N + P), D)), name="q"),
              shape=["B", T, H, N + P], name="q")
        ckv = b("linear", x, self.p(pre + "kv_a_proj_with_mqa.weight", (R + P, D)), name="kv_a")
        latent = b("rmsnorm", b("slice", ckv, dim=-1, start=0, end=R, name="latent"),
                   self.p(pre + "kv_a_layernorm.weight", (R,)), eps=KV_A_NORM_EPS, name="latent")
        rope_key = b("slice", ckv, dim=-1, start=R, end=R + P, name="rope_key")
        S = T
        if self.stateful:       # append this step's rows to the caches; attend over all slots
            S = "S"
            latent = b("cache_write", self.state(f"cache.l{i}.latent"), latent, self.pos,
                       name="latent_cache")
            rope_key = b("cache_write", self.state(f"cache.l{i}.rope_key"), rope_key,
                         self.pos, name="rope_key_cache")
            self.state_outputs += [latent, rope_key]
        kv = b("reshape", b("linear", latent, self.p(pre + "kv_b_proj.weight", (H * (N + V), R)),
                            name="kv"), shape=["B", S, H, N + V], name="kv")
        k = b("slice", kv, dim=-1, start=0, end=N, name="k_nope")
        v = b("slice", kv, dim=-1, start=N, end=N + V, name="v")
        kr = b("expand", b("reshape", rope_key, shape=["B", S, 1, P], name="k_rope"),
               shape=["B", S, H, P], name="k_rope")
        k = b("concat", k, kr, dim=-1, name="k")
        o = b("causal_attention", q, k, v, self.pos, scale=(N + P) ** -0.5, name="attn")
        o = b("reshape", o, shape=["B", T, H * V], name="o")
        if last:
            o = b("take_last", o, dim=1, name="o_last")
        return b("linear", o, self.p(pre + "o_proj.weight", (D, H * V)), name="out")

    def mlp(self, pre: str, x: str, inter: int, names=("gate_proj", "up_proj", "down_proj")) -> str:
        b, D = self.b, self.cfg.hidden_size
        gate = b("linear", x, self.p(pre + names[0] + ".weight", (inter, D)), name="gate")
        up = b("linear", x, self.p(pre + names[1] + ".weight", (inter, D)), name="up")
        h = b("mul", b("silu", gate, name="gate"), up, name="act")
        return b("linear", h, self.p(pre + names[2] + ".weight", (D, inter)), name="down")

    def moe(self, pre: str, x: str) -> str:
        cfg, b = self.cfg, self.b
        D, E, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        with b.scope("router"):
            # official modeling code: weights from the biased scores; vLLM: from the unbiased
            ids, w = route(b, x, self.p(pre + "gate.weight", (E, D)),
                           self.p(pre + "gate.e_score_correction_bias", (E,), self.acc),
                           {"top_k": cfg.num_experts_per_token, "n_group": cfg.num_expert_group,
                            "topk_group": cfg.topk_group, "renormalize": cfg.moe_renormalize,
                            "scaling": cfg.routed_scaling_factor, "weights": self.router_weights})
        if cfg.num_shared_experts:
            with b.scope("shared"):
                y = self.mlp(pre + "shared_experts.", x, I * cfg.num_shared_experts)
        else:
            y = b("zeros_like", x, name="acc")
        with b.scope("experts"):
            for e in range(E):
                ep = pre + f"experts.{e}."
                y = b("moe_expert", y, x, ids, w, self.p(ep + "w1.weight", (I, D)),
                      self.p(ep + "w3.weight", (I, D)), self.p(ep + "w2.weight", (D, I)),
                      expert=e, num_experts=E, name="acc")
        return y


def build_graph(cfg: KimiLinearConfig, mode: str = "prefill", *, stateful: bool = False,
                dtype: str = "f32", router_weights: str = "official", logits: str = "all") -> Graph:
    """Declare Kimi Linear as a graph (see the module docstring for the modes and `logits`)."""
    with gc_paused():
        return ModelDeclaration(cfg, mode, stateful, dtype, router_weights, logits).build()
