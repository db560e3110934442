"""One routing tie-break everywhere: among exactly equal routing scores the lowest expert (and
group) index wins. The router zeroes the experts of unchosen groups, which makes exact ties;
the routers here make them on purpose (zero gate rows score exactly sigmoid(0) = 0.5, biases
from a few values, a bias of -1 pushes kept experts below the zeroed ones), including groups
of non-power-of-two size. Every target must pick the experts of the independent fp64
reference (tests/reference_kimi.py) exactly: the op library (interpreter), the torch lowering
(eager, compiled, decomposed), ONNX (every operator set in ONNX Runtime, and in onnx.reference
but the ort set) and the Triton router under TRITON_INTERPRET=1. Weights: fp32 rel. error
<= 1e-5."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kimi_graph.builder import GraphBuilder
from kimi_graph.interpreter import run_graph
from kimi_graph.ops.moe import topk_ids
from reference_kimi import rel_err, route

TOL = 1e-5
N, D = 24, 16
# (experts, groups, kept groups, top_k): powers of two and not
SHAPES = [(8, 2, 1, 3), (16, 4, 2, 6), (6, 2, 1, 2), (12, 4, 3, 5), (3, 3, 1, 1), (9, 3, 2, 4)]


def tied_router(E: int, G: int, TG: int, k: int):
    """x [N, D], gate [E, D], bias [E] whose biased scores tie exactly at the top-k boundary:
    from the first seed that makes such ties (so top-k must break them)."""
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(N, D, generator=g)
        gate = torch.randn(E, D, generator=g) / D ** 0.5
        gate[torch.rand(E, generator=g) < 0.6] = 0.0
        bias = torch.tensor([-1.0, -0.25, 0.0])[torch.randint(0, 3, (E,), generator=g)]
        if boundary_ties(x, gate, bias, E, G, TG, k):
            return x, gate, bias
    raise AssertionError("no router with ties found")


def reference(x, gate, bias, E, G, TG, k, weights="official"):
    cfg = {"num_experts": E, "num_experts_per_token": k, "num_expert_group": G, "topk_group": TG,
           "moe_renormalize": True, "routed_scaling_factor": 2.5}
    W = {"gate.weight": gate.double(), "gate.e_score_correction_bias": bias.double()}
    return route(cfg, W, "", x.double(), weights)


def boundary_ties(x, gate, bias, E, G, TG, k) -> int:
    """Rows where top-k must break a tie: the TG-th and next best group scores are equal, or
    the k-th and next best masked expert scores are."""
    c = torch.sigmoid(x.double() @ gate.double().T) + bias.double()
    gs = c.view(N, G, -1).topk(min(2, E // G), -1)[0].sum(-1)
    keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, topk_ids(gs, TG), True)
    masked = c.masked_fill(~keep.repeat_interleave(E // G, 1), 0.0)
    gs, masked = gs.sort(-1, descending=True)[0], masked.sort(-1, descending=True)[0]
    tie = torch.zeros(N, dtype=torch.bool)
    if TG < G:
        tie |= gs[:, TG - 1] == gs[:, TG]
    if k < E:
        tie |= masked[:, k - 1] == masked[:, k]
    return int(tie.sum())


def test_topk_ids_lowest_index_first():
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [-1.0, 0.0, 3.0, 0.0, 0.0]])
    assert topk_ids(x, 3).tolist() == [[1, 3, 0], [0, 1, 2], [2, 1, 3]]
    wide = torch.zeros(2, 300)               # torch.topk's CPU kernel picks other indices here
    wide[1, 250:] = 1.0
    assert topk_ids(wide, 8).tolist() == [list(range(8)), list(range(250, 258))]


def router_graph(E, G, TG, k, fused: bool):
    """ids, weights from the fused moe_route op or the declared primitives."""
    b = GraphBuilder("router")
    x = b.input("x", ("N", D), "f32")
    gate, bias = b.param("gate", (E, D), "f32"), b.param("bias", (E,), "f32")
    if fused:
        b.output(*b.emit("moe_route", x, gate, bias, top_k=k, n_group=G, topk_group=TG, scaling=2.5))
    else:
        choice = b("add", b("sigmoid", b("linear", x, gate)), bias)
        ids = b("grouped_topk", choice, top_k=k, n_group=G, topk_group=TG)
        w = b("take_along", choice, ids)
        b.output(ids, b("scale", b("renormalize", w) if k > 1 else w, factor=2.5))
    return b.graph


def targets(g, weights, x):
    """(name, ids, weights) for every target that can run graph g."""
    yield ("interpreter", *run_graph(g, {"x": x}, weights))
    from kimi_graph.lowering.torch import lower
    yield ("torch", *lower(g, weights)(x))
    yield ("torch decomposed", *lower(g, weights, decompose=True)(x))
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx.reference import ReferenceEvaluator

    from kimi_graph.lowering.onnx import OP_SETS, lower as lower_onnx
    for ops in OP_SETS:
        proto = lower_onnx(g, weights, ops=ops)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        yield (f"onnxruntime {ops}", *map(torch.from_numpy, sess.run(None, {"x": x.numpy()})))
        if ops != "ort":                    # com.microsoft ops: ONNX Runtime only
            out = ReferenceEvaluator(proto).run(None, {"x": x.numpy()})
            yield ("onnx.reference", *(torch.from_numpy(np.asarray(o)) for o in out))


@pytest.mark.parametrize("fused", [True, False], ids=["moe_route", "primitives"])
@pytest.mark.parametrize("E,G,TG,k", SHAPES)
def test_every_target_breaks_ties_by_lowest_index(E, G, TG, k, fused):
    x, gate, bias = tied_router(E, G, TG, k)
    want_ids, want_w = reference(x, gate, bias, E, G, TG, k)
    g = router_graph(E, G, TG, k, fused)
    for name, ids, w in targets(g, {"gate": gate, "bias": bias}, x):
        assert ids.tolist() == want_ids.tolist(), name
        assert rel_err(w, want_w) <= TOL, name


def test_compiled_router_breaks_ties_by_lowest_index():
    """torch.compile: the custom op (opaque), and the decomposed form through Inductor."""
    from torch._inductor import config as inductor_config

    from kimi_graph.lowering.torch import lower
    E, G, TG, k = 12, 4, 3, 5
    x, gate, bias = tied_router(E, G, TG, k)
    want = reference(x, gate, bias, E, G, TG, k)[0].tolist()
    g = router_graph(E, G, TG, k, fused=True)
    torch._dynamo.reset()
    try:
        with inductor_config.patch(compile_threads=1):
            for decompose in (False, True):
                ids, _ = torch.compile(lower(g, {"gate": gate, "bias": bias}, decompose=decompose))(x)
                assert ids.tolist() == want, decompose
    finally:
        torch._dynamo.reset()


@pytest.mark.usefixtures("triton_interpret")
@pytest.mark.parametrize("E,G,TG,k", SHAPES)
@pytest.mark.parametrize("weights", ["official", "unbiased"])
@pytest.mark.parametrize("select", ["argmax", "packed"])
def test_triton_router_breaks_ties_by_lowest_index(E, G, TG, k, weights, select, monkeypatch):
    pytest.importorskip("triton")
    from kimi_graph.lowering.triton import moe_route, targets
    from kimi_graph.lowering.triton.backend import KERNELS
    monkeypatch.setitem(targets.TARGETS["interpret"]["configs"]["moe_route"], "select", select)
    moe_route.select_spec.cache_clear()
    moe_route.fused_spec.cache_clear()
    x, gate, bias = tied_router(E, G, TG, k)
    want_ids, want_w = reference(x, gate, bias, E, G, TG, k, weights)
    attrs = dict(top_k=k, n_group=G, topk_group=TG, renormalize=True, scaling=2.5, weights=weights)
    ids, w = KERNELS["moe_route"][0]([x, gate, bias], attrs)
    assert ids.tolist() == want_ids.tolist()
    assert rel_err(w, want_w) <= TOL
