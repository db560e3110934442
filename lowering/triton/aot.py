"""Ahead-of-time builds: every kernel a model's graphs need, compiled per target without a GPU
(`triton.compile` for a `GPUTarget`), written as readable source, binaries and a manifest;
and, at run time, the artifact that matches the GPU (else Triton's JIT and its cache).

Layout of an output directory:
    manifest.json                 kernel, entry, target, arch, config, source hash, triton version
    src/<kernel>_<hash>.py        the generated source (shared by every target)
    <target>/<kernel>_<hash>.{cubin,ptx,json}
    tuning-<device>.json          shipped tuning files (optional)
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .codegen import KernelSpec, jit_function, write
from .targets import TARGETS, TUNING_ENV, load_tuning

ARTIFACTS_ENV = "KIMI_GRAPH_TRITON_ARTIFACTS"
MODES = (("prefill", False), ("prefill", True), ("decode", True))


def graph_specs(g, target: str) -> dict[tuple[str, str], tuple[KernelSpec, set]]:
    """(source hash, entry) -> (spec, op kinds using it) for one graph."""
    from kimi_graph.ops import get_op

    from . import gemv, kda, kda_decode, mla, moe_route, norm
    from .backend import KERNEL_DTYPES, KERNELS, Convs, Experts, Group, LinearPair, NormLinear, covered, legalize, plan
    from .conv import specs_for as conv_specs
    from .elementwise import chain_spec
    from .moe_decode import specs_for as experts_specs
    out: dict = {}
    g = legalize(g)
    items = list(plan(g))
    while items:
        item = items.pop(0)
        if isinstance(item, kda_decode.DecodeStep):      # its fused kernel, then its plain parts'
            items[:0] = [p for p in item.parts if not getattr(p, "kind", None) == "reshape"]
            specs, kind = item.fused_specs(g, target), "causal_conv1d+linear+kda_fused_recurrent"
        elif isinstance(item, Group):
            specs, kind = [chain_spec(item.chain, target)], "+".join(o.kind for o in item.ops)
        elif isinstance(item, Convs):
            op = item.ops[0]
            specs = conv_specs(op.kind, [g.types[v] for v in op.inputs], [], get_op(op.kind).full_attrs(op.attrs),
                               target, group=len(item.ops))
            kind = op.kind
        elif isinstance(item, kda.ConvKDA):
            specs, kind = item.specs(g, target), "causal_conv1d+kda_fused_chunk"
        elif isinstance(item, Experts):
            ins = [g.types[v] for v in item.inputs]
            specs = experts_specs(item.ops[-1].kind, ins, [g.types[v] for v in item.outputs], item.attrs, target,
                                  shared_i=item.rows[0][1] - item.rows[0][0] if item.rows else 0)
            kind = "+".join(o.kind for o in item.ops)
        elif isinstance(item, NormLinear):
            op, lin = item.ops[0], item.ops[-1]
            attrs, (N, K) = get_op(op.kind).full_attrs(op.attrs), g.types[lin.inputs[1]].shape
            dt, group = g.types[op.inputs[0]].dtype, g.types[op.inputs[1]].shape[0] if op.kind == "gated_rmsnorm" else 0
            specs = norm.specs_for(op.kind, [g.types[v] for v in op.inputs], [], attrs, target) \
                + gemv.specs_for(N, K, dt, op.kind, float(attrs["eps"]), target, group)
            kind = f"{op.kind}+linear"
        elif isinstance(item, (moe_route.NormRoute, mla.CacheRows)):   # each op's kernels, and the fused one
            specs = [sp for op in item.ops for sp in KERNELS[op.kind][1](
                op.kind, [g.types[v] for v in op.inputs], [g.types[v] for v in op.outputs],
                get_op(op.kind).full_attrs(op.attrs), target)]
            specs += item.fused_specs(g, target)
            kind = "+".join(o.kind for o in item.ops)
        elif isinstance(item, mla.SplitKeyAttention):
            specs, kind = item.fused_specs(g, target), "concat+causal_attention"
        elif isinstance(item, mla.PrefixAttention):
            specs, kind = item.fused_specs(g, target), "linear+concat+causal_attention"
        elif isinstance(item, LinearPair):
            (N, K), dt = g.types[item.inputs[1]].shape, g.types[item.ops[0].inputs[0]].dtype
            specs, kind = (gemv.specs_for(N, K, dt, None, 0.0, target, paired=True) if dt in KERNEL_DTYPES else []), \
                "linear+linear"
        elif item.kind == "head_matmul" and item.inputs[1] in g.params:
            (H, NI, R), dt = g.types[item.inputs[1]].shape, g.types[item.inputs[0]].dtype
            specs, kind = (gemv.heads_specs_for(H, NI, R, dt, target) if dt in KERNEL_DTYPES else []), "head_matmul"
        elif item.kind == "linear" and item.inputs[1] in g.params:
            (N, K), dt = g.types[item.inputs[1]].shape, g.types[item.inputs[0]].dtype
            specs, kind = (gemv.specs_for(N, K, dt, None, 0.0, target) if dt in KERNEL_DTYPES else []), "linear"
        elif covered(g, item):
            attrs = get_op(item.kind).full_attrs(item.attrs)
            specs = KERNELS[item.kind][1](item.kind, [g.types[v] for v in item.inputs],
                                          [g.types[v] for v in item.outputs], attrs, target)
            kind = item.kind
        else:
            continue
        for s in specs:
            out.setdefault((s.hash, s.entry), (s, set()))[1].add(kind)
    return out


def model_specs(model, target: str, pipeline: str | None = "default", dtype: str = "bf16") -> dict:
    """The kernels of a model (preset name, directory or config) over prefill, stateful prefill
    and decode graphs, after `pipeline`."""
    from kimi_graph.api import resolve_config
    from kimi_graph.model import build_graph
    cfg, _ = resolve_config(model)
    out: dict = {}
    for mode, stateful in MODES:
        g = build_graph(cfg, mode, stateful=stateful, dtype=dtype)
        if pipeline:
            from kimi_graph.passes import run_pipeline
            g = run_pipeline(g, pipeline)
        for key, (spec, kinds) in graph_specs(g, target).items():
            out.setdefault(key, (spec, set()))[1].update(kinds)
    return out


def compile_spec(spec: KernelSpec, target: str):
    """Compile one kernel for a target (no GPU needed) -> triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    arch = TARGETS[target]["arch"]
    if arch is None:
        raise ValueError(f"{target} is not a GPU target")
    src = ASTSource(jit_function(spec), dict(spec.signature), constexprs={})
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.config.get("maxnreg"):
        options["maxnreg"] = spec.config["maxnreg"]
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _jsonable(cfg: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, bool, list, tuple)) else str(v)) for k, v in cfg.items()}


def compile_model(model, targets: list[str], out: str | Path, *, pipeline: str | None = "default",
                  dtype: str = "bf16", tuning: str | Path | None = None, log=print) -> dict:
    """Generate, compile and write every kernel of `model` for each target; returns the manifest."""
    import triton
    out = Path(out)
    (out / "src").mkdir(parents=True, exist_ok=True)
    tun = load_tuning(tuning) if tuning else {}
    if tuning:
        shutil.copy(tuning, out / Path(tuning).name)
    entries = []
    saved = os.environ.pop(TUNING_ENV, None)
    try:
        if tun:          # the tuning file's configs apply to the target of its arch
            os.environ[TUNING_ENV] = str(tuning)
        per_target = {t: model_specs(model, t, pipeline, dtype) for t in targets}
    finally:
        os.environ.pop(TUNING_ENV, None)
        if saved is not None:
            os.environ[TUNING_ENV] = saved
    jobs = [(t, h, entry, spec, kinds) for t in targets
            for (h, entry), (spec, kinds) in sorted(per_target[t].items(), key=lambda kv: (kv[1][0].name, kv[0]))]
    for t in targets:
        (out / t).mkdir(exist_ok=True)
    for job in jobs:
        write(job[3], out / "src")
    # compile in threads: most of the time is ptxas, a subprocess. Before Python 3.12.2, ast.parse
    # (which Triton's front end calls) is not thread-safe (CPython gh-106905: "AST constructor
    # recursion depth mismatch"), so there the kernels compile one at a time.
    workers = min(8, os.cpu_count() or 1) if sys.version_info >= (3, 12, 2) else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        built = list(pool.map(lambda j: compile_spec(j[3], j[0]), jobs))
    for (target, h, entry, spec, kinds), ck in zip(jobs, built):
        stem = f"{spec.name}_{h[:12]}" + ("" if entry == spec.name else f"_{entry}")
        files = {}
        for ext in ("cubin", "ptx"):
            p = out / target / f"{stem}.{ext}"
            data = ck.asm[ext]
            p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
            files[ext] = str(p.relative_to(out))
        meta = out / target / f"{stem}.json"
        meta.write_text(json.dumps(ck.metadata._asdict(), default=vars))
        files["json"] = str(meta.relative_to(out))
        entries.append({"kernel": spec.name, "entry": entry, "ops": sorted(kinds), "target": target,
                        "arch": TARGETS[target]["arch"], "config": _jsonable(spec.config),
                        "num_warps": spec.num_warps, "num_stages": spec.num_stages,
                        "source": f"src/{spec.filename}", "source_hash": h,
                        "triton_version": triton.__version__, "shared_bytes": ck.metadata.shared,
                        "files": files})
        log(f"{target}  {stem:<48} {ck.metadata.shared:>7} B smem  ops: {', '.join(sorted(kinds))}")
    manifest = {"model": str(model), "pipeline": pipeline, "dtype": dtype, "targets": targets,
                "triton_version": triton.__version__, "tuning": Path(tuning).name if tuning else None,
                "kernels": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# -- run time: pick the artifact matching this GPU ----------------------------------------

_ARTIFACTS: dict[tuple[str, str, int], object] = {}
_INDEX: dict[str, dict] = {}


def _index(directory: str) -> dict:
    if directory not in _INDEX:
        m = json.loads((Path(directory) / "manifest.json").read_text())
        _INDEX[directory] = {(e["source_hash"], e["entry"], e["arch"], e["triton_version"]): e
                             for e in m["kernels"]}
    return _INDEX[directory]


def startup_note(arch: int, directory: str | None = None) -> str:
    """One line saying where this GPU's kernels come from: the prebuilt kernels in the
    artifact directory when its manifest has any for `arch` built by this Triton, else
    Triton's just-in-time compiler (and why)."""
    import triton
    directory = directory or os.environ.get(ARTIFACTS_ENV)
    if not directory:
        return (f"Triton kernels compile just in time for sm_{arch} (set {ARTIFACTS_ENV} to a "
                "`kimi-graph compile` output to use prebuilt ones)")
    try:
        index = _index(directory)
    except (OSError, ValueError) as e:
        return f"Triton kernels compile just in time: {directory} has no readable manifest.json ({e})"
    n = sum(1 for (_, _, a, v) in index if a == arch and v == triton.__version__)
    if n:
        return f"using {n} prebuilt kernels from {directory} (sm_{arch}, Triton {triton.__version__})"
    built = sorted({f"sm_{a} / Triton {v}" for (_, _, a, v) in index})
    return (f"Triton kernels compile just in time: {directory} holds kernels for {', '.join(built)}, "
            f"not for this GPU and Triton (sm_{arch} / Triton {triton.__version__})")


def find_artifact(spec: KernelSpec, arch: int, directory: str | None = None):
    """A loaded CompiledKernel for `spec` on `arch` from the artifact directory (argument or
    $KIMI_GRAPH_TRITON_ARTIFACTS) when its manifest has one built by this Triton; else None."""
    directory = directory or os.environ.get(ARTIFACTS_ENV)
    if not directory:
        return None
    import triton
    key = (spec.hash, spec.entry, arch, triton.__version__)
    if key not in _ARTIFACTS:
        e = _index(directory).get(key)
        if e is None:
            _ARTIFACTS[key] = None
        else:
            from triton.compiler import ASTSource
            from triton.compiler.compiler import CompiledKernel
            group = {Path(p).name: str(Path(directory) / p) for p in e["files"].values()}
            src = ASTSource(jit_function(spec), dict(spec.signature), constexprs={})   # the launcher's arg types
            _ARTIFACTS[key] = CompiledKernel(src, group, spec.hash)
    return _ARTIFACTS[key]
