"""Graph -> ONNX model: inputs with symbolic B / T / S axes, every cache and state as an
input and a `present.*` output, weights as initializers (written once, shared by the prefill
and decode models, as external data), one operator-set table per target.

    lower(graph, weights, ops="ort"|"portable"|"standard", opset=None) -> onnx.ModelProto
"""
from __future__ import annotations

import json

import torch
from onnx import AttributeProto, TensorProto, helper

from kimi_graph.ir import Graph, IRError
from kimi_graph.ops import TORCH_DTYPES, get_op

from .emitter import DOMAIN, MS, ONNX_DTYPES, Emitter, tensor_proto, value_info

OP_SETS = ("ort", "portable", "standard")
DEFAULT_OPSET = 23          # RMSNormalization and Attention; ONNX Runtime 1.20+ runs it
MIN_OPSET = 23
MIN_OPSETS = {"ort": 23, "portable": 23, "standard": 27}     # standard: LinearAttention (ONNX 1.22+)


def default_opset(ops: str) -> int:
    return max(DEFAULT_OPSET, MIN_OPSETS.get(ops, MIN_OPSET))


def tables() -> dict[str, dict]:
    from . import ort, portable, standard
    return {"ort": ort.TABLE, "portable": portable.TABLE, "standard": standard.TABLE}


def refusals() -> dict[str, dict[str, str]]:
    """Per operator set, the op kinds it does not lower, each with the reason."""
    sharded = ("an op of sharded graphs (passes/shard.py), which run over torch.distributed; "
               "an ONNX export is the whole model on one device")
    weight_transform = "a weight transform: fold-constants makes its results parameters before export"
    return {ops: {**{k: sharded for k in ("all_reduce", "all_gather", "local_experts")},
                  "quantize": weight_transform} for ops in OP_SETS}


def ir_version_for(opset: int) -> int:
    """The lowest IR version that carries `opset` (ORT 1.31 rejects IR 14; keep it low)."""
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=True)


def state_output_name(state_input: str) -> str:
    return "present." + state_input.lstrip("%")


class LowerContext:
    """What a mapping sees: the emitter, the IR graph (types), the weights."""

    def __init__(self, g: Graph, weights, em: Emitter, ops: str):
        self.g, self.weights, self.em, self.ops = g, weights, em, ops
        self.derived: dict[str, object] = {}      # name -> () -> tensor, made only if used
        self.env: dict[str, str] = {}       # IR value -> ONNX name, filled as ops lower
        # padded batches (set by an io adapter): bool [B, T] real tokens, bool [B, S] real keys
        self.token_valid: str | None = None
        self.key_valid: str | None = None

    def env_of(self, value: str) -> str:
        return self.env[value]

    def ty(self, value: str):
        return self.g.types[value]

    def is_param(self, value: str) -> bool:
        return value in self.g.params

    def param(self, value: str) -> torch.Tensor:
        name = value[1:]
        if name not in self.weights:
            raise IRError(f"no weight for parameter {value}")
        return self.weights[name].to(TORCH_DTYPES[self.g.params[value].dtype])

    def derived_param(self, name: str, make) -> str:
        """A weight transformed at export time (transposed, stacked), stored once under `name`."""
        self.derived.setdefault(name, make)
        return name

    def transposed_param(self, value: str, dtype: str | None = None) -> str | None:
        """A [out, in] weight parameter stored as [in, out] for MatMul (converted to `dtype`
        if given, as the op library converts weights to the activation's dtype); None for
        non-params."""
        if not self.is_param(value):
            return None
        dtype = dtype or self.ty(value).dtype
        suffix = "" if dtype == self.ty(value).dtype else "." + dtype
        return self.derived_param(value[1:] + ".T" + suffix,
                                  lambda: self.param(value).t().to(TORCH_DTYPES[dtype]))

    def as_dtype(self, value: str, name: str, dtype: str) -> str:
        """Operand `value` (ONNX name `name`) in `dtype`: parameters converted at export time,
        other values by a Cast node."""
        if self.ty(value).dtype == dtype:
            return name
        if self.is_param(value):
            return self.derived_param(value[1:] + "." + dtype, lambda: self.param(value).to(TORCH_DTYPES[dtype]))
        return self.em("Cast", name, to=ONNX_DTYPES[dtype])

    def zero_tensor(self, dtype: str) -> TensorProto:
        return tensor_proto("zero", torch.zeros(1, dtype=TORCH_DTYPES[dtype]), ONNX_DTYPES[dtype])

    def one_tensor(self, dtype: str) -> TensorProto:
        return tensor_proto("one", torch.ones(1, dtype=TORCH_DTYPES[dtype]), ONNX_DTYPES[dtype])


class SubContext(LowerContext):
    """Lowering a fused op's decomposition (a subgraph): types from the subgraph; `params`
    maps the subgraph inputs that stand for parameters of the outer graph to them (none in
    a function body, which sees only its formal inputs); padded-batch masks only inline."""

    def __init__(self, outer: LowerContext, g: Graph, em: Emitter, params: dict[str, str], inline: bool):
        super().__init__(g, outer.weights, em, outer.ops)
        self.outer, self.params, self.derived = outer, params, outer.derived
        if inline:
            self.token_valid, self.key_valid = outer.token_valid, outer.key_valid

    def is_param(self, value: str) -> bool:
        return value in self.params

    def param(self, value: str) -> torch.Tensor:
        return self.outer.param(self.params[value])

    def transposed_param(self, value: str, dtype: str | None = None) -> str | None:
        return self.outer.transposed_param(self.params[value], dtype) if value in self.params else None

    def as_dtype(self, value: str, name: str, dtype: str) -> str:
        if value in self.params:
            return self.outer.as_dtype(self.params[value], name, dtype)
        return super().as_dtype(value, name, dtype)


def check_kinds(g: Graph, ops: str) -> None:
    """Raise for the first op of `g` that operator set `ops` does not lower."""
    table = tables()[ops]
    for op in g.ops():
        if op.kind not in table:
            why = refusals()[ops].get(op.kind, "")
            raise IRError(f"the {ops!r} ONNX operator set has no mapping for op {op.kind!r} ({op})"
                          + (f": {why}" if why else ""))


def lower_ops(ctx: LowerContext) -> None:
    """Lower every op of `ctx.g` through its operator set's table, filling `ctx.env`."""
    table = tables()[ctx.ops]
    check_kinds(ctx.g, ctx.ops)
    for op in ctx.g.ops():
        outs = table[op.kind](ctx, op, [ctx.env[v] for v in op.inputs])
        if len(outs) != len(op.outputs):
            raise IRError(f"{ctx.ops} mapping of {op.kind} returned {len(outs)} values for {len(op.outputs)}")
        ctx.env.update(zip(op.outputs, outs))


def decomposition_of(ctx: LowerContext, op) -> Graph:
    from kimi_graph.ops.decompose import subgraph
    return subgraph(op.kind, [ctx.ty(v) for v in op.inputs], op.attrs)


def inline_decomposition(ctx: LowerContext, op, ins: list[str]) -> list[str]:
    """`op` lowered as its decomposition, op by op, in place (the standard fallback)."""
    sub = decomposition_of(ctx, op)
    sc = SubContext(ctx, sub, ctx.em, {s: v for s, v in zip(sub.inputs, op.inputs) if ctx.is_param(v)},
                    inline=True)
    sc.env.update(zip(sub.inputs, ins))
    lower_ops(sc)
    return [sc.env[v] for v in sub.outputs]


def decomposition_call(ctx: LowerContext, op, ins: list[str]) -> list[str]:
    """`op` as one node of our domain whose function body is its decomposition, one
    function per signature (operand types and attributes). Padded batches inline it: the
    masks are not function inputs."""
    if ctx.token_valid is not None or ctx.key_valid is not None:
        return inline_decomposition(ctx, op, ins)
    sub = decomposition_of(ctx, op)
    results = [r + "_out" for r in get_op(op.kind).results]

    def build(name: str, body: Emitter):
        for v, ty in sub.inputs.items():
            for axis, d in enumerate(ty.shape):
                if isinstance(d, str):
                    body.dim_sources.setdefault(d, (v[1:], axis))
        sc = SubContext(ctx, sub, body, {}, inline=False)
        sc.env.update({v: v[1:] for v in sub.inputs})
        lower_ops(sc)
        for v, r in zip(sub.outputs, results):
            body.node("Identity", [sc.env[v]], outputs=[r])
        return [v[1:] for v in sub.inputs], results, []

    key = (op.kind, tuple(ctx.ty(v) for v in op.inputs), json.dumps(op.attrs, sort_keys=True))
    name = ctx.em.function(op.kind, key, build)
    return ctx.em.node(name, ins, len(results), domain=DOMAIN)


def lower(g: Graph, weights, *, ops: str = "ort", opset: int | None = None, name: str | None = None,
          io=None, sink=None):
    """Lower `g` to an ONNX ModelProto. Initializers are inline, or, with `sink` (see
    package.WeightsWriter), written by it to an external file and referenced: big tensors
    then never pass through protobuf. `io`: an optional adapter (see genai.py) that renames
    and reshapes inputs and outputs."""
    if ops not in OP_SETS:
        raise ValueError(f"operator set must be one of {OP_SETS}, got {ops!r}")
    opset = opset or default_opset(ops)
    check_kinds(g, ops)
    if ops == "ort":
        from kimi_graph.passes import run_pipeline
        from kimi_graph.passes.legalize_ort_moe import LEGALIZE_ORT
        weights = dict(weights)             # packed expert weights land in this copy
        g = run_pipeline(g, LEGALIZE_ORT, weights=weights)
    if ops == "standard" and opset < MIN_OPSETS[ops]:
        raise ValueError(f"opset {opset} is too old for the standard operator set: it needs opset >= "
                         f"{MIN_OPSETS[ops]} (LinearAttention, CausalConvWithState)")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the export needs opset >= {MIN_OPSET} "
                         "(RMSNormalization, Attention)")
    em = Emitter(opset=opset)
    ctx = LowerContext(g, weights, em, ops)
    env = ctx.env
    graph_inputs, graph_outputs = [], []
    for v, ty in g.inputs.items():
        env[v] = v[1:]
        for axis, d in enumerate(ty.shape):
            if isinstance(d, str) and d not in em.dim_sources:
                em.dim_sources[d] = (v[1:], axis)
    if io is not None:
        graph_inputs = io.inputs(ctx, env)
    else:
        graph_inputs = [value_info(v[1:], ty) for v, ty in g.inputs.items()]
    for v in g.params:
        env[v] = v[1:]
    lower_ops(ctx)
    out_names = ["logits"] + [state_output_name(s) for s in g.meta.get("state_inputs", [])]
    if len(out_names) != len(g.outputs):
        out_names = ["logits"] + [f"output_{i}" for i in range(1, len(g.outputs))]
    if io is not None:
        graph_outputs = io.outputs(ctx, env, out_names)
    else:
        for v, n in zip(g.outputs, out_names):
            em.node("Identity", [env[v]], outputs=[n])
            graph_outputs.append(value_info(n, g.types[v]))
    nodes = prune(em.nodes, [o.name for o in graph_outputs])
    used = referenced(nodes)
    makers = {n: make for n, make in ctx.derived.items() if n in used}
    makers.update({v[1:]: (lambda v=v: ctx.param(v)) for v in g.params if v[1:] in used})
    inits = [sink.proto(n, make) if sink is not None else tensor_proto(n, make()) for n, make in makers.items()]
    graph = helper.make_graph(nodes, name or g.name, graph_inputs, graph_outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in
                                                 sorted(em.opsets.items()) if d]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(em.functions.values()),
                              ir_version=ir_version_for(opset), producer_name="kimi-graph")
    meta = {"kimi_graph.mode": str(g.meta.get("mode", g.name)), "kimi_graph.ops": ops,
            "kimi_graph.stateful": str(bool(g.meta.get("stateful"))),
            "kimi_graph.state_inputs": ",".join(s.lstrip("%") for s in g.meta.get("state_inputs", []))}
    helper.set_model_props(model, meta)
    if ops == "standard":
        from .standard import inline_functions
        model = inline_functions(model)
    return model


def referenced(nodes) -> set[str]:
    """Every value name read by `nodes`, their subgraphs included (outer-scope reads)."""
    out = set()
    for n in nodes:
        out.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == AttributeProto.GRAPH:
                out |= referenced(a.g.node)
    return out


def prune(nodes, outputs) -> list:
    """Drop nodes none of whose results reach `outputs` (mappings that replace a group of ops
    by one fused node leave the group's own lowering dead)."""
    live = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in live for o in n.output):
            keep.append(n)
            live |= referenced([n])
    return list(reversed(keep))


__all__ = ["lower", "OP_SETS", "DEFAULT_OPSET", "ir_version_for", "state_output_name", "DOMAIN", "MS"]
