"""shard{tp=N,ep=M,rank=R}: the declared graph rewritten for rank R of a tp x ep mesh
(kimi_graph/parallel.py: world = tp * ep, tp_rank = R % tp, ep_rank = R // tp).

- Attention (tensor parallel over the "tp" group): KDA and MLA heads split in contiguous
  blocks. Column-parallel: the KDA q/k/v/f_b/g_b/b projections, their convs, A_log and
  dt_bias, the MLA q_proj and kv_b_proj; row-parallel: o_proj, followed by an all_reduce.
  The low-rank f_a/g_a, o_norm and MLA's kv_a (the latent is shared by every head) stay whole,
  so each rank holds its heads' KDA and conv states and the whole MLA latent cache.
- FFN (over the "world" group): routed experts split by expert across the ep groups
  (local_experts restricts the routing to this rank's experts) and by intermediate channel
  across tp; the shared expert and the dense MLP split by intermediate channel over every
  rank; one all_reduce sums the block. The router is replicated: every rank has every token
  after the attention all_reduce, so dispatch moves nothing.
- Head: vocab-parallel lm_head over "world", all_gather of the logits. The embedding stays whole.

Parameters keep their checkpoint names with this rank's slice as type; `meta["shard"]` records
each slice ([dim, start, end, whole size] of the checkpoint's tensor), which weight sources read
(kimi_graph/weights.py), and `meta["shard"]["elsewhere"]` the other ranks' experts, so a rank
reads only its part. Runs on the graph as declared, before
the optimization passes (which then fuse the sharded graph): `shard{tp=2},default`.
"""
from __future__ import annotations

import re

from kimi_graph.ir import Graph, IRError, Op
from kimi_graph.ops import get_op
from kimi_graph.parallel import Layout, ParallelError

from .manager import Option, Pass, PassContext, PassError, register_pass

# parameter name (after "model.layers.N.") -> (sliced dim, group), per layer kind
ATTENTION = {
    "kda": {**{f"self_attn.{n}.weight": (0, "tp") for n in (
        "q_proj", "k_proj", "v_proj", "q_conv1d", "k_conv1d", "v_conv1d", "f_b_proj", "g_b_proj", "b_proj")},
        "self_attn.dt_bias": (0, "tp"), "self_attn.A_log": (2, "tp"), "self_attn.o_proj.weight": (1, "tp")},
    "mla": {"self_attn.q_proj.weight": (0, "tp"), "self_attn.kv_b_proj.weight": (0, "tp"),
            "self_attn.o_proj.weight": (1, "tp")},
}
FFN = [(re.compile(r"(mlp|block_sparse_moe\.shared_experts)\.(gate|up)_proj\.weight"), 0, "world"),
       (re.compile(r"(mlp|block_sparse_moe\.shared_experts)\.down_proj\.weight"), 1, "world"),
       (re.compile(r"block_sparse_moe\.experts\.\d+\.w[13]\.weight"), 0, "tp"),
       (re.compile(r"block_sparse_moe\.experts\.\d+\.w2\.weight"), 1, "tp")]
HEAD = {"lm_head.weight": (0, "world")}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")
_SCOPE = re.compile(r"%l(\d+)\.(kda|mla)\.")
_STATE = re.compile(r"%state\.l(\d+)\.(conv_[qkv]|kda)$")


def param_rule(name: str, layers: list[str]) -> tuple[int, str] | None:
    """(dim, group) a parameter is split along, or None when every rank holds it whole."""
    m = _LAYER.fullmatch(name)
    if m is None:
        return HEAD.get(name)
    i, rest = int(m.group(1)), m.group(2)
    if rest in ATTENTION[layers[i]]:
        return ATTENTION[layers[i]][rest]
    return next(((d, grp) for pat, d, grp in FFN if pat.fullmatch(rest)), None)


def block(size: int, parts: int, index: int) -> tuple[int, int]:
    step = size // parts
    return index * step, (index + 1) * step


@register_pass
class Shard(Pass):
    name = "shard"
    summary = "one rank's graph: tensor-parallel attention, expert-parallel MoE, vocab-parallel head"
    options = {"tp": Option(int, 1, "ranks splitting the attention heads"),
               "ep": Option(int, 1, "groups of tp ranks splitting the routed experts"),
               "rank": Option(int, 0, "this rank (0 .. tp*ep-1)")}

    def run(self, g: Graph, ctx: PassContext) -> None:
        try:
            layout = Layout(ctx.options["tp"], ctx.options["ep"], ctx.options["rank"])
        except ParallelError as e:
            raise PassError(f"shard: {e}") from None
        self.check_declared(g)
        layers = g.meta["layers"]
        heads = self.heads(g, layers)
        for i, h in heads.items():
            if h % layout.tp:
                raise PassError(f"shard: tp={layout.tp} does not divide the {h} {layers[i].upper()} "
                                f"heads of layer {i}")
        params = set(g.params)
        if layout.ep > 1:
            ctx.stat("experts-dropped", self.split_experts(g, layout))
        slices = self.slice_params(g, layers, layout)
        ctx.stat("params-sliced", len(slices))
        for name, ty in list(g.inputs.items()):          # this rank's KDA and conv states
            m = _STATE.fullmatch(name)
            if m and layout.tp > 1:
                shape = list(ty.shape)
                shape[1] //= layout.tp
                g.inputs[name] = g.types[name] = ty.with_shape(shape)
        for op in g.ops():
            m = _SCOPE.match(op.outputs[0])
            if m and op.kind in ("reshape", "expand") and layout.tp > 1:
                op.attrs["shape"] = self.local_shape(op.attrs["shape"], heads[int(m.group(1))], layout.tp)
        retype(g)
        ctx.stat("collectives", self.insert_collectives(g, layers, layout, "lm_head.weight" in slices))
        g.meta["shard"] = {"tp": layout.tp, "ep": layout.ep, "rank": layout.rank, "slices": slices,
                           "elsewhere": sorted(p[1:] for p in params - set(g.params))}

    @staticmethod
    def check_declared(g: Graph) -> None:
        if "shard" in g.meta:
            raise PassError("shard: the graph is sharded already")
        fused = sorted({op.kind for op in g.ops() if get_op(op.kind).fused})
        if fused or "layers" not in g.meta:
            raise PassError("shard: runs on the graph as declared, before the optimization passes "
                            "(it slices the checkpoint's own tensors, so each rank reads only its "
                            f"part); put it first, e.g. 'shard{{tp=2}},default' (found {', '.join(fused)})")

    @staticmethod
    def heads(g: Graph, layers: list[str]) -> dict[int, int]:
        """Attention heads per layer: KDA from A_log [1,1,H,1], MLA from the q reshape [B,T,H,D]."""
        out = {}
        for i, kind in enumerate(layers):
            if kind == "kda":
                out[i] = g.params[f"@model.layers.{i}.self_attn.A_log"].shape[2]
        for op in g.ops():
            m = _SCOPE.match(op.outputs[0])
            if m and m.group(2) == "mla" and op.kind == "reshape" and op.outputs[0].startswith(f"%l{m.group(1)}.mla.q"):
                out[int(m.group(1))] = op.attrs["shape"][2]
        return out

    @staticmethod
    def local_shape(shape: list, heads: int, tp: int) -> list:
        """[B, T, H, D] -> [B, T, H/tp, D]; [B, T, H*D] -> [B, T, H*D/tp]; others as they are
        (the shared MLA key slice [B, S, 1, P])."""
        shape = list(shape)
        if len(shape) == 4 and shape[2] == heads:
            shape[2] //= tp
        elif len(shape) == 3:
            shape[2] //= tp
        return shape

    @staticmethod
    def split_experts(g: Graph, layout: Layout) -> int:
        """Keep this ep rank's block of each layer's routed experts, renumbered from 0, reading
        the routing through local_experts. -> experts dropped."""
        chains: dict[tuple, list[Op]] = {}
        for op in g.ops():
            if op.kind == "moe_expert":
                chains.setdefault((op.inputs[2], op.inputs[3]), []).append(op)
        dropped = 0
        for (ids, weights), ops in chains.items():
            E = ops[0].attrs["num_experts"]
            if E % layout.ep:
                raise PassError(f"shard: ep={layout.ep} does not divide the {E} routed experts")
            first, end = block(E, layout.ep, layout.ep_rank)
            local = g.add_op("local_experts", [ids, weights], [g.types[ids], g.types[weights]],
                             {"first": first, "count": end - first},
                             out_names=[g.fresh(ids[1:] + ".local"), g.fresh(weights[1:] + ".local")])
            for op in ops:
                e = op.attrs["expert"]
                if first <= e < end:
                    op.attrs.update(expert=e - first, num_experts=end - first)
                    _rewire(g, op, {ids: local.outputs[0], weights: local.outputs[1]})
                else:
                    g.replace_uses(op.outputs[0], op.inputs[0])
                    g.remove_op(op.id)
                    dropped += 1
        read = {v for op in g.ops() for v in op.inputs}
        for p in [p for p in g.params if p not in read]:
            g.remove_param(p)
        return dropped

    @staticmethod
    def slice_params(g: Graph, layers: list[str], layout: Layout) -> dict[str, list[int]]:
        slices = {}
        for p, ty in list(g.params.items()):
            rule = param_rule(p[1:], layers)
            if rule is None or layout.size(rule[1]) == 1:
                continue
            d, group = rule
            n = layout.size(group)
            if ty.shape[d] % n:
                raise PassError(f"shard: {p[1:]} {list(ty.shape)} does not split in {n} along dim {d} "
                                f"({group} = {n} ranks)")
            start, end = block(ty.shape[d], n, layout.index(group))
            shape = list(ty.shape)
            shape[d] = end - start
            g.params[p] = g.types[p] = ty.with_shape(shape)
            slices[p[1:]] = [d, start, end, ty.shape[d]]
        return slices

    @staticmethod
    def insert_collectives(g: Graph, layers: list[str], layout: Layout, head_split: bool) -> int:
        """all_reduce after each attention block (tp) and FFN block (world); all_gather of the
        vocab-parallel logits (world)."""
        n = 0
        for i in range(len(layers)):
            for res, group in (("attn_res", "tp"), ("ffn_res", "world")):
                size = layout.size(group)
                if size > 1:
                    add = g.defining_op(f"%l{i}.{res}")
                    value = add.inputs[1]
                    insert_after(g, value, "all_reduce", {"group": group, "size": size},
                                 f"l{i}.{res[:-4]}.all_reduce")
                    n += 1
        if head_split:
            insert_after(g, g.outputs[0], "all_gather", {"group": "world", "size": layout.world, "dim": -1},
                         "head.all_gather")
            n += 1
        return n


def _rewire(g: Graph, op: Op, new: dict[str, str]) -> None:
    """Point `op`'s operands in `new` at their replacements, keeping the def-use edges right."""
    old_sources = {g.producer.get(v) for v in op.inputs if v in new}
    op.inputs = [new.get(v, v) for v in op.inputs]
    for src in old_sources:
        if src is not None and not any(g.producer.get(v) == src for v in op.inputs):
            g.nx.remove_edge(src, op.id)
    for v in new.values():
        if g.producer.get(v) is not None:
            g.nx.add_edge(g.producer[v], op.id)


def insert_after(g: Graph, value: str, kind: str, attrs: dict, hint: str) -> str:
    """A one-operand op on `value` that every reader of `value` (and the outputs) reads instead."""
    users = g.users(value)
    out = g.fresh(hint)
    g.add_op(kind, [value], get_op(kind).infer([g.types[value]], get_op(kind).full_attrs(attrs)),
             attrs, out_names=[out])
    for u in users:
        _rewire(g, u, {value: out})
    g.outputs = [out if v == value else v for v in g.outputs]
    return out


def retype(g: Graph) -> None:
    """Infer every op's result types again, in order, from the (re-typed) inputs and parameters."""
    for op in g.ops():
        opdef = get_op(op.kind)
        try:
            types = opdef.infer([g.types[v] for v in op.inputs], opdef.full_attrs(op.attrs))
        except IRError as e:
            raise PassError(f"shard: {op.outputs[0]} no longer type-checks: {e}") from e
        for v, t in zip(op.outputs, types):
            g.types[v] = t
