"""Shared helpers for the kernel benchmarks: the two ceilings (copy bandwidth, bf16 GEMM rate)
measured in the same run, median timing, errors against fp64, result files with provenance."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))          # run from a checkout without installing


def bench(fn, warmup=25, rep=100) -> float:
    """Median milliseconds of fn() (CUDA events, through triton.testing.do_bench)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_graph(fn, replays: int = 20) -> float:
    """Median milliseconds of fn() replayed from a captured CUDA graph (no host launch cost:
    how a decode engine runs small steps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            fn()
    return bench(graph.replay) / replays


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * nbytes / (ms * 1e-3)


def gemm_rate(n: int = 8192) -> float:
    """bf16 matrix-product FLOP/s through torch (cuBLAS) on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * n ** 3 / (ms * 1e-3)


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def provenance() -> dict:
    """Device, date, versions and commit: KIMI_GRAPH_COMMIT when set (a copied tree's own git
    may be stale), else the checkout's HEAD."""
    commit = os.environ.get("KIMI_GRAPH_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                          capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        commit = "?"
    import triton
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"device": device, "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "torch": torch.__version__, "triton": triton.__version__}


def write_result(name: str, rows: list[dict], extra: dict | None = None) -> dict:
    """Print a table and write bench/results/NAME.json (and $OUT/NAME.json when set)."""
    data = {**provenance(), **(extra or {}), "rows": rows}
    text = json.dumps(data, indent=1)
    for d in filter(None, [os.environ.get("OUT"), str(ROOT / "results")]):
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / f"{name}.json").write_text(text)
    keys = list(rows[0]) if rows else []
    print(f"== {name}  ({data['device']}, {data['date']}, commit {data['commit']})")
    print("  ".join(f"{k:>12}" for k in keys))
    for r in rows:
        print("  ".join(f"{(f'{v:.4g}' if isinstance(v, float) else str(v)):>12}" for v in r.values()))
    return data


def override_config(family: str, **values) -> None:
    """Set tile parameters of one kernel family on this GPU's target (for sweeps), dropping
    the cached specs so the next launch regenerates its kernels."""
    import importlib
    import pkgutil

    import kimi_graph.lowering.triton as package
    from kimi_graph.lowering.triton.targets import TARGETS, current_target, load_tuning
    TARGETS[current_target()]["configs"][family].update(values)
    tuned = load_tuning(None).get("configs", {})    # the tuning file's parse (cached, kept below): the
    if family in tuned:                             # override wins over the file's keys too
        tuned[family].update(values)
    for info in pkgutil.iter_modules(package.__path__):     # every kernel module's cached specs
        mod = importlib.import_module(f"{package.__name__}.{info.name}")
        for v in vars(mod).values():
            if hasattr(v, "cache_clear") and getattr(v, "__name__", "") != "_parsed_tuning":
                v.cache_clear()


def merge_tuning(family: str, cfg: dict, note: str = "") -> Path:
    """Add one family's measured best config to this device's tuning file (in $OUT and
    bench/results), the file `kimi-graph compile --tuning` ships."""
    from kimi_graph.lowering.triton.targets import write_tuning
    major, minor = torch.cuda.get_device_capability()
    name = "tuning-" + torch.cuda.get_device_name().lower().replace(" ", "-") + ".json"
    path = ROOT / "results" / name
    data = json.loads(path.read_text()) if path.exists() else {"configs": {}, "notes": {}}
    data["configs"][family] = cfg
    data["notes"][family] = note
    write_tuning(path, torch.cuda.get_device_name(), 10 * major + minor, data["configs"], data["notes"])
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(path.read_text())
    return path


def _profiled(fn, reps: int):
    """The CUDA kernel events (memcpy / memset excluded) of `reps` calls of fn(), after one warm-up."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not any(w in e.name.lower() for w in ("memcpy", "memset"))]


def kernel_events(fn, reps: int = 5) -> list[tuple[str, float]]:
    """(kernel name, ms) of every GPU kernel `reps` calls of fn() run, from torch.profiler
    (memcpy / memset excluded)."""
    return [(e.name, (getattr(e, "device_time", None) or getattr(e, "cuda_time", 0)) / 1e3)
            for e in _profiled(fn, reps)]


def kernel_span(fn, reps: int = 5) -> float:
    """ms a call from the first kernel's start to the last kernel's end over `reps` back-to-back
    calls (kernels plus the gaps between them), from torch.profiler."""
    ev = _profiled(fn, reps)
    return (max(e.time_range.end for e in ev) - min(e.time_range.start for e in ev)) / 1e3 / reps


def per_name(events: list[tuple[str, float]], reps: int) -> dict:
    """ms per call by kernel name, largest first."""
    out: dict = {}
    for name, ms in events:
        out[name] = out.get(name, 0.0) + ms / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def kernel_times(fn, reps: int = 5) -> dict:
    """CUDA time per kernel name (ms per call) over `reps` calls, from torch.profiler."""
    return per_name(kernel_events(fn, reps), reps)
