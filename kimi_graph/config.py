"""KimiLinearConfig: every field of the HF `config.json`, validated with clear errors.

Layer lists in `linear_attn_config` are 1-based, as in the published checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that does not describe a valid Kimi Linear model."""


REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size")


@dataclass
class KimiLinearConfig:
    vocab_size: int = 163840
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    model_max_length: int = 1048576
    # MoE
    moe_intermediate_size: int | None = None
    moe_renormalize: bool = True
    moe_router_activation_func: str = "sigmoid"
    num_experts: int | None = None
    num_experts_per_token: int | None = None
    num_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    mla_use_nope: bool = False
    num_nextn_predict_layers: int = 0
    # KDA
    linear_attn_config: dict | None = None
    extra: dict = field(default_factory=dict)   # keys we keep but do not interpret

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "KimiLinearConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ConfigError(f"config is missing required key(s): {', '.join(missing)}")
        known = {f.name for f in fields(cls)} - {"extra"}
        cfg = cls(**{k: v for k, v in d.items() if k in known},
                  extra={k: v for k, v in d.items() if k not in known})
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "KimiLinearConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    # -- derived facts ---------------------------------------------------------
    @property
    def kda(self) -> dict:
        return self.linear_attn_config or {}

    def is_kda_layer(self, i: int) -> bool:
        """0-based layer index -> True if KDA (the config's lists are 1-based)."""
        return (i + 1) in set(self.kda.get("kda_layers", []))

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.num_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def layer_kinds(self) -> list[str]:
        return ["kda" if self.is_kda_layer(i) else "mla" for i in range(self.num_hidden_layers)]

    @property
    def kda_heads(self) -> int:
        return self.kda["num_heads"]

    @property
    def kda_head_dim(self) -> int:
        return self.kda["head_dim"]

    @property
    def conv_kernel(self) -> int:
        return self.kda.get("short_conv_kernel_size", 4)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    # -- validation --------------------------------------------------------------
    def validate(self) -> None:
        errs: list[str] = []

        def positive(*names):
            for n in names:
                v = getattr(self, n)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    errs.append(f"{n} must be a positive integer, got {v!r}")

        positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            errs.append(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        for n in ("tie_word_embeddings", "moe_renormalize", "mla_use_nope", "use_grouped_topk"):
            if not isinstance(getattr(self, n), bool):
                errs.append(f"{n} must be true or false, got {getattr(self, n)!r}")
        if isinstance(self.routed_scaling_factor, bool) or \
                not isinstance(self.routed_scaling_factor, (int, float)) or self.routed_scaling_factor <= 0:
            errs.append(f"routed_scaling_factor must be a number > 0, got {self.routed_scaling_factor!r}")
        if self.hidden_act != "silu":
            errs.append(f"hidden_act {self.hidden_act!r} is not supported (Kimi Linear uses 'silu')")
        N = self.num_hidden_layers if isinstance(self.num_hidden_layers, int) else 0
        lac = self.linear_attn_config
        kda_layers: list = []
        full_layers: list = list(range(1, N + 1))
        if lac is not None:
            if not isinstance(lac, dict):
                errs.append("linear_attn_config must be an object")
                lac = {}
            for k in ("kda_layers", "full_attn_layers", "num_heads", "head_dim"):
                if k not in lac:
                    errs.append(f"linear_attn_config is missing {k!r}")
            kda_layers, full_layers = lac.get("kda_layers", []), lac.get("full_attn_layers", [])
            if not isinstance(kda_layers, list) or not isinstance(full_layers, list):
                errs.append("linear_attn_config.kda_layers and full_attn_layers must be lists of "
                            f"layer numbers, got {kda_layers!r} and {full_layers!r}")
                kda_layers, full_layers = [], []
            for k in ("num_heads", "head_dim", "short_conv_kernel_size"):
                v = lac.get(k, 4)
                if not isinstance(v, int) or v <= 0:
                    errs.append(f"linear_attn_config.{k} must be a positive integer, got {v!r}")
            both = set(kda_layers) & set(full_layers)
            if both:
                errs.append(f"layers {sorted(both)} are in both kda_layers and full_attn_layers")
            listed = set(kda_layers) | set(full_layers)
            if not all(isinstance(x, int) for x in listed):
                errs.append("layer lists must hold integers")
            else:
                uncovered = sorted(set(range(1, N + 1)) - listed)
                outside = sorted(x for x in listed if not 1 <= x <= N)
                if uncovered:
                    errs.append(f"layers {uncovered} (1-based) are in neither kda_layers nor "
                                f"full_attn_layers; together they must cover 1..{N}")
                if outside:
                    errs.append(f"layer numbers {outside} are outside 1..{N} (lists are 1-based)")
            if len(set(kda_layers)) != len(kda_layers) or len(set(full_layers)) != len(full_layers):
                errs.append("layer lists contain duplicates")
        if full_layers:
            for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, n) is None:
                    errs.append(f"MLA layers need {n}")
            positive(*(n for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                   "v_head_dim") if getattr(self, n) is not None))
            if self.q_lora_rank is not None:
                errs.append("q_lora_rank must be null: Kimi Linear's MLA has no query compression")
            if not self.mla_use_nope:
                errs.append("mla_use_nope must be true: kimi-graph implements Kimi Linear's NoPE MLA")
        if self.num_experts:
            positive("num_experts", "num_experts_per_token", "moe_intermediate_size",
                     "num_expert_group", "topk_group", "moe_layer_freq")
            if not errs:
                E, k = self.num_experts, self.num_experts_per_token
                if k > E:
                    errs.append(f"num_experts_per_token ({k}) > num_experts ({E})")
                if E % self.num_expert_group:
                    errs.append(f"num_experts ({E}) is not divisible by num_expert_group "
                                f"({self.num_expert_group})")
                elif self.topk_group > self.num_expert_group:
                    errs.append(f"topk_group ({self.topk_group}) > num_expert_group "
                                f"({self.num_expert_group})")
                elif k > self.topk_group * (E // self.num_expert_group):
                    errs.append(f"num_experts_per_token ({k}) exceeds the experts in "
                                f"{self.topk_group} selected group(s)")
            if self.moe_router_activation_func != "sigmoid":
                errs.append(f"moe_router_activation_func {self.moe_router_activation_func!r} is "
                            "not supported (Kimi Linear uses 'sigmoid')")
            if not isinstance(self.first_k_dense_replace, int) or self.first_k_dense_replace < 0:
                errs.append(f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace!r}")
            n = self.num_shared_experts
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                errs.append(f"num_shared_experts must be an integer >= 0, got {n!r}")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and isinstance(self.vocab_size, int) and not 0 <= v < self.vocab_size:
                errs.append(f"{name} {v} is outside the vocabulary [0, {self.vocab_size})")
        if errs:
            raise ConfigError("invalid Kimi Linear config:\n  " + "\n  ".join(errs))
