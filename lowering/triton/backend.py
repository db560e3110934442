"""The "triton" backend: runs a graph with generated kernels for the ops they cover and the
op library's torch reference for the rest (embedding, linear, movement ops, moe_expert, ...).

Elementwise ops are planned into fused groups (one kernel each): an op joins the group of
an operand's producer when it has the same output shape and every other operand was ready
before the group's first op, so a group runs whole at its first op's place.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from kimi_graph.dtypes import FLOAT_DTYPES
from kimi_graph.interpreter import initial_env, op_attrs
from kimi_graph.ir import Graph, eval_dim
from kimi_graph.ops import get_op
from kimi_graph.runtime.views import is_view

from . import conv, elementwise, kda, mla, moe, moe_quant, norm
from .targets import current_target

# kind -> (kernel launcher fn(args, attrs) -> results, AOT spec fn(kind, ins, outs, attrs, target))
KERNELS: dict[str, tuple[Callable, Callable]] = {
    "kda_fused_chunk": (kda.op_kda_fused, kda.specs_for),
    "kda_fused_recurrent": (kda.op_kda_fused, kda.specs_for),
    "kda_recurrent": (kda.op_kda_recurrent, kda.specs_for),
    "causal_conv1d": (conv.op_causal_conv1d, conv.specs_for),
    "rmsnorm": (norm.op_rmsnorm, norm.specs_for),
    "add_rmsnorm": (norm.op_add_rmsnorm, norm.specs_for),
    "gated_rmsnorm": (norm.op_gated_rmsnorm, norm.specs_for),
    "mla_latent_attention": (mla.op_mla_latent_attention, mla.specs_for),
    "causal_attention": (mla.op_causal_attention, mla.specs_for),
    "cache_write": (mla.op_cache_write, mla.specs_for),
    "moe_route": (moe.op_moe_route, moe.specs_for),
    "moe_permute": (moe.op_moe_permute, moe.specs_for),
    "grouped_swiglu": (moe.op_grouped_swiglu, moe.specs_for),
    "moe_unpermute": (moe.op_moe_unpermute, moe.specs_for),
    "quantized_grouped_swiglu": (moe_quant.op_quantized_grouped_swiglu, moe_quant.specs_for),
    "moe_experts": (moe.op_moe_experts, moe.specs_for),
}
KERNEL_DTYPES = ("f32", "bf16", "f16")
# kernels that take in-place state views (runtime/views.py) and return them as the new state
VIEW_KINDS = ("kda_fused_chunk", "kda_fused_recurrent", "kda_recurrent", "causal_conv1d",
              "mla_latent_attention", "cache_write")
_MOVEMENT = "data movement: a view or copy torch does as well"
_UNFUSED = "unfused form: a pass folds it into a kernel-backed fused op"
# the kinds no generated kernel runs (the op's torch reference does), each with its reason
REFERENCE: dict[str, str] = {
    **{k: "a GEMM: cuBLAS through torch is the bar" for k in ("linear", "matmul", "head_matmul")},
    **{k: _MOVEMENT for k in ("reshape", "transpose", "slice", "concat", "expand", "zeros_like",
                              "stack", "embedding")},
    **{k: _UNFUSED for k in ("grouped_topk", "take_along", "renormalize", "moe_expert", "l2norm")},
    **{k: "a collective: torch.distributed (NCCL) between the kernels, capturable in a CUDA graph"
       for k in ("all_reduce", "all_gather")},
    "local_experts": "an index remap over [tokens, top_k] before the expert kernels: torch does as well",
    "quantized_moe_experts": "ONNX Runtime's legalised form of the quantized experts",
    "quantize": "a weight transform: fold-constants computes it when the weights load",
    "dequantize": "runs inside the quantized grouped SwiGLU kernels; alone, torch's elementwise form",
}
# passes this target runs after the model's pipeline: the routed experts as one moe_experts op,
# which reads token rows by index and combines in place of the permuted copies (moe.moe_experts)
LEGALIZE = "legalize-ort-moe{quantized=false}"


def legalize(g: Graph) -> Graph:
    """`g` in the form this backend runs (LEGALIZE), unchanged when there is nothing to fuse."""
    if not any(op.kind == "grouped_swiglu" for op in g.ops()):
        return g
    from kimi_graph.passes import run_pipeline
    return run_pipeline(g, LEGALIZE)


def covered(g: Graph, op) -> bool:
    """Does a generated kernel run this op? (float operands in f32/bf16/f16 only)"""
    if op.kind not in KERNELS:
        return False
    floats = [g.types[v].dtype for v in op.inputs if g.types[v].dtype in FLOAT_DTYPES]   # not codes
    return all(d in KERNEL_DTYPES for d in floats)


def _elementwise(g: Graph, op) -> bool:
    if op.kind not in elementwise.KINDS:
        return False
    dts = [g.types[v].dtype for v in op.inputs + op.outputs]
    return all(d in KERNEL_DTYPES + ("f64",) for d in dts)


@dataclass
class Group:
    ops: list                 # the elementwise ops, in order
    chain: elementwise.Chain
    inputs: list[str]         # external values, in chain order
    outputs: list[str]        # values read after the group (or graph outputs)
    shape: tuple              # symbolic output shape


def plan(g: Graph) -> list:
    """The schedule: ops and fused elementwise `Group`s, in an executable order. Refuses a
    KDA chunk size the kernels cannot run."""
    order = list(g.ops())
    for op in order:
        if op.kind in ("kda_fused_chunk", "kda_recurrent") and op.attrs.get("chunk_size"):
            kda.check_chunk_size(op.attrs["chunk_size"])
    index = {op.id: i for i, op in enumerate(order)}
    group_of: dict[int, list] = {}            # op id -> its group's op list
    for op in order:
        if not _elementwise(g, op):
            continue
        shape = g.types[op.outputs[0]].shape
        chosen = None
        for v in op.inputs:
            p = g.defining_op(v)
            if p is None or p.id not in group_of:
                continue
            members = group_of[p.id]
            first = min(index[m.id] for m in members)
            ids = {m.id for m in members}
            ok = g.types[members[0].outputs[0]].shape == shape and all(
                (q := g.defining_op(w)) is None or q.id in ids or index[q.id] < first for w in op.inputs)
            if ok:
                chosen = members
                break
        if chosen is None:
            chosen = []
        chosen.append(op)
        group_of[op.id] = chosen
    out_vals = set(g.outputs)
    schedule, done = [], set()
    for op in order:
        if op.id not in group_of:
            schedule.append(op)
            continue
        members = group_of[op.id]
        if id(members) in done:
            continue
        done.add(id(members))
        schedule.append(_group(g, members, out_vals))
    return schedule


def _group(g: Graph, members: list, out_vals: set) -> Group:
    ids = {m.id for m in members}
    produced = {v for m in members for v in m.outputs}
    inputs: list[str] = []
    for m in members:
        inputs += [v for v in m.inputs if v not in produced and v not in inputs]
    outputs = [v for v in produced if v in out_vals or any(u.id not in ids for u in g.users(v))]
    outputs.sort(key=lambda v: [o for m in members for o in m.outputs].index(v))
    steps = tuple((m.outputs[0], m.kind, tuple(m.inputs), tuple(sorted(get_op(m.kind).full_attrs(m.attrs).items())))
                  for m in members)
    shape = g.types[members[0].outputs[0]].shape
    chain = elementwise.Chain(tuple((v, g.types[v].dtype) for v in inputs), steps,
                              tuple((v, g.types[v].dtype) for v in outputs), len(shape))
    return Group(members, chain, inputs, outputs, shape)


# ops run without their host-side checks when the engine drives the call (states passed as
# views, or a CUDA graph being captured): the reference embedding checks its ids on the host,
# which waits for the device; the engine has checked them before they went to the device
ENGINE_IMPLS: dict[str, Callable] = {"embedding": lambda args, attrs: [F.embedding(*args)]}
TRACE: list | None = None      # when a list: the name of each schedule item as it runs (bench/)


def accepts_views(g: Graph) -> bool:
    """Can `g` take its states as in-place views? Yes when every state input is read only by
    kernels that update views where they live, and its state output is what they return."""
    names = g.meta.get("state_inputs") or []
    if not names or len(g.outputs) != 1 + len(names):
        return False
    for name, out in zip(names, g.outputs[1:]):
        users = g.users(name)
        if not users or not all(covered(g, u) and u.kind in VIEW_KINDS for u in users):
            return False
        if not any(out in u.outputs for u in users):
            return False
    return True


def run(g: Graph, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
        schedule: list | None = None) -> list[torch.Tensor]:
    """Execute `g` on kernels (see `plan`); same contract as the reference interpreter.
    State inputs may be in-place views (see `accepts_views`); ops without a view kernel
    read a dense copy of the rows in use."""
    env, dims = initial_env(g, inputs, params)
    dense: dict[int, torch.Tensor] = {}
    trusted = any(is_view(x) for x in inputs.values()) or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())

    def plain(x):
        if is_view(x):
            if id(x) not in dense:
                dense[id(x)] = x.dense()
            return dense[id(x)]
        return x

    for item in schedule if schedule is not None else plan(g):
        if TRACE is not None:
            TRACE.append(item.outputs[0])
        if isinstance(item, Group):
            shape = tuple(eval_dim(d, dims) for d in item.shape)
            outs = elementwise.run_chain(item.chain, [plain(env[v]) for v in item.inputs], shape)
            env.update(zip(item.outputs, outs))
            continue
        args = [env[v] for v in item.inputs]
        if covered(g, item):
            fn = KERNELS[item.kind][0]
            if item.kind not in VIEW_KINDS:
                args = [plain(a) for a in args]
        elif trusted and item.kind in ENGINE_IMPLS:
            fn, args = ENGINE_IMPLS[item.kind], [plain(a) for a in args]
        else:
            fn, args = get_op(item.kind).ref, [plain(a) for a in args]
        env.update(zip(item.outputs, fn(args, op_attrs(item, dims))))
    return [env[v] for v in g.outputs]


def triton_backend(model):
    """Backend factory for `kimi_graph.load(..., backend="triton")`: kernels on the model's GPU,
    or through the Triton interpreter on CPU when TRITON_INTERPRET=1."""
    target = current_target()
    if target != "interpret" and not str(model.device).startswith("cuda"):
        raise ValueError(f"backend='triton' runs on a CUDA device (got device={model.device!r}); "
                         "on CPU set TRITON_INTERPRET=1 to use the Triton interpreter")
    if target != "interpret":
        _say_once_where_kernels_come_from(torch.device(model.device))
    schedules: dict[int, tuple[Graph, Graph, list]] = {}

    def execute(graph: Graph, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if id(graph) not in schedules:
            legal = legalize(graph)
            schedules[id(graph)] = (graph, legal, plan(legal))
        _, legal, schedule = schedules[id(graph)]
        return run(legal, inputs, model.weights, schedule)
    execute.accepts_views = accepts_views
    return execute


_SAID: set = set()


def _say_once_where_kernels_come_from(device: torch.device) -> None:
    from .aot import startup_note
    major, minor = torch.cuda.get_device_capability(device)
    note = startup_note(10 * major + minor)
    if note not in _SAID:
        _SAID.add(note)
        logging.getLogger("kimi_graph").warning(note)


def register_custom_ops(device_type: str = "cuda") -> list[str]:
    """Make the torch lowering's custom ops (`torch.ops.kimi_graph.*`) run these kernels on
    `device_type`; returns the kinds registered. Undo with set_impl(kind, device_type, None)."""
    from kimi_graph.lowering.torch.custom_ops import custom_kinds, set_impl
    kinds = [k for k in KERNELS if k in custom_kinds()]
    for k in kinds:
        set_impl(k, device_type, KERNELS[k][0])
    return kinds
