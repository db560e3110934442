"""An export directory: the stateful prefill (every position's logits, and the last's only)
and decode models, the onnxruntime-genai model and its genai_config.json, the weights,
config.json, the tokenizer files, a manifest.

Weights: below 2 GB each model holds its initializers inline (self-contained files); past
2 GB (protobuf's limit) they go to one `weights.bin` that every model of the directory
references, written once, page-aligned so runtimes can memory-map it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import onnx
import torch
from onnx import TensorProto

from kimi_graph.ops import IR_DTYPES
from kimi_graph.runtime.ort_engine import MANIFEST, export_name, file_sha256, read_export

from .emitter import ONNX_DTYPES, tensor_proto
from .export import default_opset, ir_version_for, lower

WEIGHTS_FILE = "weights.bin"
TWO_GB = 2 ** 31
ALIGN = 4096
INLINE_MAX = 1024          # initializers under this many bytes stay in the model file
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# model name -> graph (mode, stateful, logits): the prefill with every position's logits, the
# prefill with the last position's only (what generation needs), one decode step
MODELS = {export_name(m, lg): (m, True, lg) for m, lg in (("prefill", "all"), ("prefill", "last"),
                                                           ("decode", "all"))}


class WeightsWriter:
    """The `sink` of `lower`: tensors of INLINE_MAX bytes or more go to one file, written
    straight from torch memory; a name already written is referenced again (the prefill,
    decode and genai models share their weights)."""

    def __init__(self, path: Path):
        self.path, self.table = path, {}          # name -> (offset, length, dims, onnx dtype)
        self.f = open(path, "wb")

    def proto(self, name: str, make) -> TensorProto:
        if name not in self.table:
            t = make().detach().cpu().contiguous()
            if t.numel() * t.element_size() < INLINE_MAX:
                return tensor_proto(name, t)
            pos = self.f.tell()
            pad = (-pos) % ALIGN
            self.f.write(b"\0" * pad)
            data = t.reshape(-1).view(torch.uint8).numpy()
            self.f.write(memoryview(data))
            self.table[name] = (pos + pad, data.nbytes, list(t.shape), ONNX_DTYPES[IR_DTYPES[t.dtype]])
        off, n, dims, dt = self.table[name]
        p = TensorProto(name=name, data_type=dt, dims=dims, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.path.name), ("offset", str(off)), ("length", str(n))):
            e = p.external_data.add()
            e.key, e.value = k, v
        return p

    def close(self) -> None:
        self.f.close()


def check(path: Path) -> None:
    """onnx.checker (full check, shape inference included) and strict shape inference on a
    written model; raises on the first problem."""
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)


def _progress(total: int, show: bool):
    if not show:
        class _Null:
            def step(self, what): pass
            def close(self): pass
        return _Null()
    from rich.progress import Progress
    prog = Progress(transient=True)
    prog.start()
    task = prog.add_task("exporting", total=total)

    class _Bar:
        def step(self, what):
            prog.update(task, advance=1, description=what)

        def close(self):
            prog.stop()
    return _Bar()


def export_model(model, out: str | Path, *, ops: str = "ort", opset: int | None = None,
                 genai: bool = True, progress: bool | None = None, check_models: bool = True) -> dict:
    """Write `model` (a KimiModel: graphs through its pipeline, its weights) to directory
    `out`. Returns the manifest (also written as kimi_graph_onnx.json)."""
    from .genai import genai_config, genai_model
    opset = opset or default_opset(ops)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = list(MODELS) + (["genai"] if genai else [])
    weight_bytes = sum(w.numel() * w.element_size() for w in model.weights.values())
    external = weight_bytes >= TWO_GB
    bar = _progress(2 * len(names), progress if progress is not None else weight_bytes > 2 ** 28)
    writer = WeightsWriter(out / WEIGHTS_FILE) if external else None
    files = {}
    try:            # one model at a time: its weight bytes are written out before the next
        for name in names:
            bar.step(f"lowering {name}")
            if name == "genai":
                proto = genai_model(model, ops=ops, opset=opset, sink=writer)
            else:
                proto = lower(model.get_graph(*MODELS[name]), model.weights, ops=ops, opset=opset,
                              name=f"kimi_linear_{name}", sink=writer)
            bar.step(f"writing {name}")
            path = out / f"{name}.onnx"
            onnx.save_model(proto, str(path))
            files[name] = path.name
            del proto
    finally:
        bar.close()
        if writer:
            writer.close()
    if not external and (out / WEIGHTS_FILE).exists():
        (out / WEIGHTS_FILE).unlink()
    if check_models:
        for f in files.values():
            check(out / f)
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    copied = []
    if model.path is not None:
        for f in TOKENIZER_FILES:
            if (Path(model.path) / f).exists() and Path(model.path).resolve() != out.resolve():
                shutil.copy(Path(model.path) / f, out / f)
                copied.append(f)
    g = model.get_graph("decode")
    manifest = {
        "target": "onnx", "ops": ops, "opset": opset, "ir_version": ir_version_for(opset),
        "dtype": str(model.dtype).replace("torch.", ""), "router_weights": model.router_weights,
        "pipeline": model.pipeline, "models": files, "external_weights": WEIGHTS_FILE if external else None,
        "state_inputs": [s.lstrip("%") for s in g.meta["state_inputs"]],
        "tokenizer_files": copied, "onnx": onnx.__version__,
        "graph_sha256": {n: hashlib.sha256(str(model.get_graph(*MODELS[n])).encode()).hexdigest()
                         for n in MODELS},
        # what ties the directory together: a changed or swapped file is refused on loading
        "sha256": {f: file_sha256(out / f) for f in ["config.json", *files.values()]},
        "export_seconds": round(time.perf_counter() - t0, 2),
    }
    if genai:
        cfg = genai_config(model, files["genai"])
        (out / "genai_config.json").write_text(json.dumps(cfg, indent=1))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(path: str | Path) -> dict | None:
    """The checked manifest of an export directory (see read_export); None if it has none."""
    return read_export(Path(path)) if (Path(path) / MANIFEST).exists() else None
