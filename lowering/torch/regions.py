"""Regional compilation: a layer graph cut into regions, two per decoder layer (its attention
and its FFN) plus the embedding before and the head after, so that torch.compile traces and
compiles each distinct region once and reuses it for every layer of the same kind (torch's
regional-compilation recipe). Compile time then follows the number of distinct parts (KDA and
MLA attention, dense and MoE FFN), not the depth; a KDA attention is traced once, whether the
layer's FFN is dense or MoE.

`split_regions(g)` cuts the graph in execution order: embed, l0_attn, l0_ffn, l1_attn, ...,
head (`per="layer"`: embed, l0, l1, ..., head, each layer's two parts together). An op belongs to the part its result is named after ("%l3.kda.q" -> l3_attn,
"%l3.moe.*" -> l3_ffn; "%embed" before the layers, "%head.*" after) or, if later, to the last
region that produces one of its operands. A norm that opens a part ("%lN.attn_norm",
"%head.norm", with the residual sum fused into it) closes the part before, so every part of a
kind has the same shape: an attention or FFN body, then the next part's norm. Each region
becomes a graph of its own with canonical names (inputs %in0.., parameters @w0.. in order of
first use, results %v0..), so two parts of one kind print the same text, their `key`. A
region returns what later regions read, the graph's outputs, and results nothing reads (the
last layer's unused residual), so the last layer's FFN matches the others.

`RegionalModule(g, weights, compile_fn)` lowers each key once: the lowered module's
`forward` becomes the method of one class per key, instantiated per region with its weights
as buffers. `compile_fn(forward)` compiles that shared method once; dynamo keys its cache on
the code object and guards on tensor properties, not on which layer's weights it sees, so
every region of the kind reuses one compiled graph. The dims the graph leaves symbolic (batch
B, sequence T, cache window S) are marked dynamic on each region's inputs at the first call,
so growing lengths never recompile. Values are dropped after their last reader.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from kimi_graph.ir import Graph

from .fx import lower, mangle

_LAYER = re.compile(r"%l(\d+)\.([A-Za-z_]*)")
_FFN_PARTS = ("mlp", "moe", "ffn_res")      # an FFN's ops and the residual sum after it


@dataclass
class Region:
    name: str                  # "embed", "l0_attn", "l0_ffn", ..., "head"
    graph: Graph               # the region with canonical names
    inputs: list[str]          # the outer values it takes, in its graph's input order
    outputs: list[str]         # the outer values it defines that others read (or none do)
    params: dict[str, str]     # canonical parameter name -> outer parameter name
    key: str                   # canonical text: equal keys, one compiled region


def _part(name: str, n_layers: int) -> int:
    """The part a result's name places it in: 0 embed, 2N+1 layer N's attention, 2N+2 its FFN,
    2 n_layers + 1 the head; a norm opening a part goes to the part before."""
    m = _LAYER.match(name)
    if m:
        n, part = int(m.group(1)), m.group(2)
        return 2 * n if part == "attn_norm" else 2 * n + 2 if part in _FFN_PARTS else 2 * n + 1
    if name.startswith("%head"):
        return 2 * n_layers if name == "%head.norm" else 2 * n_layers + 1
    return 0


def _part_name(index: int, n_layers: int, per: str) -> str:
    if index == 0:
        return "embed"
    if index > 2 * n_layers:
        return "head"
    if per == "layer":
        return f"l{(index - 1) // 2}"
    return f"l{(index - 1) // 2}_{'attn' if index % 2 else 'ffn'}"


REGIONS_PER = ("part", "layer")


def split_regions(g: Graph, per: str = "part") -> list[Region]:
    """The graph's regions in execution order (see the module docstring). per="layer": one
    region per decoder layer (its attention and FFN together) instead of one per part: fewer
    regions to run and capture, more distinct ones to compile (a layer's attention and FFN
    kinds combined)."""
    if per not in REGIONS_PER:
        raise ValueError(f"regions per {per!r}: expected one of {REGIONS_PER}")
    part = _part if per == "part" else (lambda name, n: 2 * ((_part(name, n) + 1) // 2))
    n_layers = len(g.meta.get("layers", ())) or 1 + max(
        (int(m.group(1)) for op in g.ops() if (m := _LAYER.match(op.outputs[0]))), default=-1)
    where: dict[str, int] = {}          # value -> region index
    members: dict[int, list] = {}
    for op in g.ops():
        r = max([part(op.outputs[0], n_layers), *(where[v] for v in op.inputs if v in where)])
        members.setdefault(r, []).append(op)
        for v in op.outputs:
            where[v] = r
    readers: dict[str, set[int]] = {}
    for r, ops in members.items():
        for op in ops:
            for v in op.inputs:
                readers.setdefault(v, set()).add(r)
    graph_outputs = set(g.outputs)
    return [_region(g, _part_name(r, n_layers, per), members[r], r, readers, graph_outputs)
            for r in sorted(members)]


def _region(g: Graph, name: str, ops: list, index: int, readers, graph_outputs) -> Region:
    sub = Graph("region")
    rename: dict[str, str] = {}
    inputs, params, n_values = [], {}, 0
    for op in ops:
        for v in op.inputs:
            if v in rename:
                continue
            if v in g.params:
                rename[v] = sub.add_param(f"w{len(params)}", g.types[v])
                params[rename[v][1:]] = v[1:]
            else:
                rename[v] = sub.add_input(f"in{len(inputs)}", g.types[v])
                inputs.append(v)
        outs = []
        for v in op.outputs:
            rename[v], n_values = f"%v{n_values}", n_values + 1
            outs.append(rename[v])
        sub.add_op(op.kind, [rename[v] for v in op.inputs], [g.types[v] for v in op.outputs],
                   op.attrs, out_names=outs)
    defined = [v for op in ops for v in op.outputs]
    outputs = [v for v in defined if v in graph_outputs or v not in readers or readers[v] - {index}]
    sub.outputs = [rename[v] for v in outputs]
    return Region(name, sub, inputs, outputs, params, str(sub))


def symbolic_dims(g: Graph) -> list[list[int]]:
    """Per graph input, the axes its type leaves symbolic."""
    return [[i for i, d in enumerate(ty.shape) if isinstance(d, str)] for ty in g.inputs.values()]


class MarkDynamic:
    """`fn(*inputs)` that, at its first call, marks the axes `dims` names (per input) dynamic,
    so that the first graph torch.compile traces is already general in them."""

    def __init__(self, dims: list[list[int]], fn: Callable):
        self.dims, self.fn, self.marked = dims, fn, False

    def __call__(self, *args):
        if not self.marked:
            for t, axes in zip(args, self.dims):
                for i in axes:
                    torch._dynamo.maybe_mark_dynamic(t, i)
            self.marked = True
        return self.fn(*args)


class RegionalModule(torch.nn.Module):
    """Runs a layer graph region by region: `forward(*graph inputs) -> tuple of outputs`, as
    the module `lower(g, weights)` would. `compile_fn(fn) -> compiled fn` is applied once
    per distinct region (None: eager); `mark_dynamic`: mark each region's symbolic axes
    dynamic at its first call; `per`: "part" or "layer" (split_regions). `kinds` counts the
    distinct regions."""

    def __init__(self, g: Graph, weights: Mapping[str, torch.Tensor],
                 compile_fn: Callable[[Callable], Callable] | None = None, mark_dynamic: bool = True,
                 per: str = "part"):
        super().__init__()
        self.input_names, self.output_names = list(g.inputs), list(g.outputs)
        shared: dict[str, tuple[type, Callable]] = {}
        self.steps: list[tuple[Callable, Region]] = []
        for region in split_regions(g, per):
            own = {canon: weights[outer] for canon, outer in region.params.items()}
            if region.key not in shared:
                template = type(lower(region.graph, own))
                cls = type(f"Region{len(shared)}_{region.name}", (torch.nn.Module,),
                           {"forward": template.forward})
                shared[region.key] = (cls, compile_fn(cls.forward) if compile_fn else cls.forward)
            cls, fn = shared[region.key]
            module = cls()
            for canon, w in own.items():
                module.register_buffer(mangle("@" + canon), w)
            self.add_module(region.name, module)
            call = functools.partial(fn, module)
            if mark_dynamic:
                call = MarkDynamic(symbolic_dims(region.graph), call)
            self.steps.append((call, region))
        self.kinds = len(shared)
        last_read = {v: i for i, (_, region) in enumerate(self.steps) for v in region.inputs}
        kept = set(self.output_names)
        self.dead_after = [[v for v in (*region.inputs, *region.outputs)      # env drops them
                            if v not in kept and last_read.get(v, i) <= i]
                           for i, (_, region) in enumerate(self.steps)]

    def forward(self, *args):
        env = dict(zip(self.input_names, args))
        for (call, region), dead in zip(self.steps, self.dead_after):
            env.update(zip(region.outputs, call(*[env[v] for v in region.inputs])))
            for v in dead:
                del env[v]
        return tuple(env[v] for v in self.output_names)
