"""Running lowered modules: the `backend="torch"` executor and the "kimi_graph" compile backend.

Executor (`kimi_graph.load(..., backend="torch", compile=True, mode="reduce-overhead")`):
each graph is lowered once; with `compile` it runs under `torch.compile(fullgraph=True)`,
region by region (`regions.py`: each distinct attention or FFN compiled once and reused by
every layer with one of its kind, so compile time does not grow with depth) or as one graph. The dims the
graph leaves symbolic (batch, sequence, cache window) are marked dynamic at the first call,
so a growing context does not recompile. Compiled artifacts persist across processes in
Inductor's FX graph and AOTAutograd caches (on by default; TORCHINDUCTOR_CACHE_DIR says where),
and the Triton kernels the custom ops launch in the same Triton cache as Inductor's own, under
the same settings (`pin_triton_cache`), so a warm start compiles none of them again.
Options: compile (False), mode (None; "reduce-overhead" or "max-autotune": each decode step
is replayed as one CUDA graph on GPU, prefill runs compiled without graphs),
regional (None: yes, except with compile_backend="kimi_graph", whose pipeline must see the
whole model; True or "part": a region per attention and per FFN; "layer": one per decoder
layer), dynamic (None: the marked dims; True: every dim; False:
none), compile_backend ("inductor", or "kimi_graph"),
check_inputs (True: shapes, dtypes, token ids and cache positions are checked before each
call; the id and position checks read two numbers back from the device), kernels ("torch":
the custom ops' default implementations; "triton": the generated Triton kernels on CUDA,
registered process-wide through `custom_ops.set_impl`).
Under CUDA graphs the outputs live in memory the next replay overwrites, so the executor
returns copies.

Compile backend "kimi_graph" (`torch.compile(module, backend="kimi_graph")`): dynamo's FX
graph is read back into the layer graph (`importer.import_fx`: graphs of kimi_graph ops
only, static shapes), optimized by the pass pipeline ("default"), lowered again, and handed
to Inductor (or run eagerly). Weights are those of the first call: parameters folded by the
pipeline (packed experts, absorbed MLA weights) are computed then and not refreshed.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch._inductor.config

from kimi_graph.interpreter import bind_dims
from kimi_graph.ir import Graph
import kimi_graph.ops
from kimi_graph.ops.tensor import check_token_ids

from .fx import lower
from .importer import import_fx, input_positions
from .ops import functional
from .regions import MarkDynamic, RegionalModule, symbolic_dims
from .step_graphs import StepGraphs

# CUDA-graph modes: Inductor compiles without its own graphs, the executor captures whole
# decode steps instead (step_graphs.py says why)
INDUCTOR_MODE_WITHOUT_GRAPHS = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}
EXECUTOR_OPTIONS = {"compile": False, "mode": None, "regional": None, "dynamic": None,
                    "compile_backend": "inductor", "check_inputs": True, "kernels": "torch"}


def torch_backend(model) -> Callable:
    """The executor factory named in `kimi_graph.api.BACKENDS["torch"]`."""
    unknown = set(model.options) - set(EXECUTOR_OPTIONS)
    if unknown:
        raise ValueError(f"backend 'torch': unknown option(s) {sorted(unknown)}; "
                         f"known: {sorted(EXECUTOR_OPTIONS)}")
    opts = {**EXECUTOR_OPTIONS, **model.options}
    kernels = opts.pop("kernels")
    if kernels not in ("torch", "triton"):
        raise ValueError(f"backend 'torch': kernels must be 'torch' or 'triton', got {kernels!r}")
    if opts["mode"] is not None and opts["compile_backend"] != "inductor":
        raise ValueError("backend 'torch': mode is an Inductor option; with compile_backend="
                         f"{opts['compile_backend']!r} leave it unset")
    if opts["regional"] not in (None, True, False, "part", "layer"):
        raise ValueError(f"backend 'torch': regional must be None, True, False, 'part' or 'layer', "
                         f"got {opts['regional']!r}")
    if opts["regional"] is None:
        opts["regional"] = opts["compile_backend"] != "kimi_graph"
    elif opts["regional"] and opts["compile_backend"] == "kimi_graph":
        raise ValueError("backend 'torch': regional compilation reuses one compiled layer for "
                         "every layer's weights; compile_backend='kimi_graph' bakes the first "
                         "call's weights in, so it compiles the whole graph (regional=False)")
    if kernels == "triton":
        from kimi_graph.lowering.triton.backend import register_custom_ops
        register_custom_ops("cuda")
    if opts["compile"]:
        mark_node_functions_cacheable()
    return TorchExecutor(model.weights, **opts)


def mark_node_functions_cacheable() -> None:
    """Let AOTAutograd's cache take graphs that call our traced node functions (INLINE ops;
    it bypasses functions it does not know), keyed by a digest of the sources that define
    them: a warm start in a new process then skips tracing through AOTAutograd."""
    digest = hashlib.sha256()
    for path in sorted(Path(kimi_graph.ops.__file__).parent.glob("*.py")) + \
            [Path(__file__).with_name("ops.py")]:
        digest.update(path.read_bytes())
    torch._inductor.config.unsafe_marked_cacheable_functions.update(
        {f"{functional.__name__}.{name}": digest.hexdigest()[:16]
         for name, fn in vars(functional).items() if callable(fn) and not name.startswith("_")})


def pin_triton_cache(device: torch.device) -> None:
    """Give Triton, before any kernel launches, the settings Inductor gives it only when it
    first compiles or loads a kernel: the cache under TORCHINDUCTOR_CACHE_DIR
    (TRITON_CACHE_DIR, unless set) and torch's own ptxas and libdevice (part of each kernel's
    cache key). Otherwise the custom ops' Triton kernels compile under other settings in a
    warm start (Inductor's kernels come from its caches; it sets none of this before they
    launch) than in the cold process, miss the cache it filled, and compile again (H200, 27
    layers: 24 kernels, 6.7 s of a 13.8 s warm start)."""
    if "TRITON_CACHE_DIR" not in os.environ:
        try:
            from torch._inductor.runtime.cache_dir_utils import triton_cache_dir
        except ImportError:     # a torch without it: Inductor's own default applies
            triton_cache_dir = None
        if triton_cache_dir is not None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(index)
    try:
        from torch._inductor.runtime import compile_tasks
    except ImportError:
        return
    for name in ("_set_triton_ptxas_path", "_set_triton_libdevice_path"):
        setting = getattr(compile_tasks, name, None)
        if setting is not None:
            setting()


class TorchExecutor:
    def __init__(self, weights, *, compile, mode, regional, dynamic, compile_backend, check_inputs):
        self.weights, self.compile, self.mode, self.dynamic = weights, compile, mode, dynamic
        self.regional, self.compile_backend, self.check_inputs = regional, compile_backend, check_inputs
        self._fns: dict[int, tuple[Graph, Callable]] = {}
        self._checked_ops: dict[int, list] = {}

    @property
    def cudagraphs(self) -> bool:
        return self.compile and self.mode in INDUCTOR_MODE_WITHOUT_GRAPHS

    def function(self, g: Graph, device: torch.device) -> Callable:
        """The lowered (and compiled) module for `g`, built once. With a CUDA-graph mode, the
        decode graph (one token per row) on CUDA replays whole steps (step_graphs.py)."""
        if id(g) not in self._fns:
            compile_fn = None
            if self.compile and device.type == "cuda":
                pin_triton_cache(device)
            if self.compile:
                mode = INDUCTOR_MODE_WITHOUT_GRAPHS.get(self.mode, self.mode)

                def compile_fn(f):
                    return TracedWithoutFakeCache(torch.compile(
                        f, backend=self.compile_backend, mode=mode, dynamic=self.dynamic, fullgraph=True))
            if self.compile and self.regional:
                fn = RegionalModule(g, self.weights, compile_fn, mark_dynamic=self.dynamic is None,
                                    per="layer" if self.regional == "layer" else "part")
            else:
                fn = lower(g, self.weights)
                if self.compile:
                    fn = compile_fn(fn)
                    if self.dynamic is None and self.compile_backend != "kimi_graph":   # static only
                        fn = MarkDynamic(symbolic_dims(g), fn)
            ids = g.types.get("%input_ids")
            if self.cudagraphs and device.type == "cuda" and ids is not None and ids.shape[-1] == 1:
                fn = StepGraphs(fn, device)
            self._fns[id(g)] = (g, fn)
            self._checked_ops[id(g)] = [op for op in g.ops() if op.kind in ("embedding", "cache_write")]
        return self._fns[id(g)][1]

    def __call__(self, g: Graph, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        inputs = {(k if k.startswith("%") else "%" + k): v for k, v in inputs.items()}
        fn = self.function(g, next((v.device for v in inputs.values()), torch.device("cpu")))
        if self.check_inputs:
            check_inputs(g, inputs, self._checked_ops[id(g)])
        outs = fn(*[inputs[n] for n in g.inputs])
        return [o.clone() for o in outs] if isinstance(fn, StepGraphs) else list(outs)


class TracedWithoutFakeCache:
    """A compiled function whose first call (the one dynamo traces) runs without the fake
    tensor dispatch cache: each op of a region is met about once per trace, so the cache
    mostly pays for entries it never reuses (building and checking an entry under symbolic
    shapes), and tracing, which a warm start repeats in every process, takes about a
    quarter less time."""

    def __init__(self, fn: Callable):
        self.fn, self.traced = fn, False

    def __call__(self, *args):
        if self.traced:
            return self.fn(*args)
        self.traced = True
        with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
            return self.fn(*args)


def check_inputs(g: Graph, inputs: dict[str, torch.Tensor], ops=None) -> None:
    """Shapes and dtypes (as the interpreter checks them), token ids within the embedding and
    cache positions within the caches (`ops`: the graph's embedding and cache_write ops, if
    known): what a compiled module cannot report clearly."""
    dims = bind_dims(g, inputs)
    for op in (ops if ops is not None else g.ops()):
        if op.kind == "embedding" and op.inputs[0] in inputs:
            check_token_ids(inputs[op.inputs[0]], g.types[op.inputs[1]].shape[0])
        if op.kind == "cache_write" and op.inputs[2] in inputs:
            pos, T = inputs[op.inputs[2]], dims.get("T", g.types[op.inputs[1]].shape[1])
            S = inputs[op.inputs[0]].shape[1] if op.inputs[0] in inputs else None
            if S is not None and pos.numel() and (bool((pos < 0).any()) or int(pos.max()) + T > S):
                raise ValueError(f"cache overflow: writing {T} rows at positions "
                                 f"{pos.tolist()[:8]} of a cache with {S} slots")


# -- the torch.compile backend "kimi_graph" -------------------------------------------------

def make_backend(pipeline: str | None = "default", inner: str = "inductor",
                 on_graph: Callable[[Graph], None] | None = None) -> Callable:
    """A torch.compile backend: import -> `run_pipeline(pipeline)` -> lower -> `inner`
    ("inductor" or "eager"). `on_graph` sees each optimized layer graph (to print or test)."""
    if inner not in ("inductor", "eager"):
        raise ValueError(f"inner must be 'inductor' or 'eager', got {inner!r}")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        g, weights = import_fx(gm, example_inputs)
        if pipeline:
            from kimi_graph.passes import run_pipeline
            g = run_pipeline(g, pipeline, weights=weights)
        if on_graph is not None:
            on_graph(g)
        lowered = lower(g, weights)
        where = input_positions(gm)
        data = [where[name] for name in g.inputs]
        fn = lowered
        if inner == "inductor":
            from torch._inductor.compile_fx import compile_fx
            fn = compile_fx(lowered, [example_inputs[i] for i in data])
        return lambda *args: fn(*[args[i] for i in data])

    return backend


kimi_graph_backend = make_backend()


def register() -> None:
    """Make `torch.compile(..., backend="kimi_graph")` work (also found through the
    `torch_dynamo_backends` entry point once the package is installed)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "kimi_graph" not in _BACKENDS:
        register_backend(kimi_graph_backend, name="kimi_graph")
