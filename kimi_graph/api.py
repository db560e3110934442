"""Public API: `kimi_graph.load(...)` -> KimiModel (config, graph, weights, forward)."""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import torch

from .config import ConfigError, KimiLinearConfig
from .finite import check_finite_logits, check_finite_weights
from .interpreter import run_graph
from .ir import Graph
from .model import build_graph
from .ops import FLOAT_DTYPES, IR_DTYPES, TORCH_DTYPES
from .ops.tensor import check_token_ids
from .presets import PRESETS
from .weight_transforms import WeightTransforms
from .weights import CheckpointSource, RandomSource, WeightSource

# the graphs a model runs, (mode, stateful, logits): stateless prefill, prefill continuing from
# caches, one decode step. With a pipeline, load builds the two that generation runs; the
# stateless prefill graph, and the prefill with only the last position's logits (what
# generation's prefill needs), read the same parameters, so building them later holds nothing new.
GRAPHS = (("prefill", False, "all"), ("prefill", True, "all"), ("decode", True, "all"))
LOAD_GRAPHS = GRAPHS[1:]


def graph_key(mode: str, stateful: bool, logits: str = "all") -> tuple[str, bool, str]:
    """The key of a graph variant: decode is always stateful, and its one position is the last."""
    return mode, stateful or mode == "decode", "all" if mode == "decode" else logits


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


# backend name -> "module:factory"; factory(model) returns an executor:
#   executor(graph, inputs: dict[name, Tensor]) -> list[Tensor] (the graph's outputs)
BACKENDS = {
    "interpreter": "kimi_graph.api:interpreter_backend",
    "triton": "kimi_graph.lowering.triton.backend:triton_backend",
    "onnxruntime": "kimi_graph.runtime.ort_engine:ort_backend",
    "torch": "kimi_graph.lowering.torch.backend:torch_backend",   # options: compile, mode, ...
}


# backend -> the options it takes (load's **options): names, or "module:attribute" where the
# backend declares them
BACKEND_OPTIONS = {"interpreter": (), "triton": (),
                   "onnxruntime": "kimi_graph.runtime.ort_engine:OPTIONS",
                   "torch": "kimi_graph.lowering.torch.backend:EXECUTOR_OPTIONS"}


def check_options(backend: str, options: dict) -> None:
    """ValueError for an option `backend` does not take (with the likely intended name)."""
    import difflib
    import inspect
    known = BACKEND_OPTIONS[backend]
    if isinstance(known, str):
        mod, attr = known.split(":")
        known = getattr(importlib.import_module(mod), attr)
    unknown = sorted(set(options) - set(known))
    if unknown:
        names = list(inspect.signature(load).parameters) + list(known)
        hints = [f"{u} -> {m[0]}" for u in unknown for m in [difflib.get_close_matches(u, names, 1)] if m]
        raise ValueError(f"load(): unknown option(s) {', '.join(unknown)} for backend {backend!r}"
                         + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                         + f"; it takes {', '.join(sorted(known)) or 'no options'}")


def resolve_device(device) -> str:
    """"auto" -> "cuda" when CUDA is available, else "cpu"; any other device is checked."""
    name = str(device)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(name)
    except (RuntimeError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"device {name!r} is not supported: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {name!r}: CUDA is not available ({why}); use 'cpu' or 'auto'")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return name


EXPERTS = ("int4", "int8", "fp8")     # low-bit routed experts (kimi_graph/ops/quant.py)


def experts_pipeline(pipeline: str | None, experts: str | None, group_size: int = 128) -> str | None:
    """`pipeline` (default: "default") followed by quantize-experts and fold-constants for
    `experts` ("int4" | "int8" | "fp8", groups of `group_size`); `pipeline` itself for None or
    "bf16"."""
    if experts in (None, "bf16"):
        return pipeline
    if experts not in EXPERTS:
        raise ValueError(f"experts={experts!r}: choose one of {', '.join(EXPERTS)} (or None for "
                         "the model dtype)")
    from .passes.quantize_experts import quantize_pipeline
    return f"{pipeline or 'default'},{quantize_pipeline(experts, group_size)}"


def interpreter_backend(model: "KimiModel"):
    return lambda graph, inputs: run_graph(graph, inputs, model.weights)


class KimiModel:
    """A loaded Kimi Linear model: `model(input_ids) -> logits` through the chosen backend.

    Graphs are built per (mode, stateful), optimized by `pipeline` if one is set, and run by
    the backend's executor. `weights` holds each parameter some built graph reads, once: the
    parameters passes derive (recipes in `transforms`, shared by the graphs) replace the
    originals no graph reads. A graph built later that needs a dropped original gets it
    again from `source` (the checkpoint or the seeded draws)."""

    def __init__(self, config: KimiLinearConfig, weights: dict[str, torch.Tensor], *,
                 dtype: torch.dtype, device: str, router_weights: str, path: Path | None = None,
                 pipeline: str | None = None, backend: str = "interpreter", options: dict | None = None,
                 source: WeightSource | None = None, layout=None):
        self.config, self.weights, self.dtype = config, weights, dtype
        self.device, self.router_weights, self.path = device, router_weights, path
        self.pipeline, self.backend, self.options = pipeline, backend, dict(options or {})
        self.source, self.transforms = source, WeightTransforms()
        self.layout = layout           # parallel.Layout: this rank's part of a sharded model
        self.experts: str | None = None      # low-bit routed experts (load's `experts`)
        self.load_stats: dict = {}     # load(): seconds for graphs and weights, estimated bytes
        self._graphs: dict[tuple[str, bool, str], Graph] = {}
        self._executor = None

    def build(self, mode: str = "prefill", stateful: bool = False, logits: str = "all") -> Graph:
        """The unoptimized graph as declared (this rank's part, for a sharded model).
        `logits`: "all" positions, or each sequence's "last" (see kimi_graph.model)."""
        g = build_graph(self.config, mode, stateful=stateful, dtype=IR_DTYPES[self.dtype],
                        router_weights=self.router_weights, logits=logits)
        if self.layout is not None:
            from .passes import run_pipeline
            g = run_pipeline(g, self.layout.pipeline())
        return g

    def get_graph(self, mode: str = "prefill", stateful: bool = False, logits: str = "all") -> Graph:
        """The graph that runs: declared, then optimized by the pipeline (cached)."""
        key = graph_key(mode, stateful, logits)
        if key not in self._graphs:
            self._graphs[key] = self._optimized(*key)
            self._load(self._graphs[key].params)
        return self._graphs[key]

    def build_graphs(self, given: dict[tuple[str, bool, str], Graph] | None = None) -> set[str]:
        """Build the graphs the model runs, types only: LOAD_GRAPHS through the pipeline
        (derived parameters as recipes in `transforms`), or without one the declared prefill
        graph (the others read the same parameters). `given`: graphs already built with this
        model's `transforms`. -> the names of the parameters they read."""
        self._graphs.update(given or {})
        for key in LOAD_GRAPHS if self.pipeline else GRAPHS[:1]:
            if key not in self._graphs:
                self._graphs[key] = self._optimized(*key)
        return {p[1:] for g in self._graphs.values() for p in g.params}

    def _optimized(self, mode: str, stateful: bool, logits: str) -> Graph:
        """The graph through the pipeline, types only (derived parameters as recipes)."""
        g = self.build(mode, stateful, logits)
        if self.pipeline:
            from .passes import run_pipeline
            g = run_pipeline(g, self.pipeline, transforms=self.transforms)
        return g

    check_finite = True         # check weights for NaN and inf as they load (see load)

    def _load(self, params) -> None:
        """Add the weights of `params` ("@name") that `weights` lacks, derived from the
        weights held where they can be (views stay views); originals no longer held come
        from the source again."""
        from .loading import materialize
        missing = [p[1:] for p in params if p[1:] not in self.weights]
        if not missing or (self.source is None and not self.weights):
            return                  # all there, or none here (an exported ONNX directory)
        fetch = self.source.fetch if self.source is not None else self.weights.__getitem__
        new = materialize(missing, self.transforms, fetch, held=self.weights,
                          direct=getattr(self.source, "direct", ()))
        if self.check_finite:
            check_finite_weights(new)
        self.weights.update(new)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights held (distinct storages: views count once)."""
        from .loading import held_bytes
        return held_bytes(self.weights.values())

    @property
    def graph(self) -> Graph:
        """The stateless prefill graph (input_ids -> logits)."""
        return self.get_graph()

    @property
    def executor(self):
        if self._executor is None:
            if self.backend not in BACKENDS:
                raise ValueError(f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")
            mod, fn = BACKENDS[self.backend].split(":")
            self._executor = getattr(importlib.import_module(mod), fn)(self)
        return self._executor

    def execute(self, mode: str, stateful: bool, inputs: dict[str, torch.Tensor],
                logits: str = "all") -> list[torch.Tensor]:
        """Run one graph on named inputs (input_ids, cache_pos, states) -> its outputs (logits
        [B, T, V], or [B, 1, V] with logits="last"; then the new states)."""
        return self.executor(self.get_graph(mode, stateful, logits), inputs)

    def check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(input_ids, (str, bytes)):
            raise ValueError("input_ids must be token ids (an integer tensor [B, T] or nested lists), "
                             "got a string; encode text first: model.tokenizer.encode(text)")
        try:
            ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError("input_ids must be token ids (an integer tensor [B, T] or nested lists "
                             f"of integers), got {type(input_ids).__name__} {input_ids!r:.60}") from None
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {tuple(ids.shape)} {ids.dtype}")
        if ids.numel() == 0:
            raise ValueError("input_ids is empty")
        check_token_ids(ids, self.config.vocab_size)
        return ids.to(device=self.device, dtype=torch.int64)

    @torch.no_grad()
    def __call__(self, input_ids) -> torch.Tensor:
        """Logits [B, T, V]; NonFiniteError rather than NaN or inf."""
        return check_finite_logits(self.execute("prefill", False, {"input_ids": self.check_ids(input_ids)})[0])

    # -- generation (kimi_graph.runtime) -------------------------------------------------
    def generate(self, prompts, **kwargs) -> list[list[int]]:
        """New token ids per prompt: `model.generate([[1, 5, 9], [3]], max_new_tokens=8)`.
        kwargs: sampling (temperature, top_k, top_p, seed, stop_ids, ignore_eos) and engine
        sizing; see `kimi_graph.runtime.generate`."""
        from .runtime import generate
        return generate(self, prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        """Iterate over one prompt's new token ids as they are sampled."""
        from .runtime import stream
        return stream(self, prompt, **kwargs)

    @property
    def tokenizer(self):
        """The model directory's tiktoken tokenizer (TokenizerError when it has none)."""
        if getattr(self, "_tokenizer", None) is None:
            from .runtime.tokenizer import load_tokenizer
            self._tokenizer = load_tokenizer(self.path, self.config.vocab_size)
        return self._tokenizer

    def __repr__(self) -> str:
        c = self.config
        return (f"KimiModel({c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{self.dtype}, {self.device}, router_weights={self.router_weights!r})")


def load(model: str | Path = "tiny", *, dtype: torch.dtype = torch.float32, device: str = "cpu",
         router_weights: str = "official", seed: int = 0, pipeline: str | None = None,
         backend: str = "interpreter", progress: bool | None = None, check_finite: bool = True,
         parallel: str | None = None, experts: str | None = None, **options) -> KimiModel:
    """Load a model directory (HF layout: config.json + safetensors) or a preset.

    Presets get seeded random weights, drawn on `device`. `router_weights`: "official" (the
    remote modeling code: routing weights from the bias-corrected scores) or "unbiased"
    (transformers >= 5 and vLLM: from the unbiased scores). `pipeline`: a pass pipeline run before execution (None: the graph as declared);
    with one, every graph the model runs is optimized now, and the weights are loaded layer
    by layer straight into the layout those graphs read (packed experts, ...), each held
    once. Before allocating, the bytes needed are checked against the device's free memory
    (InsufficientMemoryError if they do not fit). `device="meta"` loads shapes only.
    `progress`: a progress bar (default: from 1 GiB on). `backend`: who executes the graphs
    (see BACKENDS); `options` go to the backend.
    `check_finite`: check the weights for NaN and inf on their device (False: trusted).
    `device`: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available). Unknown options are
    refused (ValueError), on every backend.
    `parallel`: "tp=N", "ep=M" or "tp=N,ep=M" inside an initialized torch.distributed process
    group of N*M ranks: this rank's part of the model (passes/shard.py), its slice of the
    weights and of the caches; every rank returns the whole logits.
    `experts`: "int4" | "int8" | "fp8" quantizes the routed experts' weights as they load
    (layer by layer, on `device`: the full-precision model is never held), after `pipeline`
    (default "default"); see experts_pipeline."""
    if not isinstance(dtype, torch.dtype) or IR_DTYPES.get(dtype) not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: use torch.float32, torch.bfloat16, "
                         "torch.float16 or torch.float64")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r:.40}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    check_options(backend, options)
    device = resolve_device(device)
    config, path = resolve_config(model)
    from .compressed import scheme_of
    scheme = scheme_of(config.extra.get("quantization_config")) if path is not None else None
    if scheme is not None and experts is None:      # a pre-quantized checkpoint: its format
        experts = scheme.format
    group = scheme.group_size(config.hidden_size, config.moe_intermediate_size) \
        if scheme is not None and experts == scheme.format else 128
    pipeline = experts_pipeline(pipeline, experts, group)
    layout = None
    if parallel is not None:
        if backend == "onnxruntime":
            raise ValueError("parallel= runs over torch.distributed; backend='onnxruntime' runs one device")
        from .parallel import init_mesh
        layout = init_mesh(parallel).layout
    m = KimiModel(config, {}, dtype=dtype, device=device, router_weights=router_weights, path=path,
                  pipeline=pipeline, backend=backend, options=options, layout=layout)
    m.experts = experts
    g = m.build()
    from .runtime.ort_engine import is_onnx_export
    if path is not None and is_onnx_export(path):
        # an export-onnx directory: weights live in its models; dtype and router as exported
        if backend != "onnxruntime":
            raise ValueError(f"{path} is an ONNX export (kimi-graph export-onnx): load it with "
                             "backend='onnxruntime' (--backend onnxruntime)")
        m.options["onnx_dir"] = str(path)
        m.executor                          # reads and checks the export now
        return m
    m.source = CheckpointSource(path, g, device, scheme) if path is not None else RandomSource(g, seed, device)
    what = (f"{model}" if isinstance(model, (str, Path)) else f"a {config.num_hidden_layers}-layer model") \
        + f" in {str(dtype).removeprefix('torch.')}"
    if experts in (None, "bf16"):     # low-bit experts: only what the pipeline holds must fit
        _check_fits(m, sum(m.source.types[n].nbytes() for n in m.source.types),
                    what + " (its declared weights)")
    t0 = time.perf_counter()
    names = m.build_graphs(None if pipeline else {GRAPHS[0]: g})
    if scheme is not None:          # packed experts straight from the checkpoint's codes
        m.source.offer({p[1:]: t for gr in m._graphs.values() for p, t in gr.params.items()})
    from .loading import estimate, load_weights
    held, peak = estimate(m.source, names, m.transforms)
    _check_fits(m, peak, what + f" ({_gb(held)} of weights held after "
                f"{'the pipeline' if pipeline else 'loading'}, plus transforms in flight)")
    t1 = time.perf_counter()
    m.weights = load_weights(m.source, names, m.transforms, progress=progress)
    m.load_stats = {"graphs_s": t1 - t0, "weights_s": time.perf_counter() - t1,
                    "held_bytes_estimate": held, "peak_bytes_estimate": peak}
    m.check_finite = check_finite               # weights loaded later are checked too
    if check_finite:
        check_finite_weights(m.weights)
    if backend == "onnxruntime":
        m.executor                          # dtype and options checked now, not at the first call
    return m


def _gb(n: int) -> str:
    from .loading import gb
    return gb(n)


def _check_fits(m: KimiModel, needed: int, what: str) -> None:
    """Refuse before allocating when `needed` bytes exceed the device's free memory; name the
    dtypes that would fit (bytes scale with the model dtype's element size)."""
    from .loading import check_fits
    types = m.source.types.values()
    own = sum(t.nbytes() for t in types if TORCH_DTYPES[t.dtype] == m.dtype)
    other = sum(t.nbytes() for t in types) - own
    alternatives = {}
    for d in (torch.bfloat16, torch.float16, torch.float32):
        if d != m.dtype and own:
            scaled = own * d.itemsize // m.dtype.itemsize + other
            alternatives[str(d).removeprefix("torch.")] = needed * scaled // (own + other)
    check_fits(needed, m.device, what, alternatives)
