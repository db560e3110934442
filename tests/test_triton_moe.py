"""MoE dispatch kernels (router, permutation) through the Triton interpreter, fp32, on random
shapes: tokens 1..300, top_k up to 8, groups of any size the config allows (6 experts in 2
groups, 3 in 3, 12 in 4). The router is checked against the op library's reference and the
independent float64 one (tests/reference_kimi.py); exact ties: tests/test_routing_ties.py."""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from kimi_graph.lowering.triton import moe_permute, moe_route  # noqa: E402
from kimi_graph.ops import get_op  # noqa: E402
from reference_kimi import route  # noqa: E402

# (experts, groups, groups kept): non-power-of-two group sizes and counts included
LAYOUTS = [(6, 2, 1), (12, 4, 2), (3, 3, 2), (9, 3, 1), (20, 5, 3), (16, 1, 1), (7, 1, 1), (64, 8, 4)]


@pytest.fixture(autouse=True)
def _interpret(triton_interpret):
    pass


def route_fp64(x, w, bias, top_k, n_group, topk_group, renormalize, scaling, weights):
    cfg = {"num_experts": w.shape[0], "num_experts_per_token": top_k, "num_expert_group": n_group,
           "topk_group": topk_group, "moe_renormalize": renormalize, "routed_scaling_factor": scaling}
    return route(cfg, {"gate.weight": w.double(), "gate.e_score_correction_bias": bias.double()}, "",
                 x.double(), weights)


def random_routing(seed: int):
    rng = random.Random(seed)
    E, ng, tg = LAYOUTS[seed % len(LAYOUTS)]
    k = rng.randint(1, min(8, tg * (E // ng)))
    N, D = rng.choice([1, 2, 5, 17, 64, 130, 300]), rng.choice([16, 40, 72])
    attrs = dict(top_k=k, n_group=ng, topk_group=tg, renormalize=rng.random() < 0.8,
                 scaling=rng.choice([1.0, 2.446]), weights=rng.choice(["official", "unbiased"]))
    g = torch.Generator().manual_seed(seed)
    # logits ~ N(0, 1) and a positive bias: every choice > 0, so no masked expert (score 0) ties
    x, w = torch.randn(N, D, generator=g), torch.randn(E, D, generator=g) * D ** -0.5
    return x, w, torch.rand(E, generator=g) * 0.1, attrs


@pytest.mark.parametrize("seed", range(10))
def test_route_random(seed):
    x, w, b, attrs = random_routing(seed)
    ids, wts = moe_route.moe_route(x, w, b, **attrs)
    ri, rw = get_op("moe_route").ref([x, w, b], attrs)
    assert torch.equal(ids, ri), attrs
    assert (wts - rw).abs().max() <= 1e-5 * rw.abs().max()
    fi, fw = route_fp64(x, w, b, **attrs)
    assert torch.equal(ids, fi) and (wts.double() - fw).abs().max() <= 1e-5 * fw.abs().max()


def test_route_errors():
    x, w, b = torch.randn(3, 40), torch.randn(6, 40), torch.randn(6)
    with pytest.raises(TypeError, match="bias must be fp32"):
        moe_route.moe_route(x, w, b.double(), top_k=2)
    with pytest.raises(ValueError, match="official"):
        moe_route.moe_route(x, w, b, top_k=2, weights="biased")
    with pytest.raises(ValueError, match="do not fit|bad routing"):
        moe_route.moe_route(x, w, b, top_k=2, n_group=4)


@pytest.mark.parametrize("N,E,k", [(1, 256, 8), (5, 6, 2), (37, 7, 3), (300, 12, 2), (70, 64, 8)])
def test_permute_random(N, E, k):
    """One block (decode) and many blocks (prefill); some experts empty; stable order."""
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, 40, generator=g)            # two column blocks, the last ragged
    used = max(k, E - 2)                   # the last experts get no token
    ids = torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(N)])
    rows, off, order = moe_permute.moe_permute(x, ids, E)
    ref = get_op("moe_permute").ref([x, ids], {"num_experts": E})
    assert torch.equal(off, ref[1]) and torch.equal(order, ref[2]) and torch.equal(rows, ref[0])


def test_permute_repeated_expert_and_empty():
    """ids that repeat within a token keep their order; no tokens gives empty outputs."""
    x = torch.randn(40, 8)
    ids = torch.randint(0, 3, (40, 4))
    rows, off, order = moe_permute.moe_permute(x, ids, 5)
    ref = get_op("moe_permute").ref([x, ids], {"num_experts": 5})
    assert torch.equal(order, ref[2]) and torch.equal(off, ref[1]) and torch.equal(rows, ref[0])
    rows, off, order = moe_permute.moe_permute(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.int64), 5)
    assert rows.shape == (0, 8) and order.shape == (0,) and off.tolist() == [0] * 6
