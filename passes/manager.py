"""The pass manager, in the MLIR manner: passes registered by name, textual pipelines
(`canonicalize,chunk-kda{chunk-size=64},cse`), the verifier after every pass, and
instrumentation (time per pass, op counts before/after, IR printed before/after passes).
"""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from kimi_graph.ir import Graph, IRError
from kimi_graph.verifier import verify
from kimi_graph.weight_transforms import WeightTransforms


class PassError(ValueError):
    """A bad pipeline, a pass that failed, or IR that no longer verifies after a pass."""


@dataclass(frozen=True)
class Option:
    type: type            # int, float, bool or str
    default: object
    help: str = ""
    choices: tuple = ()

    def convert(self, pass_name: str, key: str, text: str):
        try:
            if self.type is bool:
                low = text.lower()
                if low not in ("true", "false", "1", "0"):
                    raise ValueError
                value = low in ("true", "1")
            else:
                value = self.type(text)
        except ValueError:
            raise PassError(f"pass {pass_name!r}: option {key}={text!r} is not a "
                            f"{self.type.__name__}") from None
        if self.choices and value not in self.choices:
            raise PassError(f"pass {pass_name!r}: option {key}={text!r}; choose one of "
                            f"{', '.join(map(str, self.choices))}")
        return value


class Pass:
    """A named graph transformation. `run` mutates `g` in place (the manager hands it a
    private copy) and reports what it did through `ctx.stat`."""
    name: str = ""
    summary: str = ""
    options: dict[str, Option] = {}

    def run(self, g: Graph, ctx: "PassContext") -> None:
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}

# Named pipelines. fuse-moe-dispatch runs first: it turns the ~6.6k per-expert ops of the
# 48B graph into 4 per layer, so every later pass and verification walks a small graph
# (its patterns accept the casts canonicalize may remove, so order does not change results).
DEFAULT_PIPELINE = ("fuse-moe-dispatch,canonicalize,fuse-kda-gating,chunk-kda{chunk-size=64},"
                    "absorb-mla,fuse-residual-norm,fuse-linears,fold-constants,canonicalize,cse,dce")
PIPELINES = {"default": DEFAULT_PIPELINE}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in PASSES:
        raise PassError(f"pass name {cls.name!r} is empty or registered twice")
    PASSES[cls.name] = cls
    return cls


@dataclass
class PassContext:
    """What a running pass sees: its options, the weights (None: types only), the registry
    of weight transforms (recipes of the parameters passes derive) and counters."""
    options: dict
    weights: dict | None = None
    transforms: WeightTransforms = field(default_factory=WeightTransforms)
    stats: dict[str, int] = field(default_factory=dict)

    def stat(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n


# -- pipeline text -----------------------------------------------------------------------
def _split_top(text: str, sep: str = ",") -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PassError(f"unbalanced '}}' in pipeline {text!r}")
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise PassError(f"unbalanced '{{' in pipeline {text!r}")
    return out + [cur]


def parse_pipeline(text: str, _seen: tuple = ()) -> list[tuple[str, dict]]:
    """`name{key=value,...},name,...` -> [(pass name, typed options)]; named pipelines
    (`default`) expand in place."""
    if not isinstance(text, str):
        raise PassError(f"a pipeline is a string, got {type(text).__name__}")
    steps: list[tuple[str, dict]] = []
    for item in (s.strip() for s in _split_top(text)):
        if not item:
            continue
        name, _, rest = item.partition("{")
        name = name.strip()
        if rest and not rest.rstrip().endswith("}"):
            raise PassError(f"bad pipeline element {item!r}: expected name{{key=value,...}}")
        body = rest.rstrip()[:-1] if rest else ""
        if name in PIPELINES:
            if body.strip():
                raise PassError(f"named pipeline {name!r} takes no options")
            if name in _seen:
                raise PassError(f"named pipeline {name!r} refers to itself")
            steps += parse_pipeline(PIPELINES[name], _seen + (name,))
            continue
        if name not in PASSES:
            raise PassError(f"unknown pass {name!r}; passes: {', '.join(sorted(PASSES))}; "
                            f"pipelines: {', '.join(sorted(PIPELINES))}")
        declared = PASSES[name].options
        opts = {k: o.default for k, o in declared.items()}
        for kv in filter(None, (s.strip() for s in _split_top(body))):
            key, eq, value = kv.partition("=")
            key = key.strip()
            if not eq:
                raise PassError(f"pass {name!r}: option {kv!r} needs the form key=value")
            if key not in declared:
                known = ", ".join(sorted(declared)) or "none"
                raise PassError(f"pass {name!r} has no option {key!r}; its options: {known}")
            opts[key] = declared[key].convert(name, key, value.strip())
        steps.append((name, opts))
    return steps


def format_step(name: str, opts: dict) -> str:
    changed = {k: v for k, v in opts.items() if v != PASSES[name].options[k].default}
    if not changed:
        return name
    return name + "{" + ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                 for k, v in changed.items()) + "}"


# -- the manager -------------------------------------------------------------------------
@dataclass
class PassRecord:
    """Instrumentation for one pass run."""
    name: str
    options: dict
    seconds: float
    verify_seconds: float
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    stats: dict[str, int]

    def as_dict(self) -> dict:
        return {"pass": format_step(self.name, self.options), "seconds": self.seconds,
                "verify_seconds": self.verify_seconds, "num_ops_before": sum(self.ops_before.values()),
                "num_ops_after": sum(self.ops_after.values()), "ops_before": self.ops_before,
                "ops_after": self.ops_after, "stats": self.stats}


class PassManager:
    """Runs a pipeline over a copy of a graph.

    verify: run the verifier after every pass (on by default; a failure names the pass).
    print_ir_before / print_ir_after: pass names (or "all") whose IR is printed to `out`.
    after_pass: callback(name, graph, record) after each pass (tests compare semantics here).
    `records` holds one PassRecord per pass of the last run."""

    def __init__(self, pipeline: str, *, verify: bool = True, print_ir_before=(),
                 print_ir_after=(), out: Callable[[str], None] | None = None,
                 after_pass: Callable[[str, Graph, PassRecord], None] | None = None):
        self.steps = parse_pipeline(pipeline)
        self.verify = verify
        self.print_before, self.print_after = self._names(print_ir_before), self._names(print_ir_after)
        self.out = out or (lambda s: print(s, file=sys.stderr))
        self.after_pass = after_pass
        self.records: list[PassRecord] = []

    def _names(self, spec) -> set[str] | str:
        if spec == "all":
            return "all"
        names = {spec} if isinstance(spec, str) else set(spec)
        unknown = names - set(PASSES)
        if unknown:
            raise PassError(f"cannot print IR around unknown pass(es) {sorted(unknown)}")
        return names

    @staticmethod
    def _wants(spec, name: str) -> bool:
        return spec == "all" or name in spec

    def run(self, g: Graph, weights: dict | None = None,
            transforms: WeightTransforms | None = None) -> Graph:
        # Passes allocate many small objects over a large live heap; the cyclic collector
        # would rescan that heap again and again (a third of the 48B pipeline's time).
        # Reference counting frees what passes drop; collection resumes afterwards.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(g, weights, WeightTransforms() if transforms is None else transforms)
        finally:
            if was_enabled:
                gc.enable()

    def _run(self, g: Graph, weights: dict | None, transforms: WeightTransforms) -> Graph:
        g = g.copy()
        self.records = []
        for name, opts in self.steps:
            label = format_step(name, opts)
            if self._wants(self.print_before, name):
                self.out(f"// -----// IR Dump Before {label} //----- //\n{g}")
            before = g.op_counts()
            ctx = PassContext(dict(opts), weights, transforms)
            t0 = time.perf_counter()
            try:
                PASSES[name]().run(g, ctx)
            except IRError as e:
                raise PassError(f"pass {label} failed: {e}") from e
            t1 = time.perf_counter()
            if self.verify:
                try:
                    verify(g)
                except IRError as e:
                    raise PassError(f"IR after pass {label} does not verify: {e}") from e
            rec = PassRecord(name, opts, t1 - t0, time.perf_counter() - t1, before,
                             g.op_counts(), dict(sorted(ctx.stats.items())))
            self.records.append(rec)
            if self._wants(self.print_after, name):
                self.out(f"// -----// IR Dump After {label} //----- //\n{g}")
            if self.after_pass:
                self.after_pass(name, g, rec)
        return g


def run_pipeline(graph: Graph, pipeline: str, weights: dict | None = None,
                 transforms: WeightTransforms | None = None, **instrumentation) -> Graph:
    """Run `pipeline` over a copy of `graph`; passes that create parameters record their
    recipes in `transforms` (share one registry between the graphs of a model) and compute
    their tensors into `weights` when it is given. `instrumentation`: PassManager keywords."""
    return PassManager(pipeline, **instrumentation).run(graph, weights, transforms)


def format_timing(records: list[PassRecord]) -> str:
    """A table: pass, wall time, verify time, op count before -> after, pass statistics."""
    lines = [f"{'pass':<34}{'ms':>9}{'verify ms':>11}{'ops':>14}  stats"]
    for r in records:
        ops = f"{sum(r.ops_before.values())}->{sum(r.ops_after.values())}"
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
        lines.append(f"{format_step(r.name, r.options):<34}{r.seconds * 1e3:9.1f}"
                     f"{r.verify_seconds * 1e3:11.1f}{ops:>14}  {stats}")
    total = sum(r.seconds + r.verify_seconds for r in records)
    lines.append(f"{'total':<34}{total * 1e3:9.1f}")
    return "\n".join(lines)
