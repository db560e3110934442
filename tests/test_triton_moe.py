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


@pytest.fixture(params=["argmax", "packed"])
def select(request, monkeypatch):
    """Each of the router's selection forms (moe_route.SELECTIONS)."""
    from kimi_graph.lowering.triton import targets
    monkeypatch.setitem(targets.TARGETS["interpret"]["configs"]["moe_route"], "select", request.param)
    moe_route.select_spec.cache_clear()
    moe_route.fused_spec.cache_clear()
    yield request.param
    moe_route.select_spec.cache_clear()
    moe_route.fused_spec.cache_clear()


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
def test_route_random(seed, select):
    x, w, b, attrs = random_routing(seed)
    ids, wts = moe_route.moe_route(x, w, b, **attrs)
    ri, rw = get_op("moe_route").ref([x, w, b], attrs)
    assert torch.equal(ids, ri), attrs
    assert (wts - rw).abs().max() <= 1e-5 * rw.abs().max()
    fi, fw = route_fp64(x, w, b, **attrs)
    assert torch.equal(ids, fi) and (wts.double() - fw).abs().max() <= 1e-5 * fw.abs().max()


@pytest.mark.parametrize("seed", range(4))
def test_route_one_launch_equals_two_kernels(monkeypatch, seed, select):
    """Up to fused_max tokens the router is one launch (its last program selects): bitwise the two
    kernels' ids and weights, the reference op's ids; its ticket is reset, so the next launch (as a
    CUDA graph's replay) selects again."""
    from kimi_graph.lowering.triton import codegen, targets
    _, w, b, attrs = random_routing(seed)
    x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(seed))
    cfg = targets.TARGETS["interpret"]["configs"]["moe_route"]
    names = []
    monkeypatch.setattr(moe_route, "launch", lambda spec, *a: names.append(spec.name) or codegen.launch(spec, *a))
    for N in range(1, cfg["fused_max"] + 1):
        one = [moe_route.moe_route(x[i:i + N], w, b, **attrs) for i in (0, N)]
        assert names[-2:] == ["moe_router"] * 2 and not codegen._TICKETS["cpu"][-1].any()
        for i, (ids, wts) in zip((0, N), one):
            ri, rw = get_op("moe_route").ref([x[i:i + N], w, b], attrs)
            assert torch.equal(ids, ri) and (wts - rw).abs().max() <= 1e-5 * rw.abs().max()
        monkeypatch.setitem(cfg, "fused_max", 0)
        moe_route.fused_spec.cache_clear()
        two = moe_route.moe_route(x[:N], w, b, **attrs)
        assert names[-2:] == ["moe_router_logits", "moe_router_select"]
        assert torch.equal(two[0], one[0][0]) and torch.equal(two[1], one[0][1])
        monkeypatch.setitem(cfg, "fused_max", 2)
        moe_route.fused_spec.cache_clear()
    monkeypatch.setitem(cfg, "fused_max", cfg["BN_small"] + 1)
    monkeypatch.setitem(cfg, "small_max", cfg["BN_small"] + 1)
    moe_route.fused_spec.cache_clear()
    with pytest.raises(ValueError, match="one token block"):
        moe_route.moe_route(x[:1], w, b, **attrs)
    moe_route.fused_spec.cache_clear()


@pytest.mark.parametrize("N", [1, 2, 3])
def test_route_with_its_norm_inline(monkeypatch, select, N):
    """routed_norm: add_rmsnorm then the router in one launch (up to fused_max tokens; past it the
    norm kernel, then the router): the reference ops' ids, weights, normalised x and sum."""
    from kimi_graph.lowering.triton import codegen, targets
    monkeypatch.setitem(targets.TARGETS["interpret"]["configs"]["moe_route"], "norm_inline", True)
    _, w, b, attrs = random_routing(N + 3)
    g = torch.Generator().manual_seed(N)
    D = w.shape[1]
    x, r, nw = torch.randn(N, 1, D, generator=g), torch.randn(N, 1, D, generator=g), torch.rand(D, generator=g) + 0.5
    names = []
    monkeypatch.setattr(moe_route, "launch", lambda spec, *a: names.append(spec.name) or codegen.launch(spec, *a))
    ids, wts, xn, s = moe_route.routed_norm(x, r, nw, 1e-5, w, b, **attrs)
    rxn, rs = get_op("add_rmsnorm").ref([x, r, nw], {"eps": 1e-5})
    ri, rw = get_op("moe_route").ref([rxn, w, b], attrs)
    assert names == (["moe_router_norm"] if N <= 2 else ["moe_router_logits", "moe_router_select"])
    assert torch.equal(s, rs) and (xn - rxn).abs().max() <= 1e-5 * rxn.abs().max()
    assert torch.equal(ids, ri) and (wts - rw).abs().max() <= 1e-5 * rw.abs().max()
    assert not codegen._TICKETS["cpu"][-1].any()


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


def experts_case(seed: int):
    """Random routed-expert inputs: some experts empty, dims the tiles do / do not divide."""
    rng = random.Random(seed)
    E, k = rng.choice([(6, 2), (7, 3), (16, 4)])
    N, D, I = rng.choice([13, 40, 70]), rng.choice([32, 40]), rng.choice([24, 48])
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(N)])
    return (torch.randn(N, D, generator=g), ids, torch.rand(N, k, generator=g),
            torch.randn(E, 2 * I, D, generator=g) * 0.2, torch.randn(E, D, I, generator=g) * 0.2,
            torch.randn(N, D, generator=g))


@pytest.mark.parametrize("seed", range(4))
def test_moe_experts_fused(seed):
    """The fused form (rows read by index, each copy's result in its token's slot, combined in
    order) equals the chain permute -> grouped SwiGLU -> un-permute exactly, and the float64
    reference; a token's result does not depend on the batch around it (to rounding here: exact
    on a GPU, tests/test_triton_gpu.py)."""
    from kimi_graph.lowering.triton import moe
    x, ids, w, w13, w2, acc = experts_case(seed)
    E, M = w13.shape[0], ids.numel()
    assert M >= moe.config("moe_gemm")["fused_min_rows"]            # the fused form runs
    out = moe.moe_experts(x, ids, w, w13, w2, acc)
    rows, off, order = moe_permute.moe_permute(x, ids, E)
    assert torch.equal(out, moe_permute.moe_unpermute(moe.grouped_swiglu(rows, off, w13, w2), order, w, acc))
    ref = get_op("moe_experts").ref([t.double() if t.is_floating_point() else t for t in (x, ids, w, w13, w2, acc)],
                                    {})[0]
    assert (out.double() - ref).norm() <= 1e-6 * ref.norm()
    part = slice(3, 3 + max(1, moe.config("moe_gemm")["fused_min_rows"] // ids.shape[1] + 1))
    alone = moe.moe_experts(x[part], ids[part], w[part], w13, w2, acc[part])
    assert (alone - out[part]).abs().max() <= 1e-6 * out.abs().max()   # numpy's dot: not bitwise per row


def test_moe_sort_and_errors():
    """moe_sort is moe_permute's order and offsets; bad shapes are refused."""
    from kimi_graph.lowering.triton import moe
    x, ids, w, w13, w2, acc = experts_case(1)
    _, off, order = moe_permute.moe_permute(x, ids, w13.shape[0])
    off2, order2 = moe_permute.moe_sort(ids, w13.shape[0])
    assert torch.equal(off, off2) and torch.equal(order, order2)
    with pytest.raises(ValueError, match="do not fit"):
        moe.moe_experts(x, ids, w[:, :1], w13, w2, acc)
    with pytest.raises(ValueError, match="do not fit"):
        moe.moe_experts(x, ids.int(), w, w13, w2, acc)


# grouped GEMM variants ("moe_gemm" keys): weights (and down's h rows) through tensor
# descriptors, an expert's last rows on half-height tiles, warp-specialized K loops, the down
# GEMM's own tiles, persistent programs; BM 32 (or 64) so that every row tile runs
GEMM_VARIANTS = [
    {"half": True},
    {"tma": True, "half": True, "ws": True},
    {"BM": 64, "half": 2, "tma": "host", "BN_down": 32, "BK_down": 8, "num_warps_down": 2, "num_stages_down": 2},
    {"persistent": 1},
    {"persistent": 2, "tma": "host", "ws": True},
    {"persistent_down": 1, "half": True, "tma": "host"},
]


def tail_case():
    """Experts with 70, 90, 50 and 0 rows (2 per token): tails of 6, 26, 50 rows past 64 and of
    6, 26, 18 past 32, so each row tile of BM 64 / half 2 and BM 32 / half 1 runs."""
    g = torch.Generator().manual_seed(7)
    flat = torch.tensor([0] * 70 + [1] * 90 + [2] * 50)
    ids = flat[torch.randperm(flat.numel(), generator=g)].reshape(-1, 2)
    N, D, I, E = ids.shape[0], 40, 24, 4
    return (torch.randn(N, D, generator=g), ids, torch.rand(N, 2, generator=g),
            torch.randn(E, 2 * I, D, generator=g) * 0.2, torch.randn(E, D, I, generator=g) * 0.2,
            torch.randn(N, D, generator=g))


@pytest.mark.parametrize("variant", GEMM_VARIANTS, ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()))
def test_grouped_gemm_variants(monkeypatch, variant):
    """Each variant's fused form and chain agree with the float64 reference and with the default
    tiles (to fp32 rounding); each of its row tiles runs."""
    from kimi_graph.lowering.triton import moe, targets
    cfg = targets.TARGETS["interpret"]["configs"]["moe_gemm"]
    x, ids, w, w13, w2, acc = tail_case()
    E, M = w13.shape[0], ids.numel()
    up = [t.double() if t.is_floating_point() else t for t in (x, ids, w, w13, w2, acc)]
    ref = get_op("moe_experts").ref(up, {})[0]
    moe.gemm_specs.cache_clear()
    base = moe.moe_experts(x, ids, w, w13, w2, acc)
    for size in ("", "_mid", "_small"):
        for k, v in {"BM": 32, **variant}.items():
            monkeypatch.setitem(cfg, k + size, v)
    moe.gemm_specs.cache_clear()
    t = moe.gemm_tiles(moe.gemm_size(M, E, "interpret"), "interpret")
    assert all(t[k] == {True: "device"}.get(v, v) if k == "tma" else t[k] == v for k, v in variant.items()), t
    rows = moe.row_tiles(t["BM"], t["half"])
    tails = [c % t["BM"] for c in torch.bincount(ids.flatten(), minlength=E).tolist() if c % t["BM"]]
    assert {min(r for r in rows if r >= c) for c in tails} == set(rows), (rows, tails)
    out = moe.moe_experts(x, ids, w, w13, w2, acc)
    rows, off, order = moe_permute.moe_permute(x, ids, E)
    chain = moe_permute.moe_unpermute(moe.grouped_swiglu(rows, off, w13, w2), order, w, acc)
    for got in (out, chain):
        assert (got.double() - ref).norm() <= 1e-6 * ref.norm()
        assert (got - base).abs().max() <= 1e-5 * base.abs().max()
    moe.gemm_specs.cache_clear()


@pytest.mark.parametrize("variant", [{"tma": "host", "half": 2, "ws": True}, {"tma": "device", "persistent": 1}],
                         ids=["host,half2,ws", "device,persistent"])
def test_grouped_gemm_variants_build_for_sm90(monkeypatch, variant):
    """What the interpreter cannot judge compiles for sm_90 (no GPU): every row tile of `half` in
    one kernel, descriptor loads (TMA) into wgmma, warp-specialized K loops, persistent loops."""
    from kimi_graph.lowering.triton import aot, moe, targets
    monkeypatch.setattr(targets, "TARGETS", {**targets.TARGETS, "sm_90": dict(targets.TARGETS["sm_90"])})
    cfg = dict(targets.TARGETS["sm_90"]["configs"]["moe_gemm"], **variant)
    monkeypatch.setitem(targets.TARGETS["sm_90"], "configs", {**targets.TARGETS["sm_90"]["configs"], "moe_gemm": cfg})
    moe.gemm_specs.cache_clear()
    for spec in moe.gemm_specs(4, 256, 512, "bf16", "large", "sm_90", True, 8, True)[1:]:
        assert spec.config["half"] == variant.get("half", 0) and spec.config["tma"] == variant["tma"]
        ptx = aot.compile_spec(spec, "sm_90").asm["ptx"]
        assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx, spec.name
    moe.gemm_specs.cache_clear()


def test_tile_map_template_renders_alone():
    """moe_fp8 renders moe.py's plain tile map; the persistent kernels' counting form adds count_ptr."""
    from kimi_graph.lowering.triton import moe, moe_fp8
    assert "count_ptr" not in moe_fp8.tile_map(16, 64, "interpret").source
    assert "max_tiles, count_ptr):" in moe._tile_map(True)


@pytest.mark.parametrize("lead", [(13,), (2, 5)])
def test_shared_expert_one_gemm_over_a_fused_weight(lead):
    """Gate and up as adjacent rows of one fused weight (fuse-linears): one GEMM, SwiGLU by
    swiglu_rows; equal to the two-GEMM form and to float64 (rounding)."""
    from kimi_graph.lowering.triton import moe_decode
    g = torch.Generator().manual_seed(3)
    D, IS = 40, 24
    x, fused, wd = torch.randn(*lead, D, generator=g), torch.randn(2 * IS, D, generator=g) * 0.2, \
        torch.randn(D, IS, generator=g) * 0.2
    wg, wu = fused[:IS], fused[IS:]
    out = moe_decode.shared_swiglu(x, wg, wu, wd)
    apart = moe_decode.shared_swiglu(x, wg.clone(), wu.clone(), wd)          # not adjacent: two GEMMs
    x64, g64, u64 = x.double(), wg.double(), wu.double()
    ref = torch.nn.functional.linear(torch.nn.functional.silu(x64 @ g64.T) * (x64 @ u64.T), wd.double())
    assert out.shape == (*lead, D)
    assert (out - apart).abs().max() <= 1e-5 * apart.abs().max()
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
