"""The ONNX Runtime backend: `kimi_graph.load(MODEL_or_EXPORT_DIR, backend="onnxruntime")`.

A backend executor (see kimi_graph.api.BACKENDS): each graph the engine runs becomes one ORT
session, lowered on first use (ops="ort" by default, option `ops="portable"`), or read from
an export directory (kimi-graph export-onnx) whose prefill / decode models are used as
written. The runtime's Engine (caches, prefill/decode, sampling) runs unchanged on top:
states go in and come out as tensors that share memory with ORT's CPU buffers (no copy).

Options: ops ("ort" | "portable" | "standard"), providers (ORT execution providers, default CPU),
threads (intra-op threads), opset.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from kimi_graph.ir import Graph

TWO_GB = 2 ** 31
# load(..., backend="onnxruntime", **options): option -> default
OPTIONS = {"ops": "ort", "providers": ["CPUExecutionProvider"], "threads": None, "opset": None,
           "onnx_dir": None}


MANIFEST = "kimi_graph_onnx.json"
DTYPES = ("float32", "float16", "bfloat16")
# manifest key -> the type its value must have
MANIFEST_KEYS = {"models": dict, "dtype": str, "router_weights": str, "state_inputs": list,
                 "sha256": dict}


class OrtError(ValueError):
    """An export directory or graph the ONNX Runtime backend cannot run."""


def export_name(mode: str, logits: str = "all") -> str:
    """The name of a graph's model in an export directory: prefill, prefill_last, decode."""
    return mode + ("_last" if logits == "last" else "")


def is_onnx_export(path: Path) -> bool:
    """A directory written by export-onnx (or what is left of one: ONNX models, no weights)."""
    return (path / MANIFEST).exists() or (any(path.glob("*.onnx")) and not any(path.glob("*.safetensors")))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_export(path: Path) -> dict:
    """An export directory's manifest, checked: its fields, and the sha256 of each file it
    ties together (models and config.json), so a file changed or swapped since the export is
    refused. OrtError says what is wrong."""
    path = Path(path)
    p = path / MANIFEST
    again = "; export the model again (kimi-graph export-onnx)"
    if not p.exists():
        raise OrtError(f"{path} holds ONNX models but no {MANIFEST}: not a complete kimi-graph export" + again)
    try:
        man = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OrtError(f"{p} is not valid JSON ({e})" + again) from None
    if not isinstance(man, dict):
        raise OrtError(f"{p} must hold a JSON object, got {type(man).__name__}" + again)
    bad = [f"{k} (a JSON {t.__name__})" for k, t in MANIFEST_KEYS.items() if not isinstance(man.get(k), t)]
    if bad:
        raise OrtError(f"{p} lacks or misstates {', '.join(bad)}" + again)
    if man["dtype"] not in DTYPES:
        raise OrtError(f"{p}: dtype {man['dtype']!r:.40} is not one of {', '.join(DTYPES)}" + again)
    if man["router_weights"] not in ("official", "unbiased"):
        raise OrtError(f"{p}: router_weights {man['router_weights']!r:.40} is not 'official' or 'unbiased'" + again)
    if not {"prefill", "decode"} <= set(man["models"]):
        raise OrtError(f"{p}: models must name the prefill and decode models" + again)
    for name, digest in man["sha256"].items():
        f = path / str(name)
        if not f.is_file():
            raise OrtError(f"{f} is missing: the export {path} is incomplete" + again)
        if file_sha256(f) != digest:
            raise OrtError(f"{f} changed since the export (its sha256 differs from the manifest's): "
                           f"the models were built for the files as they were then" + again)
    return man


class OrtExecutor:
    def __init__(self, model):
        import onnxruntime as ort
        self.ort, self.model = ort, model
        opts = {**OPTIONS, **model.options}
        self.ops, self.providers = opts["ops"], opts["providers"]
        self.threads, self.opset = opts["threads"], opts["opset"]
        self.export_dir = Path(opts["onnx_dir"]) if opts.get("onnx_dir") else None
        self.manifest = None
        if self.export_dir is not None:      # dtype and router as exported
            self.manifest = read_export(self.export_dir)
            model.dtype = getattr(torch, self.manifest["dtype"])
            model.router_weights = self.manifest["router_weights"]
        if model.dtype == torch.bfloat16:
            raise OrtError("bf16 models do not run through ONNX Runtime's Python API (numpy has no "
                           "bf16; the CPU provider has no bf16 MatMul): use float32 or float16, or "
                           "run a bf16 export with onnxruntime-genai or a C/C++ client")
        self._sessions: dict[tuple, object] = {}
        self._cut_last: set[tuple] = set()     # keys run by a full-logits model of an export
        self._tmp = None

    # -- sessions ----------------------------------------------------------------
    def _options(self):
        so = self.ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        return so

    @staticmethod
    def _key(graph: Graph) -> tuple[str, bool, str]:
        return (graph.meta.get("mode", graph.name), bool(graph.meta.get("stateful")),
                graph.meta.get("logits", "all"))

    def session(self, graph: Graph):
        key = self._key(graph)
        if key not in self._sessions:
            self._sessions[key] = self._make_session(graph, key)
        return self._sessions[key]

    def _make_session(self, graph: Graph, key):
        ort = self.ort
        if self.manifest is not None:       # stateless prefill: the stateful model, empty states
            models = self.manifest["models"]
            name = export_name(key[0], key[2])
            if name not in models and key[2] == "last":     # an export without it: the full
                name = export_name(key[0], "all")            # logits' model, cut to the last
                self._cut_last.add(key)
            path = self.export_dir / models.get(name, "")
            if not path.is_file():
                raise OrtError(f"export {self.export_dir} has no model for {key}")
            return ort.InferenceSession(str(path), self._options(), providers=self.providers)
        from kimi_graph.lowering.onnx import lower
        proto = lower(graph, self.model.weights, ops=self.ops, opset=self.opset)
        if proto.ByteSize() < TWO_GB:
            return ort.InferenceSession(proto.SerializeToString(), self._options(), providers=self.providers)
        import onnx
        self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="kimi_graph_ort_")
        path = Path(self._tmp.name) / f"{key[0]}_{int(key[1])}_{key[2]}.onnx"
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
        return ort.InferenceSession(str(path), self._options(), providers=self.providers)

    # -- running ---------------------------------------------------------------------
    def __call__(self, graph: Graph, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        inputs = {k.lstrip("%"): v for k, v in inputs.items()}
        stateless_on_export = self.manifest is not None and not graph.meta.get("stateful")
        if stateless_on_export:
            inputs = self._empty_states(inputs)
        sess = self.session(graph)
        names = [i.name for i in sess.get_inputs()]
        missing = [n for n in names if n not in inputs]
        if missing:
            raise OrtError(f"ONNX model needs inputs {missing}; got {sorted(inputs)}")
        feeds = {n: _to_numpy(inputs[n]) for n in names}
        outs = sess.run(None, feeds)
        result = [torch.from_numpy(np.asarray(o)) for o in outs]
        if stateless_on_export:
            result = result[:1]
        if self._key(graph) in self._cut_last:
            result[0] = result[0][:, -1:]
        dev = self.model.device
        return [r.to(dev) for r in result] if dev != "cpu" else result

    def _empty_states(self, inputs):
        """Stateless prefill on an exported stateful model: zero states, caches of T rows."""
        from kimi_graph.ops import TORCH_DTYPES
        ids = inputs["input_ids"]
        B, T = ids.shape
        g = self.model.build("prefill", True)
        out = {"input_ids": ids, "cache_pos": torch.zeros(B, dtype=torch.int64)}
        for n in g.meta["state_inputs"]:
            ty = g.inputs[n]
            shape = [B if d == "B" else T if d == "S" else d for d in ty.shape]
            out[n.lstrip("%")] = torch.zeros(shape, dtype=TORCH_DTYPES[ty.dtype])
        return out


def _to_numpy(t: torch.Tensor):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        raise OrtError("bf16 tensors cannot cross the onnxruntime Python API (numpy has no bf16); "
                       "run bf16 exports through onnxruntime-genai or a C/C++ client")
    return t.contiguous().numpy()


def ort_backend(model):
    """BACKENDS factory: model -> executor(graph, inputs) -> outputs."""
    return OrtExecutor(model)
