"""Compile time against depth: an N-layer slice of Kimi-Linear-48B-A3B at published width,
run by the torch backend under torch.compile (regional: one compiled region per distinct
layer), cold (empty compile cache) and warm (a second process on the same cache).

Each run is a fresh process: load the slice (random bf16 weights drawn on the device), then
through an Engine prefill a prompt (its first call compiles prefill), decode (the first
step compiles decode), and generate: decode ms/step is the median time between tokens after
the first steps (sampling and the host loop included). Then a second prompt of another
length generates across a cache-window boundary; any graph compiled there is a recompile
(expected 0). The compiled outputs are checked against the same model run eagerly (same
weights, no compile): prefill logits and the first decode step, relative error.

    python bench/compile_depth.py --layers 4                 # GPU: the issue's settings
    python bench/compile_depth.py --layers 27 --timeout 570
    python bench/compile_depth.py --config tiny --device cpu --dtype f32 --mode none --kernels torch

The warm-up total is the first prefill call, the first decode step (compiles, runs once) and
the second (captures the step's CUDA graph under reduce-overhead). A second table splits it by
stage (WHERE: cache lookups, module and kernel loads, Triton's first launches, graph capture),
with wall-clock timers around those functions. --runs names the processes (more warm ones,
each with its own environment settings, e.g. an Inductor knob); --profile RUN adds cProfile
output for a run's first prefill call and first decode steps.

    python bench/compile_depth.py --layers 27 --no-check --runs cold,warm,w1:TORCHINDUCTOR_COMPILE_THREADS=1

Prints the tables and writes compile_depth.json under $OUT (or --out). --timeout bounds the
whole run (every process): a run past it is killed and reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def slice_config(name: str, layers: int):
    """The preset's first `layers` layers (published kinds: KDA, KDA, KDA, MLA, ...); a slice
    without an MLA layer gets its last layer as MLA. A smaller preset (tiny) asked for more
    layers than it has takes the published model's layer pattern at its own width: compile
    time depends on the graph's structure, not its width, so `--config tiny --layers 27
    --device cpu` shows the published model's tracing costs on a CPU."""
    from kimi_graph.config import KimiLinearConfig
    from kimi_graph.presets import KIMI_LINEAR_48B_A3B, PRESETS
    d = copy.deepcopy(PRESETS[name])
    if layers > d["num_hidden_layers"]:
        d["num_hidden_layers"] = KIMI_LINEAR_48B_A3B["num_hidden_layers"]
        d["linear_attn_config"].update({k: KIMI_LINEAR_48B_A3B["linear_attn_config"][k]
                                        for k in ("full_attn_layers", "kda_layers")})
    lac = d["linear_attn_config"]
    if not 1 <= layers <= d["num_hidden_layers"]:
        raise SystemExit(f"--layers must be 1..{d['num_hidden_layers']} for {name}")
    full = [i for i in lac["full_attn_layers"] if i <= layers] or [layers]
    d["num_hidden_layers"] = layers
    lac["full_attn_layers"] = full
    lac["kda_layers"] = [i for i in range(1, layers + 1) if i not in full]
    return KimiLinearConfig.from_dict(d)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# dynamo's timers (torch._dynamo.utils.compile_times): the whole frame compile, its bytecode
# tracing (dynamo's own work, not cached across processes), the backend (AOTAutograd +
# Inductor: cached), guard building
PHASES = {"compile": "_compile.compile_inner", "tracing": "bytecode_tracing",
          "backend": "OutputGraph.call_user_compiler", "guards": "build_guards"}


def phase_times() -> dict:
    from torch._dynamo.utils import compile_times
    names, values = compile_times(repr="csv", aggregate=True)
    have = dict(zip(names, map(float, values)))
    return {k: have.get(v) for k, v in PHASES.items()}      # None: a timer this torch lacks


# Where a process's first calls spend their wall time outside dynamo's own timers: each entry
# (label, module, attribute path) is wrapped by a timer (inclusive; a call inside another call
# of the same label counts once). Missing names (another torch or triton) read as unknown.
WHERE = [
    ("dynamo frame compile", "torch._dynamo.convert_frame", "_compile"),
    ("AOTAutograd cache lookup", "torch._functorch._aot_autograd.autograd_cache", "AOTAutogradCache.try_load"),
    ("FX graph cache lookup", "torch._inductor.codecache", "FxGraphCache._lookup_graph"),
    ("Inductor module load", "torch._inductor.codecache", "PyCodeCache.load_by_key_path"),
    ("Inductor kernels bundle", "torch._inductor.triton_bundler", "TritonBundler.read_and_emit"),
    ("Inductor kernel precompile", "torch._inductor.runtime.triton_heuristics", "CachingAutotuner.precompile"),
    ("Inductor autotune", "torch._inductor.runtime.triton_heuristics", "CachingAutotuner.benchmark_all_configs"),
    ("Inductor async wait", "torch._inductor.async_compile", "AsyncCompile.wait"),
    ("compile worker pool start", "torch._inductor.compile_worker.subproc_pool", "SubprocPool.__init__"),
    ("triton JIT first launch", "triton.runtime.jit", "JITFunction._do_compile"),
    ("triton compile (cache hit or not)", "triton.compiler.compiler", "compile"),
    ("triton module load", "triton.compiler.compiler", "CompiledKernel._init_handles"),
    ("project kernel source import", "kimi_graph.lowering.triton.codegen", "load"),
    ("CUDA graph capture", "torch.cuda.graphs", "graph.__exit__"),
    ("subprocess wait", "subprocess", "Popen.wait"),
    ("guard building", "torch._dynamo.guards", "CheckFunctionManager.__init__"),
]


class WhereTimers:
    """Wall-clock seconds and calls per WHERE label; `snapshot()` copies the totals."""

    def __init__(self):
        import importlib
        import threading
        self.seconds = {label: 0.0 for label, *_ in WHERE}
        self.calls = {label: 0 for label, *_ in WHERE}
        self.missing = set()
        self.local = threading.local()
        for label, module, path in WHERE:
            try:
                owner = importlib.import_module(module)
                *parents, name = path.split(".")
                for p in parents:
                    owner = getattr(owner, p)
                fn = owner.__dict__[name]
            except (ImportError, AttributeError, KeyError):
                self.missing.add(label)
                continue
            kind = type(fn) if isinstance(fn, (staticmethod, classmethod)) else None
            setattr(owner, name, kind(self._wrap(label, fn.__func__)) if kind else self._wrap(label, fn))
            if module == "triton.compiler.compiler":     # also where triton re-exports it
                import triton
                import triton.compiler
                for alias in (triton, triton.compiler):
                    if getattr(alias, name, None) is fn:
                        setattr(alias, name, getattr(owner, name))
        if "CUDA graph capture" not in self.missing:     # the capture runs from enter to exit
            import torch.cuda.graphs as graphs
            enter = graphs.graph.__enter__

            def timed_enter(g, *a, **k):
                g._where_t0 = time.perf_counter()
                return enter(g, *a, **k)
            graphs.graph.__enter__ = timed_enter

    def _wrap(self, label, fn):
        import functools

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            active = self.local.__dict__.setdefault("active", set())
            if label in active:
                return fn(*args, **kwargs)
            active.add(label)
            t0 = getattr(args[0], "_where_t0", None) if label == "CUDA graph capture" else None
            t0 = t0 if t0 is not None else time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                active.discard(label)
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1
        return timed

    def snapshot(self) -> dict:
        return {label: None if label in self.missing else [round(self.seconds[label], 3), self.calls[label]]
                for label in self.seconds}


def since(now: dict, before: dict) -> dict:
    return {k: None if v is None else [round(v[0] - before[k][0], 3), v[1] - before[k][1]]
            for k, v in now.items()}


def child(args) -> dict:
    """One process: load, compile through use, time, count recompiles, check."""
    import torch
    from torch._dynamo.utils import counters

    import kimi_graph
    from kimi_graph.runtime import Engine, SamplingParams

    where = WhereTimers() if args.where else None
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    cfg = slice_config(args.config, args.layers)
    t = time.perf_counter()
    opts = {"compile": True, "kernels": args.kernels, "regional": args.regional}
    if args.mode != "none":
        opts["mode"] = args.mode
    model = kimi_graph.load(cfg, dtype=dtype, device=args.device, pipeline=args.pipeline,
                            backend="torch", **opts)
    res = {"layers": args.layers, "kinds": cfg.layer_kinds, "load_s": time.perf_counter() - t}
    vocab = cfg.vocab_size
    prompt = [int(x) for x in torch.randint(3, vocab, (args.prompt_len,))]
    engine = Engine(model, max_batch=1, max_len=args.prompt_len + args.new_tokens + 256, window_block=64)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    profiling = args.run_name in args.profile

    def profiled(phase, fn):
        """fn() under cProfile when this run is profiled (profile-{phase}-{run}.txt/.pstats)."""
        if not profiling:
            return fn()
        import cProfile
        import io
        import pstats
        prof = cProfile.Profile()
        out = prof.runcall(fn)
        text = io.StringIO()
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=text).sort_stats(key).print_stats(60)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"profile-{phase}-{args.run_name}.txt").write_text(text.getvalue())
        prof.dump_stats(Path(args.out) / f"profile-{phase}-{args.run_name}.pstats")
        return out

    seq = engine.sequence()
    where0 = where.snapshot() if where else None
    logits, res["prefill_first_s"] = profiled("prefill", lambda: timed(lambda: seq.extend(prompt)))
    where1 = where.snapshot() if where else None
    graphs_after_prefill = counters["stats"]["unique_graphs"]
    res["prefill_phases_s"] = phase_times()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    steps, tokens = [], []
    stream = seq.stream(params)

    def next_step():
        sync()
        t0 = time.perf_counter()
        tok = next(stream, None)
        sync()
        if tok is not None:
            steps.append(time.perf_counter() - t0)
            tokens.append(tok)
        return tok

    # the first token comes from prefill's logits; then the first decode step (compiles, warms
    # up), the second (captures the step's CUDA graph under reduce-overhead), the third (replays)
    profiled("decode", lambda: [next_step() for _ in range(4)])
    where2 = where.snapshot() if where else None
    while next_step() is not None:
        pass
    seq.close()
    res["decode_first_s"] = steps[1] if len(steps) > 1 else None
    res["decode_capture_s"] = steps[2] if len(steps) > 2 else None
    res["decode_first_steps_s"] = [round(x, 4) for x in steps[:5]]
    res["decode_ms_per_step"] = 1e3 * statistics.median(steps[4:]) if len(steps) > 8 else None
    res["decode_phases_s"] = {k: None if v is None else v - (res["prefill_phases_s"][k] or 0.0)
                              for k, v in phase_times().items()}
    if where:
        res["where_prefill"] = since(where1, where0)
        res["where_decode"] = since(where2, where1)
        res["where_before_prefill"] = where0
    res["graphs_prefill"] = graphs_after_prefill
    res["graphs_decode"] = counters["stats"]["unique_graphs"] - graphs_after_prefill
    warm = counters["stats"]["unique_graphs"]
    # after warm-up: another prompt length, generating across a 64-token window boundary
    seq = engine.sequence()
    seq.extend(prompt[: max(2, args.prompt_len // 2 + 1)])
    seq.generate(SamplingParams(max_new_tokens=80, ignore_eos=True))
    seq.close()
    res["recompiles_after_warmup"] = counters["stats"]["unique_graphs"] - warm
    with engine.sequence() as again:
        res["prefill_second_s"] = timed(lambda: again.extend(prompt))[1]
    res["triton_env"] = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_PTXAS_PATH",
                                                         "TRITON_LIBDEVICE_PATH")}
    res["inductor_cache"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    res["aot_autograd_cache"] = {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}
    # the same weights and graphs, run eagerly: the compiled prefill logits and first step
    if args.check:
        eager = copy.copy(model)
        eager.options, eager._executor = {}, None
        ref_engine = Engine(eager, max_batch=1, max_len=args.prompt_len + 8, window_block=64)
        with ref_engine.sequence() as ref_seq:
            ref_logits = ref_seq.extend(prompt)
            res["prefill_logits_rel_err"] = rel_err(logits, ref_logits)
            ref_step = ref_engine.decode([ref_seq.slot], [tokens[0]])
        with engine.sequence() as s2:
            s2.extend(prompt)
            step = engine.decode([s2.slot], [tokens[0]])
        res["decode_logits_rel_err"] = rel_err(step, ref_step)
    return res


def parse_runs(spec: str) -> list[tuple[str, dict, list[str]]]:
    """"cold,w2:K=V+--opt=x" -> [("cold", {}, []), ("w2", {"K": "V"}, ["--opt=x"])]: each run's
    environment settings and its own options."""
    runs = []
    for item in filter(None, spec.split(",")):
        name, _, settings = item.partition(":")
        items = list(filter(None, settings.split("+")))
        env = dict(kv.split("=", 1) for kv in items if not kv.startswith("--"))
        runs.append((name, env, [kv for kv in items if kv.startswith("--")]))
    return runs


def run_child(argv: list[str], cache_dir: str, timeout: float, extra_env: dict | None = None) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *argv], env=env, timeout=timeout,
                           capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout).strip()[-800:], "wall_s": time.perf_counter() - t}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t}


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def table(rows: dict) -> str:
    lines = ["| run | prefill first call s | decode first step s | decode capture step s | warm-up total s "
             "| tracing s (prefill+decode) | backend s (prefill+decode) | decode ms/step "
             "| graphs (prefill+decode) | recompiles after warm-up | process wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-120:]!r} |" + " |" * 9 + f" {fmt(r.get('wall_s'))} |")
            continue
        pre, dec = r.get("prefill_phases_s", {}), r.get("decode_phases_s", {})
        phases = [f"{fmt(pre.get(k))}+{fmt(dec.get(k))}" for k in ("tracing", "backend")]
        parts = [r["prefill_first_s"], r["decode_first_s"], r.get("decode_capture_s")]
        total = sum(parts) if None not in parts else None
        lines.append(f"| {name} | {fmt(parts[0])} | {fmt(parts[1])} | {fmt(parts[2])} | {fmt(total)} | "
                     f"{phases[0]} | {phases[1]} | "
                     f"{fmt(r['decode_ms_per_step'], '.2f')} | {r['graphs_prefill']}+{r['graphs_decode']} | "
                     f"{r['recompiles_after_warmup']} | {fmt(r['wall_s'])} |")
    return "\n".join(lines)


def where_table(rows: dict) -> str:
    """Seconds (calls) per WHERE stage in each run's first prefill call and first decode steps."""
    runs = [n for n, r in rows.items() if "where_prefill" in r]
    if not runs:
        return ""
    cell = lambda v: "-" if v is None else f"{v[0]:.2f} ({v[1]})"
    lines = ["| stage | " + " | ".join(f"{n} prefill | {n} decode" for n in runs) + " |",
             "|---|" + "---|---|" * len(runs)]
    for label, *_ in WHERE:
        lines.append(f"| {label} | " + " | ".join(
            f"{cell(rows[n]['where_prefill'].get(label))} | {cell(rows[n]['where_decode'].get(label))}"
            for n in runs) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--config", default="kimi-linear-48b-a3b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode ('none': default)")
    p.add_argument("--kernels", default="triton", choices=["triton", "torch"])
    p.add_argument("--pipeline", default="default")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the comparison with the eager run")
    p.add_argument("--timeout", type=float, default=540, help="seconds for both runs together")
    p.add_argument("--cache-dir", help="compile cache (default: a fresh temporary directory)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/out"))
    p.add_argument("--profile", nargs="?", const="all", default="",
                   help="cProfile the first prefill call and the first decode steps of these runs "
                        "(comma-separated names; alone: every run): profile-{prefill,decode}-RUN.txt/.pstats under --out")
    p.add_argument("--runs", default="cold,warm",
                   help="the processes, in order, on one cache: NAME[:KEY=VALUE[+KEY=VALUE...]], comma-separated; "
                        "the environment settings apply to that process only (e.g. warm2:TORCHINDUCTOR_COMPILE_THREADS=1); "
                        "a setting starting with -- is an option of that process instead (lwarm:--regional=layer)")
    p.add_argument("--regional", default="part", choices=["part", "layer"],
                   help="compiled regions per attention and per FFN, or per decoder layer")
    p.add_argument("--no-where", dest="where", action="store_false",
                   help="skip the wall-clock timers around the compile stack's stages (WHERE)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-name", default="cold", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pipeline in ("", "none"):
        args.pipeline = None
    args.profile = [] if not args.profile else [n for n, *_ in parse_runs(args.runs)] \
        if args.profile == "all" else args.profile.split(",")
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    forwarded = list(argv if argv is not None else sys.argv[1:])
    deadline = time.perf_counter() + args.timeout
    cache = args.cache_dir or tempfile.mkdtemp(prefix="kimi-graph-compile-cache-")
    rows = {}
    for name, env, options in parse_runs(args.runs):
        left = deadline - time.perf_counter()
        if left < 10:
            rows[name] = {"error": "no time left under --timeout"}
            continue
        rows[name] = run_child(forwarded + options + ["--run-name", name], cache, left, env)
        if env or options:
            rows[name]["settings"] = {"env": env, "options": options}
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"layers": args.layers, "config": args.config, "device": args.device, "dtype": args.dtype,
            "mode": args.mode, "kernels": args.kernels, "regional": args.regional, "pipeline": args.pipeline, "cache_dir": cache}
    (out / "compile_depth.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    print(json.dumps(meta))
    print(table(rows))
    print(where_table(rows))
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
