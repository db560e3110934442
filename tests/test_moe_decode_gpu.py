"""GPU only (skipped without CUDA): the routed experts read by id (lowering/triton/moe_decode) in
bf16 on the published shapes against an fp64 loop (rel. error <= 1e-2), each token's result
bitwise the same alone as in a batch of its tile bucket (every (token, expert) pair is its own
program; the combine sums in a fixed order) and the same replayed from a CUDA graph; the router's
one launch against its two kernels (bitwise) and under CUDA-graph replay."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kimi_graph.lowering.triton import moe_decode  # noqa: E402
from reference_kimi import rel_err as rel  # noqa: E402
from test_triton_decode_fusions import experts_fp64  # noqa: E402

BF16_TOL = 1e-2


@pytest.fixture(autouse=True)
def _gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def draw(N, E=256, k=8, D=2304, I=1024, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: (torch.randn(*s, device="cuda", generator=g) * s[-1] ** -0.5).to(torch.bfloat16)  # noqa: E731
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(N)])
    w = torch.rand(N, k, device="cuda", generator=g)
    return r(N, D), ids, w, r(E, 2 * I, D), r(E, D, I), (r(I, D), r(I, D), r(D, I))


@pytest.mark.parametrize("N", [1, 8])
@pytest.mark.parametrize("forms", [("row", False, "vector"), ("tile", True, "tile"), ("tile", False, "tile"),
                                   ("row", True, "vector"), ("tile", False, "tile", "tile", False, "vector")],
                         ids=["row", "tile-unrolled-xtile", "tile-xtile", "row-unrolled", "xtile-down-vector"])
def test_direct_bf16_against_fp64(N, forms, monkeypatch):
    """Each form of the bf16 K loops (moe_decode.FORMS; the down kernel's own where given)."""
    from kimi_graph.lowering.triton.targets import TARGETS
    target = moe_decode.current_target()
    keys = (*moe_decode.FORMS, *(f"{k}_down" for k in moe_decode.FORMS))
    monkeypatch.setitem(TARGETS[target]["configs"], "moe_decode",
                        {**TARGETS[target]["configs"]["moe_decode"], **dict(zip(keys, forms))})
    moe_decode.decode_specs.cache_clear()
    x, ids, w, w13, w2, shared = draw(N)
    out = moe_decode.direct(x, ids, w, w13, w2, None, shared)
    ref = experts_fp64(x.cpu(), ids.cpu(), w.cpu(), w13.cpu(), w2.cpu(), None, [t.cpu() for t in shared])
    moe_decode.decode_specs.cache_clear()
    assert rel(out.cpu(), ref) <= BF16_TOL


def test_direct_token_alone_equals_in_batch():
    """Bitwise in a batch of the token's tile bucket (moe_decode token_tiles); in a batch of
    another bucket, bf16 rounding apart."""
    from kimi_graph.lowering.triton.targets import config
    cfg = config("moe_decode")
    x, ids, w, w13, w2, shared = draw(8, seed=1)
    out = moe_decode.direct(x, ids, w, w13, w2, None, shared)
    for n in (0, 5):
        one = moe_decode.direct(x[n:n + 1], ids[n:n + 1], w[n:n + 1], w13, w2, None, shared)
        pick = [n, 7 - n]
        pair = moe_decode.direct(x[pick], ids[pick], w[pick], w13, w2, None, shared)
        for batch, row in ((pair, 0), (out, n)):
            if moe_decode.bucket_of(cfg, 1) == moe_decode.bucket_of(cfg, batch.shape[0]):
                assert torch.equal(one, batch[row:row + 1])
            else:                       # (a tuning file's token_tiles: one token's own tiles)
                assert rel(one, batch[row:row + 1]) <= BF16_TOL



@pytest.mark.parametrize("N", [1, 8])
def test_direct_replays_as_run_eagerly(N):
    """Captured in a CUDA graph, the direct path (its down kernel combining through tickets that
    each launch resets) gives, replayed with new tokens and experts, what it gives eagerly."""
    x, ids, w, w13, w2, shared = draw(N, seed=3)
    g = torch.Generator(device="cuda").manual_seed(4)
    draws = [(x.clone(), ids.clone(), w.clone())] + [
        (torch.randn(x.shape, device="cuda", generator=g).to(x.dtype) * 0.05,
         torch.stack([torch.randperm(256, device="cuda", generator=g)[:8] for _ in range(N)]),
         torch.rand(w.shape, device="cuda", generator=g)) for _ in range(2)]
    want = [moe_decode.direct(xs, idss, ws, w13, w2, None, shared) for xs, idss, ws in draws]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_decode.direct(x, ids, w, w13, w2, None, shared)
    for (xs, idss, ws), ref in zip(draws, want):
        x.copy_(xs)
        ids.copy_(idss)
        w.copy_(ws)
        graph.replay()
        assert torch.equal(out, ref)


@pytest.mark.parametrize("select", ["argmax", "packed"])
def test_one_launch_router_equals_two_kernels_and_replays(monkeypatch, select):
    """The router at decode (one launch, its last program selects) on the published shapes, in
    each selection form: bitwise the two kernels' result, the fp32 reference's ids, and a CUDA
    graph of it replays with new inputs as run eagerly (the ticket is reset by every launch)."""
    from kimi_graph.lowering.triton import codegen, moe_route
    from kimi_graph.lowering.triton.targets import TARGETS, config
    from kimi_graph.ops import get_op
    monkeypatch.setitem(TARGETS[moe_route.current_target()]["configs"]["moe_route"], "select", select)
    moe_route.fused_spec.cache_clear()
    moe_route.select_spec.cache_clear()
    g = torch.Generator(device="cuda").manual_seed(2)
    E, D = 256, 2304
    w = (torch.randn(E, D, device="cuda", generator=g) * D ** -0.5).to(torch.bfloat16)
    b = torch.rand(E, device="cuda", generator=g) * 0.1
    attrs = dict(top_k=8, scaling=2.446)
    n = config("moe_route")["fused_max"]
    xs = [torch.randn(n, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3)]
    want = [moe_route.moe_route(x, w, b, **attrs) for x in xs]
    assert not codegen._TICKETS[str(xs[0].device)][-1].any()
    for x, (wi, ww) in zip(xs, want):
        ri, rw = get_op("moe_route").ref([x.float(), w.float(), b], dict(attrs, n_group=1, topk_group=1,
                                                                         renormalize=True, weights="official"))
        assert torch.equal(wi, ri) and (ww - rw).abs().max() <= 1e-5 * rw.abs().max()
    static = xs[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, wts = moe_route.moe_route(static, w, b, **attrs)
    for x, (wi, ww) in zip(xs, want):
        static.copy_(x)
        graph.replay()
        assert torch.equal(ids, wi) and torch.equal(wts, ww)
    monkeypatch.setitem(TARGETS[moe_route.current_target()]["configs"]["moe_route"], "fused_max", 0)
    moe_route.fused_spec.cache_clear()
    for x, (wi, ww) in zip(xs, want):
        two = moe_route.moe_route(x, w, b, **attrs)
        assert torch.equal(two[0], wi) and torch.equal(two[1], ww)
    moe_route.fused_spec.cache_clear()
    moe_route.select_spec.cache_clear()


def test_router_with_its_norm_inline(monkeypatch):
    """routed_norm on the published shapes (bf16, one and two tokens): the norm inside the
    router's launch against the norm kernel then the router (the sum bitwise; the normalised x
    to bf16 rounding: rstd summed in another order), replayed from a CUDA graph as run eagerly."""
    from kimi_graph.lowering.triton import moe_route
    from kimi_graph.lowering.triton.targets import TARGETS
    cfg = TARGETS[moe_route.current_target()]["configs"]["moe_route"]
    g = torch.Generator(device="cuda").manual_seed(5)
    E, D = 256, 2304
    w = (torch.randn(E, D, device="cuda", generator=g) * D ** -0.5).to(torch.bfloat16)
    b = torch.rand(E, device="cuda", generator=g) * 0.1
    nw = (torch.rand(D, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    attrs = dict(top_k=8, scaling=2.446)
    for N in (1, 2):
        x, r = (torch.randn(N, 1, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
        monkeypatch.setitem(cfg, "norm_inline", False)
        want = moe_route.routed_norm(x, r, nw, 1e-5, w, b, **attrs)
        monkeypatch.setitem(cfg, "norm_inline", True)
        moe_route.fused_spec.cache_clear()
        got = moe_route.routed_norm(x, r, nw, 1e-5, w, b, **attrs)
        assert torch.equal(got[3], want[3]) and rel(got[2], want[2]) <= BF16_TOL
        assert torch.equal(got[0], want[0]) and (got[1] - want[1]).abs().max() <= 1e-3 * want[1].abs().max()
        static = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = moe_route.routed_norm(static, r, nw, 1e-5, w, b, **attrs)
        x2 = torch.randn(x.shape, device="cuda", generator=g).to(torch.bfloat16)
        again = moe_route.routed_norm(x2, r, nw, 1e-5, w, b, **attrs)
        static.copy_(x2)
        graph.replay()
        assert all(torch.equal(o, a) for o, a in zip(outs, again))
    moe_route.fused_spec.cache_clear()


@pytest.mark.parametrize("N", [1, 2])
def test_shared_expert_beside_the_router_under_graphs(N):
    """moe_decode.shared_beside on the published shapes: the shared expert on a side stream (its
    own norm, the direct kernels alone) as the routed experts' acc, against the shared expert in
    the routed kernels (bf16 rounding apart: its norm's rstd sums in another order) and the fp64
    loop; captured in a CUDA graph (a fork and a join), replayed on new inputs as run eagerly."""
    from kimi_graph.lowering.triton.moe_route import routed_norm
    _, _, _, w13, w2, shared = draw(N, seed=7)
    g = torch.Generator(device="cuda").manual_seed(8)
    E, D, I = w13.shape[0], w13.shape[2], w2.shape[2]
    gate = (torch.randn(E, D, device="cuda", generator=g) * D ** -0.5).to(torch.bfloat16)
    bias = torch.zeros(E, device="cuda")
    nw = (torch.rand(D, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    rows = ((0, I), (0, I))

    def layer(x, r, beside: bool):
        side = moe_decode.shared_beside("moe_experts", {}, [None, None, None, w13, w2, *shared], rows,
                                        x, r, nw, 1e-5) if beside else None
        ids, wts, xn, _ = routed_norm(x, r, nw, 1e-5, gate, bias, top_k=8, scaling=2.446)
        return moe_decode.run_step("moe_experts", {}, [xn, ids, wts, w13, w2, *shared], rows, side), (xn, ids, wts)

    x, r = (torch.randn(N, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    got, (xn, ids, wts) = layer(x, r, True)
    want, _ = layer(x, r, False)
    ref = experts_fp64(xn.cpu(), ids.cpu(), wts.cpu(), w13.cpu(), w2.cpu(), None, [t.cpu() for t in shared])
    assert rel(got.cpu(), ref) <= BF16_TOL and rel(got, want) <= BF16_TOL
    sx, sr = x.clone(), r.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = layer(sx, sr, True)
    for _ in range(3):
        x2, r2 = (torch.randn(N, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
        again, _ = layer(x2, r2, True)
        sx.copy_(x2)
        sr.copy_(r2)
        graph.replay()
        assert torch.equal(out, again)
