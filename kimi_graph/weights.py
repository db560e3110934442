"""Weights: sources of a graph's declared parameters -- HF safetensors checkpoints (single
file or sharded, memory-mapped) and seeded random initialisation for presets and tests --
and saving. Parameter names are the HF names. kimi_graph.loading assembles a model's
weights from a source."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint_names import intake
from .ir import Graph, TensorType
from .ops import TORCH_DTYPES


class WeightError(ValueError):
    """Missing, unexpected, misshaped or unreadable weights."""


def param_shapes(g: Graph) -> dict[str, TensorType]:
    return {n[1:]: t for n, t in g.params.items()}


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightError(f"{index} is not a valid safetensors index: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise WeightError(f"{index}: weight_map must be an object (tensor name -> shard file), "
                              f"got {type(weight_map).__name__}")
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


class WeightSource:
    """The parameters a graph declares (name -> TensorType) and a way to produce each one on
    `device` in its declared dtype: `fetch(name)`. On the meta device nothing is read.

    A sharded graph (passes/shard.py) declares one rank's slice of some parameters
    (`slices`: name -> [dim, start, end, whole size]; `whole(name)`: the checkpoint's type) and
    leaves out others (`elsewhere`: other ranks' experts); a source produces just its part."""

    def __init__(self, g: Graph, device: str | torch.device = "cpu"):
        self.types, self.device = param_shapes(g), torch.device(device)
        shard = g.meta.get("shard", {})
        self.slices = {n: tuple(s) for n, s in shard.get("slices", {}).items()}
        self.elsewhere = set(shard.get("elsewhere", ()))    # parameters other ranks hold

    def whole(self, name: str) -> TensorType:
        """The checkpoint's type of a parameter (its declared type unless sliced)."""
        ty = self.types[name]
        if name not in self.slices:
            return ty
        d, _, _, size = self.slices[name]
        shape = list(ty.shape)
        shape[d] = size
        return ty.with_shape(shape)

    def index(self, name: str) -> tuple[slice, ...] | None:
        """The slice of the whole tensor this rank reads, as an index (None: all of it)."""
        if name not in self.slices:
            return None
        d, start, end, _ = self.slices[name]
        return (slice(None),) * d + (slice(start, end),)

    def empty(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        ty = self.types[name]
        return torch.empty(tuple(ty.shape), dtype=TORCH_DTYPES[ty.dtype],
                           device=self.device if device is None else device)

    def fetch(self, name: str) -> torch.Tensor:
        if name not in self.types:
            raise WeightError(f"no parameter {name!r} is declared")
        return self.empty(name) if self.device.type == "meta" else self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self, name: str) -> int:
        return self.types[name].nbytes()


class CheckpointSource(WeightSource):
    """An HF checkpoint directory (single file or shards), memory-mapped: each tensor is read
    when fetched (a part of a peer's packed tensor through a safetensors slice; names as
    kimi_graph.checkpoint_names maps them) and converted to the dtype the graph declares.

    Opening it reads only the headers and raises one WeightError naming every missing,
    unexpected, misshaped, non-float and duplicated tensor.

    A pre-quantized checkpoint (`scheme`, kimi_graph/compressed.py) stores linears as packed
    codes and scales: they are dequantized as they are read, or, for the routed experts' packed
    parameters that quantize-experts derives (`offer`), given as they are (`direct`)."""

    def __init__(self, path: str | Path, g: Graph, device: str | torch.device = "cpu", scheme=None):
        from safetensors import SafetensorError, safe_open

        from .compressed import SUFFIXES

        super().__init__(g, device)
        self.path, self.scheme = Path(path), scheme
        self.packed: dict[str, dict[str, tuple]] = {}     # parameter -> {suffix: (handle, key)}
        self.direct: dict[str, list[list[str]]] = {}      # derived parameter -> per expert, its parts
        stored_packed: dict[str, dict[str, tuple]] = {}
        self.where: dict[str, tuple] = {}       # parameter -> (file handle, stored name, index)
        found: dict[str, tuple[int, ...]] = {}
        problems: dict[str, list[str]] = {"unexpected": [], "not floating point": [], "in two files": []}
        known = {**self.types, **dict.fromkeys(self.elsewhere)}
        for f in checkpoint_files(self.path):
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
                for key in handle.keys():
                    base, _, suffix = key.rpartition(".")
                    if suffix in SUFFIXES:
                        stored_packed.setdefault(base, {})[suffix] = (handle, key)
                        continue
                    header = handle.get_slice(key)
                    provided = intake(key, tuple(header.get_shape()), known)   # peers' names too
                    if provided is None:
                        problems["unexpected"].append(key)
                        continue
                    for name, index, shape in provided:
                        if name in self.elsewhere:
                            continue
                        if name in found:
                            problems["in two files"].append(name)
                            continue
                        found[name] = shape
                        stored = header.get_dtype()
                        if not (stored.startswith("F") or stored == "BF16"):
                            problems["not floating point"].append(f"{name}: stored as {stored}")
                        self.where[name] = (handle, key, index)
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise WeightError(f"cannot read {f}: {e}") from None
        self._intake_packed(stored_packed, found, problems)
        problems["missing"] = [n for n in self.types if n not in found]
        problems["misshaped"] = [f"{n}: expected {list(self.whole(n).shape)}, got {list(found[n])}"
                                 for n in found if found[n] != tuple(self.whole(n).shape)]
        parts = [f"{kind} ({len(names)}): " + ", ".join(_trim(sorted(names)))
                 for kind, names in problems.items() if names]
        if parts:
            raise WeightError(f"checkpoint {self.path} does not match the model:\n  " + "\n  ".join(parts))

    def _intake_packed(self, stored: dict, found: dict, problems: dict) -> None:
        """Map packed linears (`X.weight_packed`, ...) to the parameters `X.weight` they hold."""
        if stored and self.scheme is None:
            problems.setdefault("packed without a quantization_config", []).extend(stored)
            return
        for base, parts in stored.items():
            if "weight_zero_point" in parts or "weight_g_idx" in parts or "weight_packed" not in parts \
                    or "weight_scale" not in parts:
                problems.setdefault("packed, not symmetric codes + scales", []).append(base)
                continue
            handle, key = parts["weight_packed"]
            rows, words = handle.get_slice(key).get_shape()
            shape = tuple(int(v) for v in handle.get_tensor(parts["weight_shape"][1])) if "weight_shape" in parts \
                else (rows, words * 32 // self.scheme.bits)
            provided = intake(base + ".weight", shape, self.types)
            if provided is None or any(index for _, index, _ in provided):
                problems["unexpected"].append(base + ".weight_packed")
                continue
            for name, _, shp in provided:
                found[name] = shp
                self.packed[name] = parts

    def offer(self, params: Mapping[str, TensorType]) -> None:
        """Give the routed experts' packed parameters among `params` (name -> type) straight
        from the checkpoint's codes and scales where every expert's tensors are packed in the
        layout the type says (kimi_graph/compressed.py)."""
        from .compressed import experts_part
        for name, ty in params.items():
            part = experts_part(name)
            if part is None or name in self.types:
                continue
            prefix, w, _ = part
            per_expert = [[f"{prefix}{e}.{p}.weight" for p in (("w1", "w3") if w == "w13" else ("w2",))]
                          for e in range(ty.shape[0])]
            if all(n in self.packed for ns in per_expert for n in ns):
                self.direct[name] = per_expert
                self.types[name] = ty
                got = self._read(name, "meta")
                if tuple(got.shape) != tuple(ty.shape):     # another group size or width
                    del self.direct[name], self.types[name]

    def _packed_tensor(self, name: str, suffix: str, device) -> torch.Tensor:
        handle, key = self.packed[name][suffix]
        if torch.device(device).type == "meta":
            return torch.empty(handle.get_slice(key).get_shape(), dtype=torch.int32, device="meta")
        return handle.get_tensor(key).to(device)

    def _read(self, name: str, device=None) -> torch.Tensor:
        from .compressed import codes
        from .ops.quant import dequantize
        device = self.device if device is None else device
        ty = self.types[name]
        if name in self.direct:         # stacked per expert: [w1; w3] or w2
            part = name.rsplit(".", 1)[1]
            suffix = "weight_packed" if part == "codes" else "weight_scale"
            out = []
            for names in self.direct[name]:
                ts = [self._packed_tensor(n, suffix, device) for n in names]
                ts = [codes(t) if part == "codes" and t.device.type != "meta" else
                      t.view(torch.uint8) if part == "codes" else t for t in ts]
                out.append(torch.cat(ts, 0))
            return torch.stack(out).to(dtype=TORCH_DTYPES[ty.dtype])
        if name in self.packed:
            c = codes(self._packed_tensor(name, "weight_packed", device))
            s = self._packed_tensor(name, "weight_scale", device)
            K = ty.shape[-1]
            if K % s.shape[-1] or c.shape[-1] * 8 // self.scheme.bits != K:
                raise WeightError(f"{name}: packed codes {list(c.shape)} / scales {list(s.shape)} do not "
                                  f"fit {list(ty.shape)}")
            w = dequantize(c, s.float(), None, self.scheme.format, K // s.shape[-1])
            return w.to(dtype=TORCH_DTYPES[ty.dtype])
        handle, key, index = self.where[name]
        part = self.index(name)         # a rank's slice: read only those bytes where it can
        try:
            if index:
                t = handle.get_slice(key)[index]
                t = t[part].contiguous() if part else t
            else:
                t = handle.get_slice(key)[part] if part else handle.get_tensor(key)
        except Exception as e:          # safetensors raises its own error types
            raise WeightError(f"cannot read {name} from {self.path}: {e}") from None
        return t.to(device=self.device, dtype=TORCH_DTYPES[ty.dtype])


class RandomSource(WeightSource):
    """Seeded random weights (see `random_tensor`), drawn on the device in their dtype."""

    def __init__(self, g: Graph, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__(g, device)
        self.seed = seed

    def _read(self, name: str) -> torch.Tensor:
        """A rank's slice is cut from the whole draw, so every rank's slices agree."""
        t = random_tensor(name, self.whole(name), self.seed, self.device)
        part = self.index(name)
        return t if part is None else t[part].clone()


def load_safetensors(path: str | Path, g: Graph, device: str = "cpu",
                     progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Every parameter of `g` from an HF checkpoint directory, memory-mapped, converted to the
    dtype the graph declares for it (see CheckpointSource for the checks)."""
    from .loading import load_weights
    return load_weights(CheckpointSource(path, g, device), progress=progress)


def _trim(items: list[str], n: int = 20) -> list[str]:
    return items if len(items) <= n else items[:n] + [f"... and {len(items) - n} more"]


def random_tensor(name: str, ty: TensorType, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """One parameter's seeded random tensor with the scales of a trained model (so signals
    stay O(1)), drawn on `device` in its dtype. Each (seed, name) has its own generator, so
    any subset of parameters, drawn in any order, gets the same tensors."""
    device = torch.device(device)
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
    shape, dtype = tuple(ty.shape), TORCH_DTYPES[ty.dtype]
    # half types are drawn in fp32 and rounded: a bf16 model is the fp32 model rounded (the
    # generators' streams differ per dtype on CUDA)
    t = torch.empty(shape, dtype=torch.float32 if dtype.itemsize < 4 else dtype, device=device)
    leaf = name.rsplit(".", 2)
    kind = leaf[-2] if leaf[-1] == "weight" else leaf[-1]
    if kind.endswith("norm") or kind.endswith("layernorm"):
        t.normal_(1.0, 0.1, generator=gen)
    elif kind == "A_log":
        t.uniform_(1, 16, generator=gen).log_()
    else:
        std = {"dt_bias": 0.5, "e_score_correction_bias": 0.05, "embed_tokens": 1.0}.get(kind)
        t.normal_(0.0, std if std is not None else 1 / math.sqrt(shape[-1]), generator=gen)
    return t.to(dtype)


def random_weights(g: Graph, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random weights for every parameter of `g` (see `random_tensor`)."""
    return {name: random_tensor(name, ty, seed, device) for name, ty in param_shapes(g).items()}


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
