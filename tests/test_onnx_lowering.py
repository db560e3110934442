"""ONNX lowering: both operator sets against the reference interpreter on random tiny
configs (ONNX Runtime CPU, and onnx.reference for the portable set), as declared and after
the default pass pipeline; checker and strict shape inference on every model.

Tolerance: fp32, max |ours - interpreter| / max |interpreter| <= 1e-4 per output (measured
about 1e-6: the differences are fp32 summation orders and, in the portable KDA, the
chunkwise form of the recurrence).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import kimi_graph  # noqa: E402
from checkpoints import random_config  # noqa: E402
from kimi_graph.config import KimiLinearConfig  # noqa: E402
from kimi_graph.interpreter import run_graph  # noqa: E402
from kimi_graph.ir import IRError  # noqa: E402
from kimi_graph.lowering.onnx import lower  # noqa: E402

RTOL = 1e-4
OPS = ("ort", "portable", "standard")


def rel_err(got, ref: torch.Tensor) -> float:
    got = torch.from_numpy(np.asarray(got)).to(ref.dtype)
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def inputs_for(g, B, T, S, seed, pos=None):
    gen = torch.Generator().manual_seed(seed)
    V = g.params["@model.embed_tokens.weight"].shape[0]
    x = {"input_ids": torch.randint(0, V, (B, T), generator=gen)}
    if g.meta.get("stateful"):
        x["cache_pos"] = torch.tensor(pos if pos is not None else [S - T] * B)
        for n in g.meta["state_inputs"]:
            shape = [S if d == "S" else B if d == "B" else d for d in g.inputs[n].shape]
            x[n[1:]] = 0.3 * torch.randn(shape, generator=gen)
    return x


def session(proto):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def check_and_run(g, weights, ops, feeds):
    proto = lower(g, weights, ops=ops)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    return proto, session(proto).run(None, {k: v.numpy() for k, v in feeds.items()})


def model_for(seed, pipeline=None):
    if seed is None:
        return kimi_graph.load("tiny", pipeline=pipeline)
    return kimi_graph.load(KimiLinearConfig.from_dict(random_config(seed)), seed=seed, pipeline=pipeline)


CASES = [("prefill", False, 7), ("prefill", True, 21), ("decode", True, 1)]


@pytest.mark.parametrize("seed", [None, 3, 11], ids=["tiny", "random3", "random11"])
@pytest.mark.parametrize("pipeline", [None, "default"], ids=["declared", "default_pipeline"])
@pytest.mark.parametrize("ops", OPS)
def test_onnx_runtime_matches_interpreter(ops, pipeline, seed):
    m = model_for(seed, pipeline)
    for mode, stateful, T in CASES:
        g = m.get_graph(mode, stateful)
        S = T + 5 if stateful else T
        feeds = inputs_for(g, 2, T, S, seed=7, pos=[5, 2] if stateful else None)
        ref = run_graph(g, feeds, m.weights)
        _, outs = check_and_run(g, m.weights, ops, feeds)
        assert len(outs) == len(ref)
        errs = [rel_err(o, r) for o, r in zip(outs, ref)]
        assert max(errs) <= RTOL, (mode, stateful, errs)


@pytest.mark.parametrize("ops", ["portable", "standard"])
@pytest.mark.parametrize("pipeline", [None, "default"], ids=["declared", "default_pipeline"])
def test_portable_runs_under_onnx_reference(pipeline, ops):
    from onnx.reference import ReferenceEvaluator
    m = model_for(None, pipeline)
    for mode, stateful, T in (("prefill", True, 19), ("decode", True, 1)):
        g = m.get_graph(mode, stateful)
        feeds = inputs_for(g, 2, T, T + 4, seed=1, pos=[4, 1])
        ref = run_graph(g, feeds, m.weights)
        proto, ort_outs = check_and_run(g, m.weights, ops, feeds)
        outs = ReferenceEvaluator(proto).run(None, {k: v.numpy() for k, v in feeds.items()})
        for o, oo, r in zip(outs, ort_outs, ref):
            assert rel_err(o, r) <= RTOL and rel_err(o, torch.from_numpy(oo)) <= RTOL


@pytest.mark.parametrize("ops", OPS)
def test_prefill_then_decode_steps_carry_states(ops):
    """Prefill a prompt, then decode 3 tokens feeding back each step's states (ONNX)
    versus the same chain in the interpreter; logits at every step within 1e-4."""
    m = model_for(5)
    pre, dec = m.get_graph("prefill", True), m.get_graph("decode")
    sp, sd = session(lower(pre, m.weights, ops=ops)), session(lower(dec, m.weights, ops=ops))
    S, names = 12, [n[1:] for n in pre.meta["state_inputs"]]
    feeds = inputs_for(pre, 2, 6, S, seed=2, pos=[0, 0])
    for n in names:
        feeds[n] = torch.zeros_like(feeds[n])
    ref_feeds = dict(feeds)
    outs, ref = sp.run(None, {k: v.numpy() for k, v in feeds.items()}), run_graph(pre, ref_feeds, m.weights)
    for step in range(4):
        assert max(rel_err(o, r) for o, r in zip(outs, ref)) <= RTOL, step
        tok = ref[0][:, -1].argmax(-1, keepdim=True)
        pos = torch.tensor([6 + step, 6 + step])
        feeds = {"input_ids": tok, "cache_pos": pos, **{n: torch.from_numpy(o) for n, o in zip(names, outs[1:])}}
        ref_feeds = {"input_ids": tok, "cache_pos": pos, **dict(zip(names, ref[1:]))}
        if step < 3:
            outs = sd.run(None, {k: v.numpy() for k, v in feeds.items()})
            ref = run_graph(dec, ref_feeds, m.weights)


def test_operator_sets_use_the_intended_ops():
    m = model_for(None, "default")
    for mode in ("prefill", "decode"):
        g = m.get_graph(mode, True)
        ort_kinds = {(n.domain, n.op_type) for n in all_nodes(lower(g, m.weights, ops="ort").graph)}
        for op in ("LinearAttention", "CausalConvWithState", "MoE", "SkipSimplifiedLayerNormalization"):
            assert ("com.microsoft", op) in ort_kinds, (mode, op)
        assert ("", "Attention") in ort_kinds
        proto = lower(g, m.weights, ops="portable")
        domains = {n.domain for n in proto.graph.node} | {n.domain for f in proto.functions for n in f.node}
        assert domains <= {"", "kimi_graph"}
        assert {f.name for f in proto.functions} >= {"moe_route", "grouped_swiglu", "gated_rmsnorm"}
        # KDA prefill is a loop over chunks, never unrolled per token
        if mode == "prefill":
            kda = next(f for f in proto.functions if f.name == "kda_chunkwise")
            assert [n.op_type for n in kda.node].count("Loop") == 1
    plain = model_for(None)            # the declared graph reads the per-expert weights
    graph = lower(plain.build("prefill", True), plain.weights, ops="ort").graph
    counts = {}
    for n in graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    cfg = m.config
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert counts["If"] == moe_layers and "moe_expert" not in counts
    for n in graph.node:
        if n.op_type == "If":      # positive weights: one k-way call; otherwise one call per slot
            br = {a.name: a.g for a in n.attribute}
            moes = [[x for x in br[b].node if x.op_type == "MoE"] for b in ("then_branch", "else_branch")]
            assert len(moes[0]) == 1 and len(moes[1]) == cfg.num_experts_per_token
    assert counts["LinearAttention"] == cfg.layer_kinds.count("kda")


def all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)


def test_symbolic_axes_and_state_io():
    m = model_for(None)
    g = m.get_graph("decode")
    proto = lower(g, m.weights)
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    outs = [o.name for o in proto.graph.output]
    assert ins["input_ids"] == ["B", 1] and ins["cache_pos"] == ["B"]
    assert ins["cache.l1.latent"] == ["B", "S", m.config.kv_lora_rank]
    assert outs == ["logits"] + ["present." + n[1:] for n in g.meta["state_inputs"]]
    assert proto.ir_version <= 11 and {o.domain: o.version for o in proto.opset_import}[""] == 23


def test_errors():
    m = model_for(None)
    g = m.build()
    with pytest.raises(ValueError, match="operator set"):
        lower(g, m.weights, ops="tensorrt")
    with pytest.raises(ValueError, match="opset 17 is too old"):
        lower(g, m.weights, opset=17)
    with pytest.raises(IRError, match="no weight for parameter"):
        lower(g, {k: v for k, v in m.weights.items() if "lm_head" not in k})
    g.add_op("matmul", ["%input_ids", "%input_ids"], [g.types["%input_ids"]], out_names=["%odd"])
    g.nx.nodes[max(g.nx.nodes)]["op"].kind = "mystery_op"
    with pytest.raises(IRError, match="no mapping for op 'mystery_op'"):
        lower(g, m.weights)
