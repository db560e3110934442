"""KimiLinearConfig: every field of the HF `config.json`, validated with clear errors.

Two forms are read: the published (remote-code) one, with `linear_attn_config` (layer lists
1-based) and `first_k_dense_replace`, and transformers >= 5's, with `layer_types`,
`mlp_layer_types` and `linear_{head_dim,num_heads,conv_kernel_dim}` (plus its attribute
aliases such as `n_group`). The second is rewritten into the first on reading; `to_dict`
writes the published form (with `mlp_layer_types` when the layers do not follow
`first_k_dense_replace`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that does not describe a valid Kimi Linear model."""


REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size")
MODEL_TYPES = ("kimi_linear",)
ARCHITECTURES = ("KimiLinearForCausalLM", "KimiLinearModel")
# transformers' attribute_map: alias -> the name config.json normally carries
ALIASES = {"n_group": "num_expert_group", "num_local_experts": "num_experts",
           "num_experts_per_tok": "num_experts_per_token", "norm_topk_prob": "moe_renormalize",
           "n_shared_experts": "num_shared_experts", "max_position_embeddings": "model_max_length"}
# transformers' layer_types / mlp_layer_types entries, and its defaults for the KDA fields
LAYER_TYPES = {"linear_attention": "kda_layers", "full_attention": "full_attn_layers"}
MLP_LAYER_TYPES = ("dense", "sparse")
LINEAR_FIELDS = {"linear_num_heads": ("num_heads", 32), "linear_head_dim": ("head_dim", 128),
                 "linear_conv_kernel_dim": ("short_conv_kernel_size", 4)}


def brief(items, n: int = 8, total: int | None = None) -> str:
    """A list for an error message, at most `n` items shown: `[1, 2, ... (1000 in all)]`
    (`total`: the length of the whole list when `items` is its beginning)."""
    items = list(items)
    total = len(items) if total is None else total
    if total <= n:
        return repr(items)
    return "[" + ", ".join(map(repr, items[:n])) + f", ... ({total} in all)]"


def short(v, n: int = 60) -> str:
    """repr(v) cut to about `n` characters."""
    r = repr(v) if not isinstance(v, (list, tuple)) else brief(v)
    return r if len(r) <= n else r[:n] + f"... ({len(r)} characters)"


def from_transformers(d: dict) -> dict:
    """A config in transformers >= 5's form -> the published form (a new dict; others as
    given). Raises ConfigError when the two forms in one file disagree."""
    d = dict(d)
    errs = []
    for alias, name in ALIASES.items():
        if alias in d:
            v = d.pop(alias)
            if name in d and d[name] != v:
                errs.append(f"{alias} ({short(v)}) and {name} ({short(d[name])}) disagree")
            d.setdefault(name, v)
    linear = {LINEAR_FIELDS[k][0]: d.pop(k) for k in list(d) if k in LINEAR_FIELDS}
    types = d.pop("layer_types", None)
    if types is not None:
        if not isinstance(types, list) or not all(t in LAYER_TYPES for t in types):
            errs.append(f"layer_types must be a list of {' or '.join(map(repr, LAYER_TYPES))}, "
                        f"got {short(types)}")
        else:
            lac = {key: [i + 1 for i, t in enumerate(types) if LAYER_TYPES[t] == key]
                   for key in LAYER_TYPES.values()}
            lac.update({k: linear.get(k, dflt) for k, dflt in LINEAR_FIELDS.values()})
            given = d.get("linear_attn_config")
            if given is None:
                d["linear_attn_config"] = lac
            elif not isinstance(given, dict) or any(sorted(given.get(k) or []) != lac[k]
                                                    for k in LAYER_TYPES.values()):
                errs.append("layer_types and linear_attn_config name different layers")
            d.setdefault("mla_use_nope", True)      # transformers' MLA is Kimi Linear's NoPE MLA
    elif linear and d.get("linear_attn_config") is None:
        errs.append(f"{', '.join(k for k in LINEAR_FIELDS)} describe KDA layers, but no "
                    "layer_types or linear_attn_config says which layers are KDA")
    if errs:
        raise ConfigError("invalid Kimi Linear config:\n  " + "\n  ".join(errs))
    return d


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
    mlp_layer_types: list | None = None     # transformers' per-layer "dense" / "sparse"
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
        d = from_transformers(d)
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

    # -- derived facts ---------------------------------------------------------
    @property
    def kda(self) -> dict:
        return self.linear_attn_config or {}

    def is_kda_layer(self, i: int) -> bool:
        """0-based layer index -> True if KDA (the config's lists are 1-based)."""
        return (i + 1) in set(self.kda.get("kda_layers", []))

    def is_moe_layer(self, i: int) -> bool:
        if self.mlp_layer_types is not None:
            return self.mlp_layer_types[i] == "sparse"
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        if d["mlp_layer_types"] is None:
            del d["mlp_layer_types"]
        return d

    # -- validation --------------------------------------------------------------
    def validate(self) -> None:
        """Raise one ConfigError naming every problem (long lists and values summarised)."""
        errs: list[str] = []

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def positive(*names):
            for n in names:
                v = getattr(self, n)
                if not is_int(v) or v <= 0:
                    errs.append(f"{n} must be a positive integer, got {short(v)}")

        def finite_positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                errs.append(f"{name} must be a finite number > 0, got {short(v)}")

        model_type = self.extra.get("model_type")
        if model_type is not None and model_type not in MODEL_TYPES:
            errs.append(f"model_type {short(model_type)} is not Kimi Linear's "
                        f"({', '.join(map(repr, MODEL_TYPES))})")
        arch = self.extra.get("architectures")
        if arch is not None and (not isinstance(arch, list)
                                 or not any(a in ARCHITECTURES for a in arch)):
            errs.append(f"architectures {short(arch)} names no Kimi Linear model "
                        f"({', '.join(map(repr, ARCHITECTURES))})")
        positive("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "model_max_length")
        kv = self.num_key_value_heads
        if kv is not None and kv != self.num_attention_heads:
            errs.append(f"num_key_value_heads ({short(kv)}) must equal num_attention_heads "
                        f"({short(self.num_attention_heads)}): MLA has a key and value per head")
        if self.extra.get("attention_bias"):
            errs.append("attention_bias must be false: Kimi Linear's MLA has no biases")
        if not (isinstance(self.rms_norm_eps, (int, float)) and not isinstance(self.rms_norm_eps, bool)
                and self.rms_norm_eps > 0):
            errs.append(f"rms_norm_eps must be > 0, got {short(self.rms_norm_eps)}")
        elif not math.isfinite(self.rms_norm_eps):
            errs.append(f"rms_norm_eps must be finite, got {self.rms_norm_eps!r}")
        for n in ("tie_word_embeddings", "moe_renormalize", "mla_use_nope", "use_grouped_topk"):
            if not isinstance(getattr(self, n), bool):
                errs.append(f"{n} must be true or false, got {short(getattr(self, n))}")
        finite_positive("routed_scaling_factor")
        if self.hidden_act != "silu":
            errs.append(f"hidden_act {short(self.hidden_act)} is not supported (Kimi Linear uses 'silu')")
        N = self.num_hidden_layers if is_int(self.num_hidden_layers) and self.num_hidden_layers > 0 else 0
        errs += self._layer_errors(N)
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
                errs.append(f"moe_router_activation_func {short(self.moe_router_activation_func)} is "
                            "not supported (Kimi Linear uses 'sigmoid')")
            if not is_int(self.first_k_dense_replace) or self.first_k_dense_replace < 0:
                errs.append(f"first_k_dense_replace must be >= 0, got {short(self.first_k_dense_replace)}")
            n = self.num_shared_experts
            if n is not None and (not is_int(n) or n < 0):
                errs.append(f"num_shared_experts must be an integer >= 0, got {short(n)}")
        mlp = self.mlp_layer_types
        if mlp is not None:
            if not isinstance(mlp, list) or len(mlp) != N or not all(t in MLP_LAYER_TYPES for t in mlp):
                errs.append(f"mlp_layer_types must be a list of {N} 'dense' or 'sparse', got {short(mlp)}")
            elif "sparse" in mlp and not self.num_experts:
                errs.append("mlp_layer_types has 'sparse' (MoE) layers but num_experts is not set")
        errs += self._token_id_errors()
        if errs:
            raise ConfigError("invalid Kimi Linear config:\n  " + "\n  ".join(errs[:20])
                              + (f"\n  ... and {len(errs) - 20} more" if len(errs) > 20 else ""))

    def _layer_errors(self, N: int) -> list[str]:
        """The KDA / MLA layer split (linear_attn_config) and the MLA fields it needs."""
        errs: list[str] = []
        lac = self.linear_attn_config
        full_layers: list = [1] if N else []     # no linear_attn_config: every layer is MLA
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
                            f"layer numbers, got {short(kda_layers)} and {short(full_layers)}")
                kda_layers, full_layers = [], []
            for k in ("num_heads", "head_dim", "short_conv_kernel_size"):
                v = lac.get(k, 4)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    errs.append(f"linear_attn_config.{k} must be a positive integer, got {short(v)}")
            listed = kda_layers + full_layers
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in listed):
                errs.append("layer lists must hold integers")
            else:
                both = sorted(set(kda_layers) & set(full_layers))
                if both:
                    errs.append(f"layers {brief(both)} are in both kda_layers and full_attn_layers")
                inside = {x for x in listed if 1 <= x <= N}
                if len(inside) < N:            # the first few uncovered, without a set of all N
                    first = [x for x in range(1, len(inside) + 10) if x <= N and x not in inside]
                    errs.append(f"layers {brief(first, total=N - len(inside))} "
                                "(1-based) are in neither kda_layers nor full_attn_layers; "
                                f"together they must cover 1..{N}")
                outside = sorted(x for x in listed if not 1 <= x <= N)
                if outside:
                    errs.append(f"layer numbers {brief(outside)} are outside 1..{N} (lists are 1-based)")
                if len(set(kda_layers)) != len(kda_layers) or len(set(full_layers)) != len(full_layers):
                    errs.append("layer lists contain duplicates")
        if full_layers:
            for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                v = getattr(self, n)
                if v is None:
                    errs.append(f"MLA layers need {n}")
                elif not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    errs.append(f"{n} must be a positive integer, got {short(v)}")
            if self.q_lora_rank is not None:
                errs.append("q_lora_rank must be null: Kimi Linear's MLA has no query compression")
            if not self.mla_use_nope:
                errs.append("mla_use_nope must be true: kimi-graph implements Kimi Linear's NoPE MLA")
        return errs

    def _token_id_errors(self) -> list[str]:
        """bos, pad and eos ids: integers (eos: one or a list) inside the vocabulary."""
        V = self.vocab_size if isinstance(self.vocab_size, int) and not isinstance(self.vocab_size, bool) \
            else None
        errs = []
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is None:
                continue
            ids = v if name == "eos_token_id" and isinstance(v, list) else [v]
            if not ids or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
                kind = "an integer or a list of integers" if name == "eos_token_id" else "an integer"
                errs.append(f"{name} must be {kind} (a token id), got {short(v)}")
                continue
            bad = [x for x in ids if V is not None and not 0 <= x < V]
            if bad:
                errs.append(f"{name} {short(v if len(ids) == 1 else bad)} is outside the "
                            f"vocabulary [0, {V})")
        return errs
