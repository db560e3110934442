"""Public API: `kimi_graph.load(...)` -> KimiModel (config, graph, weights, forward)."""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch

from .config import ConfigError, KimiLinearConfig
from .interpreter import run_graph
from .ir import Graph
from .model import build_graph
from .ops import IR_DTYPES
from .presets import PRESETS
from .weights import load_safetensors, random_weights


def resolve_config(model: str | Path) -> tuple[KimiLinearConfig, Path | None]:
    """A preset name or a model directory (with config.json) -> (config, directory or None)."""
    if isinstance(model, KimiLinearConfig):
        return model, None
    name = str(model)
    if name in PRESETS:
        return KimiLinearConfig.from_dict(json.loads(json.dumps(PRESETS[name]))), None
    path = Path(name)
    if path.is_dir():
        return KimiLinearConfig.from_json(path / "config.json"), path
    if path.is_file() and path.name == "config.json":
        return KimiLinearConfig.from_json(path), path.parent
    raise ConfigError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")


class KimiModel:
    """A loaded Kimi Linear model: `model(input_ids) -> logits` through the chosen backend."""

    def __init__(self, config: KimiLinearConfig, weights: dict[str, torch.Tensor], *,
                 dtype: torch.dtype, device: str, router_weights: str, path: Path | None = None):
        self.config, self.weights, self.dtype = config, weights, dtype
        self.device, self.router_weights, self.path = device, router_weights, path

    def build(self, mode: str = "prefill", stateful: bool = False) -> Graph:
        return build_graph(self.config, mode, stateful=stateful, dtype=IR_DTYPES[self.dtype],
                           router_weights=self.router_weights)

    @cached_property
    def graph(self) -> Graph:
        """The stateless prefill graph (input_ids -> logits)."""
        return self.build()

    def check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {tuple(ids.shape)} {ids.dtype}")
        if ids.numel() == 0:
            raise ValueError("input_ids is empty")
        V = self.config.vocab_size
        bad = ids[(ids < 0) | (ids >= V)]
        if bad.numel():
            raise ValueError(f"token ids out of range [0, {V}): {bad.unique().tolist()[:8]}")
        return ids.to(device=self.device, dtype=torch.int64)

    @torch.no_grad()
    def __call__(self, input_ids) -> torch.Tensor:
        ids = self.check_ids(input_ids)
        return run_graph(self.graph, {"input_ids": ids}, self.weights)[0]

    def __repr__(self) -> str:
        c = self.config
        return (f"KimiModel({c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{self.dtype}, {self.device}, router_weights={self.router_weights!r})")


def load(model: str | Path = "tiny", *, dtype: torch.dtype = torch.float32, device: str = "cpu",
         router_weights: str = "official", seed: int = 0) -> KimiModel:
    """Load a model directory (HF layout: config.json + safetensors) or a preset.

    Presets get seeded random weights. `router_weights`: "official" (the official modeling
    code: routing weights from the bias-corrected scores) or "unbiased" (vLLM's)."""
    if dtype not in IR_DTYPES or dtype in (torch.int64, torch.int32, torch.bool):
        raise ValueError(f"unsupported dtype {dtype}")
    config, path = resolve_config(model)
    m = KimiModel(config, {}, dtype=dtype, device=device, router_weights=router_weights, path=path)
    g = m.graph
    m.weights = load_safetensors(path, g, device) if path is not None else \
        random_weights(g, seed=seed, device=device)
    return m
