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

Prints one table (cold / warm rows) and writes compile_depth.json under $OUT (or --out).
--timeout bounds the whole run (both processes): a run past it is killed and reported.
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


def child(args) -> dict:
    """One process: load, compile through use, time, count recompiles, check."""
    import torch
    from torch._dynamo.utils import counters

    import kimi_graph
    from kimi_graph.runtime import Engine, SamplingParams

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    cfg = slice_config(args.config, args.layers)
    t = time.perf_counter()
    opts = {"compile": True, "kernels": args.kernels}
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

    seq = engine.sequence()
    prof = None
    if args.profile:        # where the first (compiling) prefill call spends its host time
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    logits, res["prefill_first_s"] = timed(lambda: seq.extend(prompt))
    if prof is not None:
        import io
        import pstats
        prof.disable()
        text = io.StringIO()
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof, stream=text).sort_stats(key).print_stats(45)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"profile-prefill-{args.run_name}.txt").write_text(text.getvalue())
        prof.dump_stats(Path(args.out) / f"profile-prefill-{args.run_name}.pstats")
    graphs_after_prefill = counters["stats"]["unique_graphs"]
    res["prefill_phases_s"] = phase_times()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    steps, tokens = [], []
    sync()
    t0 = time.perf_counter()
    for tok in seq.stream(params):
        sync()
        t1 = time.perf_counter()
        steps.append(t1 - t0)
        tokens.append(tok)
        t0 = t1
    seq.close()
    res["decode_first_s"] = steps[1] if len(steps) > 1 else None
    res["decode_ms_per_step"] = 1e3 * statistics.median(steps[4:]) if len(steps) > 8 else None
    res["decode_phases_s"] = {k: None if v is None else v - (res["prefill_phases_s"][k] or 0.0)
                              for k, v in phase_times().items()}
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


def run_child(argv: list[str], cache_dir: str, timeout: float) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT)}
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
    lines = ["| run | prefill first call s | decode first step s | tracing s (prefill+decode) "
             "| backend s (prefill+decode) | decode ms/step | graphs (prefill+decode) "
             "| recompiles after warm-up | process wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-120:]!r} | | | | | | | {fmt(r.get('wall_s'))} |")
            continue
        pre, dec = r.get("prefill_phases_s", {}), r.get("decode_phases_s", {})
        phases = [f"{fmt(pre.get(k))}+{fmt(dec.get(k))}" for k in ("tracing", "backend")]
        lines.append(f"| {name} | {fmt(r['prefill_first_s'])} | {fmt(r['decode_first_s'])} | "
                     f"{phases[0]} | {phases[1]} | "
                     f"{fmt(r['decode_ms_per_step'], '.2f')} | {r['graphs_prefill']}+{r['graphs_decode']} | "
                     f"{r['recompiles_after_warmup']} | {fmt(r['wall_s'])} |")
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
    p.add_argument("--profile", action="store_true",
                   help="profile each process's first prefill call (profile-prefill-{cold,warm}.txt under --out)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-name", default="cold", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pipeline in ("", "none"):
        args.pipeline = None
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    deadline = time.perf_counter() + args.timeout
    cache = args.cache_dir or tempfile.mkdtemp(prefix="kimi-graph-compile-cache-")
    rows = {}
    for name in ("cold", "warm"):
        left = deadline - time.perf_counter()
        if left < 10:
            rows[name] = {"error": "no time left under --timeout"}
            continue
        rows[name] = run_child(forwarded + ["--run-name", name], cache, left)
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"layers": args.layers, "config": args.config, "device": args.device, "dtype": args.dtype,
            "mode": args.mode, "kernels": args.kernels, "pipeline": args.pipeline, "cache_dir": cache}
    (out / "compile_depth.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
    print(json.dumps(meta))
    print(table(rows))
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
