"""Model facts read off the graph: parameters, active parameters, caches, FLOPs and bytes."""
from __future__ import annotations

from .config import KimiLinearConfig
from .ir import Graph
from .model import build_graph, state_types
from .ops import get_op


def graph_cost(g: Graph, dims: dict[str, int]) -> dict[str, float]:
    """Total FLOPs, bytes moved and bytes sent between ranks (collectives of a sharded graph)
    for concrete dims (e.g. {"B": 1, "T": 1, "S": 1})."""
    flops = bytes_ = link = 0.0
    for _, data in g.nx.nodes(data=True):     # a sum: any order will do
        op = data["op"]
        opdef = get_op(op.kind)
        attrs = opdef.full_attrs(op.attrs)
        ins = [g.types[v] for v in op.inputs]
        outs = [g.types[v] for v in op.outputs]
        flops += opdef.flops(ins, outs, attrs, dims)
        bytes_ += opdef.bytes_moved(ins, outs, attrs, dims)
        link += opdef.link_bytes(ins, outs, attrs, dims)
    return {"flops": flops, "bytes": bytes_, "link_bytes": link}


def _is_routed_expert(name: str) -> bool:
    return ".block_sparse_moe.experts." in name


def summarize(cfg: KimiLinearConfig, g: Graph | None = None) -> dict:
    """The facts `kimi-graph inspect --json` reports, read off one graph (`g`, or the bf16
    prefill graph) and the state types; caches and states are sized in `g`'s dtype.

    active_params_per_token counts every weight a token's forward pass reads: all but the
    routed experts, plus top_k routed experts per MoE layer; the embedding table counts as
    the one row looked up (lm_head counts whole)."""
    g = build_graph(cfg, dtype="bf16") if g is None else g
    total = sum(t.numel() for t in g.params.values())
    routed = sum(t.numel() for n, t in g.params.items() if _is_routed_expert(n))
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_expert = 3 * cfg.hidden_size * (cfg.moe_intermediate_size or 0)
    embed = g.params["@model.embed_tokens.weight"].numel()
    active = total - routed + moe_layers * (cfg.num_experts_per_token or 0) * per_expert
    active -= embed - cfg.hidden_size
    if cfg.tie_word_embeddings:     # the tied table is read whole by the head
        active += embed - cfg.hidden_size
    kinds = cfg.layer_kinds
    states = state_types(cfg, g.meta.get("dtype", "bf16"))
    one = {"B": 1, "S": 1, "T": 1}
    cache = sum(t.nbytes(one) for n, t in states.items() if n.startswith("%cache."))
    state = sum(t.nbytes(one) for n, t in states.items() if n.startswith("%state."))
    cost = graph_cost(g, one)
    return {
        "total_params": total,
        "active_params_per_token": active,
        "layers": {"kda": kinds.count("kda"), "mla": kinds.count("mla")},
        "moe_layers": moe_layers,
        "kv_cache_bytes_per_token": cache,
        "kda_state_bytes_per_sequence": state,
        "flops_per_token": cost["flops"],
        "bytes_per_token": cost["bytes"],
        "op_counts": g.op_counts(),
        "num_ops": len(g),
    }


def weight_facts(model, declared: Graph, given: dict | None = None) -> dict:
    """Bytes of the weights `model` (a KimiModel) holds once every graph it runs is built
    (`given`: graphs already built with its transforms), against the checkpoint's bytes in
    its dtype (the parameters of `declared`, one of its graphs as declared), and the peak
    while loading; found on the meta device, nothing allocated."""
    from .loading import estimate
    from .weights import WeightSource

    names = model.build_graphs(given)
    source = WeightSource(declared, "meta")
    held, peak = estimate(source, names, model.transforms)
    return {"weight_bytes": held, "checkpoint_bytes": sum(map(source.nbytes, source.types)),
            "load_peak_bytes": peak}
