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

from . import codegen, conv, elementwise, gemv, kda, kda_decode, mla, moe, moe_decode, moe_quant, moe_route, norm, prefetch
from .gemv import LinearPair, NormLinear
from .targets import config, current_target

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
    "quantized_moe_experts": (moe_decode.op_quantized_moe_experts, moe_decode.specs_for),
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
    **{k: _MOVEMENT for k in ("reshape", "transpose", "slice", "take_last", "concat", "expand", "zeros_like",
                              "stack", "embedding")},
    **{k: _UNFUSED for k in ("grouped_topk", "take_along", "renormalize", "moe_expert", "l2norm")},
    **{k: "a collective: torch.distributed (NCCL) between the kernels, capturable in a CUDA graph"
       for k in ("all_reduce", "all_gather")},
    "local_experts": "an index remap over [tokens, top_k] before the expert kernels: torch does as well",
    "quantize": "a weight transform: fold-constants computes it when the weights load",
    "dequantize": "runs inside the quantized grouped SwiGLU kernels; alone, torch's elementwise form",
}
# passes this target runs after the model's pipeline: the routed experts as one moe_experts (or
# quantized_moe_experts) op, which reads a decode-sized batch's experts by id (moe_decode), and
# larger batches' token rows by index in place of the permuted copies (moe.moe_experts)
LEGALIZE = "legalize-ort-moe"


def legalize(g: Graph) -> Graph:
    """`g` in the form this backend runs (LEGALIZE), unchanged when there is nothing to fuse."""
    if not any(op.kind in ("grouped_swiglu", "quantized_grouped_swiglu") for op in g.ops()):
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


@dataclass
class Experts:
    """A moe_experts or quantized_moe_experts op (see `legalize`) run as one step
    (moe_decode.run_step: experts read by id for a decode-sized batch, else the permuted path),
    with the shared expert folded in when it feeds the accumulator as linear(silu(gate) * up, Wd),
    gate and up linears of the same x (or slices of one, fuse-linears)."""
    ops: list                 # the shared expert's ops, then the experts op
    inputs: list[str]         # the op's operands, its acc replaced by the shared Wg, Wu, Wd
    outputs: list[str]
    rows: tuple = ()          # the shared expert's (start, end) rows of Wg and Wu
    attrs: dict | None = None  # the experts op's attributes


def _only_read_by(g: Graph, values, ops) -> bool:
    ids = {o.id for o in ops}
    return not any(v in g.outputs for v in values) and all(u.id in ids for v in values for u in g.users(v))


def _linear_rows(g: Graph, v: str, x: str):
    """(ops, weight, (start, end)) when v = linear(x, @W) or a last-dim slice of one."""
    op = g.defining_op(v)
    ops = [op] if op is not None else []
    if op is not None and op.kind == "slice" and op.attrs["dim"] % g.types[v].rank == g.types[v].rank - 1:
        lin = g.defining_op(op.inputs[0])
        ops, rows = [op, lin], (op.attrs["start"], op.attrs["end"])
    else:
        lin, rows = op, None
    if lin is None or lin.kind != "linear" or lin.inputs[0] != x or lin.inputs[1] not in g.params:
        return None
    return ops, lin.inputs[1], rows or (0, g.params[lin.inputs[1]].shape[0])


def _shared_expert(g: Graph, acc: str, x: str) -> tuple[list, list, tuple] | None:
    """(ops, [Wg, Wu, Wd], rows of Wg and Wu) when acc = linear(silu(gate) * up, @Wd)."""
    down = g.defining_op(acc)
    mul = down and down.kind == "linear" and down.inputs[1] in g.params and g.defining_op(down.inputs[0])
    if not mul or mul.kind != "mul":
        return None
    for a, b in (mul.inputs, mul.inputs[::-1]):
        silu = g.defining_op(a)
        gate = silu and silu.kind == "silu" and _linear_rows(g, silu.inputs[0], x)
        up = _linear_rows(g, b, x)
        if gate and up:
            ops = list({id(o): o for o in gate[0] + up[0] + [silu, mul, down]}.values())
            return ops, [gate[1], up[1], down.inputs[1]], (gate[2], up[2])
    return None


def _experts(g: Graph, last) -> Experts | None:
    """The moe_experts op `last` as one step, with the shared expert when it folds."""
    if not covered(g, last):
        return None
    ins = list(last.inputs)
    n = moe_decode.operands_before_acc(last.kind)
    attrs = get_op(last.kind).full_attrs(last.attrs)
    shared = _shared_expert(g, ins[n], ins[0])
    if shared is not None and g.types[ins[n]].dtype in KERNEL_DTYPES:
        sops, weights, rows = shared
        if _only_read_by(g, [v for o in sops for v in o.outputs], sops + [last]):
            return Experts(sops + [last], ins[:n] + weights + ins[n + 1:], list(last.outputs), rows, attrs)
    return Experts([last], ins, list(last.outputs), (), attrs)


@dataclass
class Convs:
    """causal_conv1d ops of one shape whose inputs are last-dim slices of one value (KDA's q, k,
    v of one fused projection) run as one launch at the first conv's place (conv.causal_conv1d_group);
    each input is its slice of that value, taken here."""
    ops: list                 # the convs, in order
    slices: list              # each conv's input slice op
    outputs: list[str]


def _conv_groups(g: Graph, order: list) -> dict[int, Convs]:
    """first conv's op id -> its group."""
    groups: dict[tuple, list] = {}
    for op in order:
        sl = g.defining_op(op.inputs[0]) if op.kind == "causal_conv1d" else None
        if sl is None or sl.kind != "slice" or not covered(g, op) \
                or sl.attrs["dim"] % g.types[sl.outputs[0]].rank != g.types[sl.outputs[0]].rank - 1:
            continue
        key = (sl.inputs[0], g.types[op.inputs[0]], g.types[op.inputs[1]], len(op.inputs),
               get_op(op.kind).full_attrs(op.attrs)["activation"])
        groups.setdefault(key, []).append((op, sl))
    out = {}
    for members in groups.values():
        if len(members) > 1:
            ops = [m[0] for m in members]
            out[ops[0].id] = Convs(ops, [m[1] for m in members], [v for o in ops for v in o.outputs])
    return out


def plan(g: Graph) -> list:
    """The schedule: ops, fused elementwise `Group`s, routed-experts chains (`Experts`), conv
    groups (`Convs`; KDA's q/k/v convs with the KDA op they feed: `kda.ConvKDA` at prefill,
    `kda_decode.DecodeStep` at decode, with f_b / g_b), norms with the linear they feed (`NormLinear`) or the router they feed
    (`moe_route.NormRoute`), MLA's two cache writes (`mla.CacheRows`), MLA's prefill attention
    with its rope key read apart (`mla.SplitKeyAttention`), also with its keys and values
    decompressed from the cache a block of rows at a time (`mla.PrefixAttention`), and pairs of
    linears of one sliced value (`LinearPair`), in an executable order.
    Refuses a KDA chunk size the kernels cannot run."""
    order = list(g.ops())
    chains = {c.ops[-1].id: c for op in order if op.kind in ("moe_experts", "quantized_moe_experts")
              and (c := _experts(g, op))}
    convs = _conv_groups(g, order)
    conv_kdas = kda.conv_kdas(g, convs, covered)       # q/k/v convs run by the KDA op's step
    for ck in conv_kdas.values():
        del convs[ck.convs.ops[0].id]
    folded = {o.id for c in chains.values() for o in c.ops[:-1]} | {o.id for c in convs.values() for o in c.ops[1:]}
    folded |= {o.id for ck in conv_kdas.values() for o in ck.convs.ops + ck.ops[:-1]}
    norms = {i: n for i, n in gemv.norm_linears(g, order, covered).items() if n.ops[-1].id not in folded}
    norms.update(moe_route.norm_routes(g, order, covered))
    folded |= {o.id for n in norms.values() for o in n.ops[1:]}
    writes = mla.cache_rows(g, [op for op in order if op.id not in folded], covered)
    folded |= {o.id for w in writes.values() for o in w.ops[:-1]}
    split_keys = mla.split_key_attentions(g, order, covered)
    writes.update({**split_keys, **mla.prefix_attentions(g, split_keys, folded)})
    folded |= {o.id for w in writes.values() for o in w.ops[:-1]}
    pairs = gemv.linear_pairs(g, order, folded)
    folded |= {p.ops[1].id for p in pairs.values()}
    steps = kda_decode.decode_steps(g, order, convs, pairs, covered)
    for st in steps.values():        # the conv group, reshapes and linear (or pair) run inside the step
        folded |= st.taken
        for key in st.taken:
            convs.pop(key, None)
            pairs.pop(key, None)
    order = [op for op in order if op.id not in folded]
    chains.update(convs)
    chains.update(conv_kdas)
    chains.update(norms)
    chains.update(pairs)
    chains.update(writes)
    chains.update(steps)
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
            schedule.append(chains.get(op.id, op))
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


def reads(item) -> list[str]:
    """The values a schedule item reads."""
    if isinstance(item, Convs):
        return [sl.inputs[0] for sl in item.slices] + [v for op in item.ops for v in op.inputs[1:]]
    if isinstance(item, kda_decode.DecodeStep):      # and what its plain parts read
        return list(item.inputs) + [v for part in item.parts for v in reads(part)]
    return list(item.inputs)


def launches(item) -> bool:
    """Does a schedule item launch kernels? (Views, reshapes and slices do not.)"""
    return REFERENCE.get(getattr(item, "kind", None)) != _MOVEMENT


def prefetchable(item) -> list[str]:
    """The values an item reads whose bytes are known before it runs (prefetch.plan): of a
    routed-experts step only its shared expert's weights (the routed ones are picked at run time)."""
    if isinstance(item, Experts):
        n = moe_decode.operands_before_acc(item.ops[-1].kind)
        return item.inputs[n:n + 3] if item.rows else []
    return reads(item)


def dead_after(g: Graph, schedule: list) -> list[list[str]]:
    """For each schedule item, the values nothing after it reads, its own unread outputs
    included (graph outputs and weights excepted): `run` drops them there, so activations live only as long as they are used."""
    last: dict[str, int] = {}
    for i, item in enumerate(schedule):
        for v in item.outputs:               # produced and never read: dropped at once
            last[v] = i
        for v in reads(item):
            last[v] = i
    keep = set(g.outputs) | set(g.params)
    drops: list[list[str]] = [[] for _ in schedule]
    for v, i in last.items():
        if v not in keep:
            drops[i].append(v)
    return drops


def routed_experts(schedule: list) -> dict[int, int]:
    """{NormRoute's index: the index of the Experts step with a folded shared expert that reads
    its normalised x, ids and weights} (moe_decode.shared_beside runs that shared expert beside
    the router)."""
    made = {v: i for i, item in enumerate(schedule) if isinstance(item, moe_route.NormRoute) for v in item.outputs}
    out = {}
    for j, item in enumerate(schedule):
        if isinstance(item, Experts) and item.rows:
            src = {made.get(v) for v in item.inputs[:3]}
            nr = src.pop() if len(src) == 1 else None
            if nr is not None and item.inputs[:3] == [schedule[nr].outputs[k] for k in (2, 0, 1)]:
                out[nr] = j
    return out


def run(g: Graph, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
        schedule: list | None = None, drops: list | None = None,
        prefetches: dict | None = None, feeds: dict | None = None) -> list[torch.Tensor]:
    """Execute `g` on kernels (see `plan`); same contract as the reference interpreter.
    State inputs may be in-place views (see `accepts_views`); ops without a view kernel
    read a dense copy of the rows in use. Each value is dropped after its last reader
    (`dead_after`). prefetches: {schedule index: [(weight, bytes)]} issued into L2 on a side
    stream before that item (prefetch.plan). feeds: `routed_experts(schedule)`."""
    if schedule is None:
        schedule = plan(g)
    if drops is None:
        drops = dead_after(g, schedule)
    env, dims = initial_env(g, inputs, params)
    dense: dict[int, torch.Tensor] = {}
    trusted = any(is_view(x) for x in inputs.values()) or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    if feeds is None:                      # router -> its experts step (shared expert beside the router)
        feeds = routed_experts(schedule)
    beside: dict[int, tuple] = {}          # experts step -> (shared output, event) launched beside

    def plain(x):
        if is_view(x):
            if id(x) not in dense:
                dense[id(x)] = x.dense()
            return dense[id(x)]
        return x

    def step(item, i: int = -1) -> None:
        if isinstance(item, Group):
            shape = tuple(eval_dim(d, dims) for d in item.shape)
            env.update(zip(item.outputs, elementwise.run_chain(item.chain, [plain(env[v]) for v in item.inputs], shape)))
            return
        if isinstance(item, kda_decode.DecodeStep):
            outs = kda_decode.run(item, [env[v] for v in item.inputs])
            if outs is None:                # the plain steps, their passed values dropped after them
                for part in item.parts:
                    step(part)
                for v in item.internal:
                    env.pop(v, None)
            else:
                env.update(zip(item.outputs, outs))
            return
        if isinstance(item, Convs):
            ins = [[None] + [env[v] for v in op.inputs[1:]] for op in item.ops]     # x: the slices below
            xs = [env[sl.inputs[0]].narrow(-1, sl.attrs["start"], sl.attrs["end"] - sl.attrs["start"])
                  for sl in item.slices]
            outs = conv.causal_conv1d_group(xs, [i[1] for i in ins], [i[2] if len(i) > 2 else None for i in ins],
                                            get_op("causal_conv1d").full_attrs(item.ops[0].attrs)["activation"])
            env.update(zip(item.outputs, [t for pair in outs for t in pair]))
            return
        if isinstance(item, kda.ConvKDA):
            env.update(zip(item.outputs, item.run([env[v] for v in item.inputs])))
            return
        if isinstance(item, Experts):
            env[item.outputs[0]] = moe_decode.run_step(item.ops[-1].kind, item.attrs,
                                                       [plain(env[v]) for v in item.inputs], item.rows,
                                                       beside.pop(i, None))
            return
        if isinstance(item, LinearPair):
            env.update(zip(item.outputs, gemv.run_pair(item, *(plain(env[v]) for v in item.inputs))))
            return
        if isinstance(item, moe_route.NormRoute):
            args = [plain(env[v]) for v in item.inputs]
            x = args[0]
            if i in feeds and moe_decode.beside_tokens(x.numel() // x.shape[-1]):
                ex = schedule[feeds[i]]
                beside[feeds[i]] = moe_decode.shared_beside(
                    ex.ops[-1].kind, ex.attrs, [None] * 3 + [plain(env[v]) for v in ex.inputs[3:]], ex.rows,
                    *args[:3], item.ops[0].attrs["eps"])
            env.update(zip(item.outputs, moe_route.run_norm_route(
                item, args, get_op("moe_route").full_attrs(item.ops[1].attrs))))
            return
        if isinstance(item, mla.CacheRows):
            env.update(zip(item.outputs, mla.run_cache_rows(item, [env[v] for v in item.inputs])))
            return
        if isinstance(item, mla.PrefixAttention):          # reads the caches' views as they are
            env.update(zip(item.outputs, mla.run_prefix_attention(item, [env[v] for v in item.inputs])))
            return
        if isinstance(item, mla.SplitKeyAttention):
            env.update(zip(item.outputs, mla.run_split_key_attention(item, [plain(env[v]) for v in item.inputs])))
            return
        if isinstance(item, NormLinear):
            env.update(zip(item.outputs, gemv.run_norm_linear(item, [plain(env[v]) for v in item.inputs],
                                                              item.ops[0].attrs["eps"])))
            return
        args = [env[v] for v in item.inputs]
        if covered(g, item):
            fn = KERNELS[item.kind][0]
            if item.kind not in VIEW_KINDS:
                args = [plain(a) for a in args]
        elif trusted and item.kind in ENGINE_IMPLS:
            fn, args = ENGINE_IMPLS[item.kind], [plain(a) for a in args]
        elif item.kind in gemv.IMPLS:          # decode-sized rows: gemv's kernels where they take them
            fn, args = gemv.IMPLS[item.kind], [plain(a) for a in args]
        else:
            fn, args = get_op(item.kind).ref, [plain(a) for a in args]
        env.update(zip(item.outputs, fn(args, op_attrs(item, dims))))

    for i, item in enumerate(schedule):
        if i:
            for v in drops[i - 1]:
                env.pop(v, None)
        if TRACE is not None:
            TRACE.append(item.outputs[0])
        if prefetches and i in prefetches:
            prefetch.issue([(env[w], n) for w, n in prefetches[i]])
        step(item, i)
    if prefetches:
        prefetch.join()
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
    prefetches: dict[int, dict] = {}

    def execute(graph: Graph, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if id(graph) not in schedules:
            legal = legalize(graph)
            schedule = plan(legal)
            schedules[id(graph)] = (graph, legal, schedule, dead_after(legal, schedule), routed_experts(schedule))
        _, legal, schedule, drops, feeds = schedules[id(graph)]
        ids = inputs.get("input_ids")
        rows = ids.numel() if ids is not None else 0
        ahead = None
        if prefetch.enabled(rows):
            if id(graph) not in prefetches:
                prefetches[id(graph)] = prefetch.plan(schedule, prefetchable, prefetch.weight_bytes(legal),
                                                      config("l2_prefetch", target), launches)
            ahead = prefetches[id(graph)]
        with codegen.step_rows(rows):     # launch.pdl_rows
            return run(legal, inputs, model.weights, schedule, drops, ahead, feeds)
    execute.accepts_views = accepts_views
    # the most cached rows a prefill's MLA attention decompresses at once (mla.prefix_attention)
    execute.attention_key_rows = lambda: config("attention", target).get("key_block", 16384)
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
