"""Single fused ops, optional operands absent or present, lowered by both operator sets and
run by ONNX Runtime (and onnx.reference for the portable set) against each op's torch
reference: the mappings one by one, beyond what the default pipeline happens to emit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from kimi_graph.builder import GraphBuilder  # noqa: E402
from kimi_graph.interpreter import run_graph  # noqa: E402
from kimi_graph.lowering.onnx import lower  # noqa: E402

B, T, H, K, V, D, E, k, S = 2, 19, 2, 4, 5, 6, 4, 2, 23
F32 = "f32"


def kda(kind, state):
    def build(b):
        q, kk = b.input("q", ("B", "T", H, K), F32), b.input("k", ("B", "T", H, K), F32)
        v = b.input("v", ("B", "T", H, V), F32)
        f, bb = b.input("f", ("B", "T", H * K), F32), b.input("b", ("B", "T", H), F32)
        A, dt = b.param("A_log", (1, 1, H, 1), F32), b.param("dt_bias", (H * K,), F32)
        st = b.input("state", ("B", H, K, V), F32) if state else None
        return b.emit(kind, q, kk, v, f, bb, A, dt, st, scale=K ** -0.5)
    return build


def mla(q_start):
    def build(b):
        ql, qr = b.input("ql", ("B", "T", H, D), F32), b.input("qr", ("B", "T", H, 3), F32)
        c, kr = b.input("c", ("B", "S", D), F32), b.input("kr", ("B", "S", 3), F32)
        qs = b.input("qs", ("B",), "i64") if q_start else None
        return b.emit("mla_latent_attention", ql, qr, c, kr, qs, scale=0.3)
    return build


def moe_dispatch(b):
    x = b.input("x", ("B", "T", D), F32)
    ids, w = b.emit("moe_route", x, b.param("gate", (E, D), F32), b.param("bias", (E,), F32),
                    top_k=k, n_group=2, topk_group=1, scaling=2.5)
    rows, off, order = b.emit("moe_permute", x, ids, num_experts=E)
    w13 = b("stack", *[b.param(f"w13.{e}", (6, D), F32) for e in range(E)])
    w2 = b("stack", *[b.param(f"w2.{e}", (D, 3), F32) for e in range(E)])
    y = b("grouped_swiglu", rows, off, w13, w2)
    return [b("moe_unpermute", y, order, w, x)]


def norms(b):
    x, r = b.input("x", ("B", "T", D), F32), b.input("r", ("B", "T", D), F32)
    y, s = b.emit("add_rmsnorm", x, r, b.param("w", (D,), F32), eps=1e-5)
    g = b("gated_rmsnorm", y, b.param("w2", (D,), F32), b.input("gate", ("B", "T", D), F32), eps=1e-6)
    hm = b("head_matmul", b.input("hx", ("B", "T", H, K), F32), b.param("hw", (H, K, V), F32))
    return [g, s, hm]


def moe_experts(bias_name):
    """The declared MoE (router primitives, one moe_expert per expert): the ort set's MoE
    mapping; "bias_mixed" makes one selected weight negative (the per-slot branch)."""
    def build(b):
        x = b.input("x", ("B", "T", D), F32)
        choice = b("add", b("sigmoid", b("linear", x, b.param("gate", (E, D), F32))), b.param(bias_name, (E,), F32))
        ids = b("grouped_topk", choice, top_k=k)
        w = b("scale", b("renormalize", b("take_along", choice, ids)), factor=2.5)
        acc = b("zeros_like", x)
        for e in range(E):
            acc = b("moe_expert", acc, x, ids, w, b.param(f"w1.{e}", (3, D), F32), b.param(f"w3.{e}", (3, D), F32),
                    b.param(f"w2.{e}", (D, 3), F32), expert=e, num_experts=E)
        return [acc]
    return build


CASES = {"moe_experts_positive": moe_experts("bias"), "moe_experts_mixed_signs": moe_experts("bias_mixed"),
         "kda_fused_chunk": kda("kda_fused_chunk", True), "kda_fused_recurrent_nostate": kda("kda_fused_recurrent", False),
         "mla_q_start": mla(True), "mla_default_start": mla(False), "moe_dispatch": moe_dispatch, "norms": norms}


def random_value(name, ty, dims, gen):
    shape = [dims.get(d, d) for d in ty.shape]
    if ty.dtype == "i64":
        return torch.tensor([S - T, 1])
    t = torch.randn(shape, generator=gen)
    if name == "bias_mixed":       # expert 0 always first; the second pick has a negative weight
        return torch.tensor([1.0] + [-3.0] * (E - 1))
    if name == "bias":
        return 0.05 * t
    if name == "A_log":
        t = t.abs().log1p()
    return t


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("ops", ["ort", "portable"])
def test_fused_op_matches_reference(case, ops):
    b = GraphBuilder("case")
    b.output(*CASES[case](b))
    g = b.graph
    gen = torch.Generator().manual_seed(0)
    dims = {"B": B, "T": T, "S": S}
    feeds = {n[1:]: random_value(n[1:], t, dims, gen) for n, t in g.inputs.items()}
    weights = {n[1:]: random_value(n[1:], t, dims, gen) for n, t in g.params.items()}
    ref = run_graph(g, feeds, weights)
    proto = lower(g, weights, ops=ops)
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [sess.run(None, {n: v.numpy() for n, v in feeds.items()})]
    if ops == "portable":
        from onnx.reference import ReferenceEvaluator
        runs.append(ReferenceEvaluator(proto).run(None, {n: v.numpy() for n, v in feeds.items()}))
    for outs in runs:
        for o, r in zip(outs, ref):
            got = torch.from_numpy(np.asarray(o)).to(r.dtype)
            assert float((got - r).abs().max() / r.abs().max()) <= 1e-4, case
