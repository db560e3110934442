"""Weights: HF safetensors checkpoints (single file or sharded, memory-mapped) and seeded
random initialisation for presets and tests. Parameter names are the HF names."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint_names import intake
from .ir import Graph, TensorType
from .ops import TORCH_DTYPES

PROGRESS_MIN_BYTES = 1 << 30   # show a progress bar for checkpoints above 1 GiB


class WeightError(ValueError):
    """Missing, unexpected, misshaped or unreadable weights."""


def param_shapes(g: Graph) -> dict[str, TensorType]:
    return {n[1:]: t for n, t in g.params.items()}


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise WeightError(f"shards named in {index.name} are missing: {missing}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightError(f"no safetensors weights in {path}")
    return files


def load_safetensors(path: str | Path, g: Graph, device: str = "cpu",
                     progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Load every parameter of `g` from an HF checkpoint directory, memory-mapped, converted
    to the dtype the graph declares for it.

    Raises one WeightError naming every missing, unexpected, misshaped, non-float and
    duplicated tensor (shapes are read from the headers; nothing misshaped is loaded)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    files = checkpoint_files(path)
    want = param_shapes(g)
    total = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else total >= PROGRESS_MIN_BYTES
    out: dict[str, torch.Tensor] = {}
    found: dict[str, tuple[int, ...]] = {}
    problems: dict[str, list[str]] = {"unexpected": [], "not floating point": [], "in two files": []}
    bar = _progress(total, show)
    try:
        for f in files:
            try:
                with safe_open(str(f), framework="pt", device="cpu") as handle:
                    for key in handle.keys():
                        header = handle.get_slice(key)
                        parts = intake(key, tuple(header.get_shape()), want)   # peers' names too
                        if parts is None:
                            problems["unexpected"].append(key)
                            continue
                        for name, index, shape in parts:
                            if name in found:
                                problems["in two files"].append(name)
                                continue
                            found[name] = shape
                            stored = header.get_dtype()
                            if not (stored.startswith("F") or stored == "BF16"):
                                problems["not floating point"].append(f"{name}: stored as {stored}")
                            elif found[name] == tuple(want[name].shape):
                                t = header[index] if index else handle.get_tensor(key)
                                out[name] = t.to(device=device, dtype=TORCH_DTYPES[want[name].dtype])
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise WeightError(f"cannot read {f}: {e}") from None
            bar(f.stat().st_size)
    finally:
        bar(None)
    problems["missing"] = [n for n in want if n not in found]
    problems["misshaped"] = [f"{n}: expected {list(want[n].shape)}, got {list(found[n])}"
                             for n in found if found[n] != tuple(want[n].shape)]
    parts = [f"{kind} ({len(names)}): " + ", ".join(_trim(sorted(names)))
             for kind, names in problems.items() if names]
    if parts:
        raise WeightError(f"checkpoint {path} does not match the model:\n  " + "\n  ".join(parts))
    return out


def _trim(items: list[str], n: int = 20) -> list[str]:
    return items if len(items) <= n else items[:n] + [f"... and {len(items) - n} more"]


def _progress(total: int, show: bool):
    if not show:
        return lambda n: None
    from rich.progress import Progress
    prog = Progress(transient=True)
    prog.start()
    task = prog.add_task("loading weights", total=total)

    def advance(n):
        if n is None:
            prog.stop()
        else:
            prog.advance(task, n)
    return advance


def random_weights(g: Graph, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random weights with the scales of a trained model (so signals stay O(1))."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, ty in param_shapes(g).items():
        shape = tuple(ty.shape)
        leaf = name.rsplit(".", 2)
        kind = leaf[-2] if leaf[-1] == "weight" else leaf[-1]
        if kind.endswith("norm") or kind.endswith("layernorm"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif kind == "A_log":
            t = torch.empty(shape, dtype=torch.float64).uniform_(1, 16, generator=gen).log()
        elif kind == "dt_bias":
            t = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif kind == "e_score_correction_bias":
            t = 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)
        elif kind.endswith("conv1d"):
            t = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1])
        elif kind == "embed_tokens":
            t = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:   # linear [out, in]
            t = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1])
        out[name] = t.to(device=device, dtype=TORCH_DTYPES[ty.dtype])
    return out


def save_safetensors(weights: Mapping[str, torch.Tensor], path: str | Path,
                     max_shard_bytes: int | None = None) -> None:
    """Write weights in HF layout: one model.safetensors, or shards plus an index."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    items = {k: v.contiguous() for k, v in weights.items()}
    if not max_shard_bytes:
        save_file(items, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict] = [{}]
    size = 0
    for k, v in items.items():
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in items.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
