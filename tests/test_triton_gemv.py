"""Decode-sized projections (lowering/triton/gemv.py) through the Triton interpreter, fp32,
against a float64 product written here: 1..16 rows, N and K off the tiles, K split or not, the
RMSNorm prologue with and without a residual (in one pass and in two), the gated per-group norm,
two products in one launch, head_matmul; a row's result bitwise the same in any batch of
its bucket; the backend's plan running a norm and the linear it feeds as one step, and the tiny
model's decode with the kernel switched on matching the reference interpreter.
Tolerance: rel. error <= 1e-5 (fp32, a different summation order)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kimi_graph  # noqa: E402
from kimi_graph.lowering.triton import backend, gemv, kda_decode  # noqa: E402
from reference_kimi import rel_err as rel  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _interpret(triton_interpret, monkeypatch):
    monkeypatch.setenv(gemv.ENV, "1")


def tiles(monkeypatch, **cfg):
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "gemv", {**TARGETS["interpret"]["configs"]["gemv"], **cfg})
    gemv.gemv_spec.cache_clear()


def norm64(x, w, eps, r=None):
    x = x.double() + (0 if r is None else r.double())
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def draw(M, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(K, generator=g), \
        torch.randn(M, K, generator=g)


@pytest.mark.parametrize("M", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("split", [False, True])
def test_product_matches_fp64(monkeypatch, M, split):
    tiles(monkeypatch, programs=64 if split else 1)
    N, K = 37, 53                                   # neither a multiple of BN 8 nor of BK 16
    x, w, _, _ = draw(M, N, K, M)
    spec = gemv.gemv_spec(N, K, M, "f32", None, 0.0, "interpret")
    assert (spec.config["SPLIT"] > 1) == split and spec.config["DOT"] == (M >= 2)
    assert rel(gemv.linear(x, w), x.double() @ w.double().T) < TOL


@pytest.mark.parametrize("M", [1, 4, 7])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("norm_pass,programs", [("one", 1), ("one", 32), ("two", 32)])
def test_norm_prologue_matches_fp64(monkeypatch, M, residual, norm_pass, programs):
    tiles(monkeypatch, programs=programs, norm_pass=norm_pass)
    N, K = 20, 45
    x, w, nw, r = draw(M, N, K, 10 + M)
    assert (gemv.gemv_spec(N, K, M, "f32", "rmsnorm", 1e-5, "interpret").config["SPLIT"] > 1) == (programs > 1)
    if residual:
        y, s = gemv.linear(x, w, nw, 1e-5, r)
        assert torch.equal(s, x + r)
    else:
        y = gemv.linear(x, w, nw, 1e-5)
    assert rel(y, norm64(x, nw, 1e-5, r if residual else None) @ w.double().T) < TOL


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("programs", [1, 32])
def test_gated_group_norm_prologue_matches_fp64(monkeypatch, M, programs):
    """gated_rmsnorm over groups of 16 (KDA's per-head output norm) then the projection; tiles of
    two groups, K = 5 groups (the last tile half past K)."""
    tiles(monkeypatch, programs=programs, BK=32)
    H, G, N = 5, 16, 24
    x, w, _, gate = draw(M, N, H * G, 30 + M)
    nw = torch.randn(G)
    xg = x.double().view(M, H, G)
    xn = xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + 1e-5) * nw.double()
    xn = (xn * torch.sigmoid(gate.double().view(M, H, G))).view(M, H * G)
    assert rel(gemv.linear(x, w, nw, 1e-5, gate=gate), xn @ w.double().T) < TOL


@pytest.mark.parametrize("programs", [1, 32])
def test_one_row_x_read_in_the_weight_tile(monkeypatch, programs):
    """x_load "tile" (one row: x, the residual and the norm weight read in W's tile shape) gives
    what the vector loads give, bitwise, for every prologue, and matches fp64."""
    N, K, G = 20, 80, 16
    x, w, nw, r = draw(1, N, K, 40)
    nwg = nw[:G].clone()
    xg = x.double().view(1, K // G, G)
    gated = (xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + 1e-5) * nwg.double()
             * torch.sigmoid(r.double().view(1, K // G, G))).view(1, K)
    cases = {"plain": (lambda: gemv.linear(x, w), x.double()),
             "rmsnorm": (lambda: gemv.linear(x, w, nw, 1e-5), norm64(x, nw, 1e-5)),
             "add_rmsnorm": (lambda: gemv.linear(x, w, nw, 1e-5, r)[0], norm64(x, nw, 1e-5, r)),
             "gated": (lambda: gemv.linear(x, w, nwg, 1e-5, gate=r), gated)}
    for norm_pass in ("one", "two"):
        got = {}
        for x_load in ("vector", "tile"):
            tiles(monkeypatch, programs=programs, BK=32, norm_pass=norm_pass, x_load=x_load)
            assert gemv.gemv_spec(N, K, 1, "f32", "rmsnorm", 1e-5, "interpret").config["XT"] == (x_load == "tile")
            got[x_load] = {name: run() for name, (run, _) in cases.items()}
        for name, (_, xn) in cases.items():
            assert torch.equal(got["tile"][name], got["vector"][name]), (norm_pass, name)
            assert rel(got["tile"][name], xn @ w.double().T) < TOL, (norm_pass, name)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("programs", [1, 64])
def test_pair_of_products_in_one_launch(monkeypatch, M, programs):
    """Two slices of one tensor against two weights of one shape (KDA's f_b and g_b)."""
    tiles(monkeypatch, programs=programs)
    g = torch.Generator().manual_seed(M)
    v, w0, w1 = torch.randn(M, 1, 100, generator=g), torch.randn(37, 30, generator=g), torch.randn(37, 30, generator=g)
    x0, x1 = v[..., 5:35], v[..., 60:90]
    assert (gemv.gemv_spec(37, 30, M, "f32", None, 0.0, "interpret", 0, True).config["SPLIT"] > 1) == (programs > 1)
    y0, y1 = gemv.pair(x0, w0, x1, w1)
    assert rel(y0, x0.double() @ w0.double().T) < TOL and rel(y1, x1.double() @ w1.double().T) < TOL


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("H,NI,R", [(4, 16, 32), (3, 40, 24)])
def test_heads_match_fp64(M, H, NI, R):
    """head_matmul (MLA's absorbed weights): x and w strided views, NI and R off the tiles."""
    g = torch.Generator().manual_seed(M + NI)
    x = torch.randn(M, 1, H, NI + 8, generator=g)[..., :NI]
    w = torch.randn(H, NI + 5, R, generator=g)[:, 2:NI + 2]             # a view, as absorbed weights are
    assert rel(gemv.heads(x, w), torch.einsum("bthn,hnr->bthr", x.double(), w.double())) < TOL


def test_rows_alone_in_their_bucket_and_leading_dims(monkeypatch):
    """Row 0 gives the same bits whatever the other rows of its bucket hold; x [B, 1, K] slices
    (strided rows) are read in place."""
    tiles(monkeypatch, programs=16, token_tiles=[[2, {"BK": 32}]])
    x, w, _, _ = draw(3, 24, 40, 5)
    other = torch.randn(3, 40)
    other[0] = x[0]
    assert torch.equal(gemv.linear(x, w)[0], gemv.linear(other, w)[0])
    wide = torch.randn(2, 1, 64)
    xs = wide[..., 8:48]
    assert not xs.is_contiguous()
    assert rel(gemv.linear(xs, w), xs.double() @ w.double().T) < TOL


def test_takes_decode_sizes_only(monkeypatch):
    w = torch.randn(8, 16)
    assert gemv.takes(torch.randn(4, 16), w)
    assert not gemv.takes(torch.randn(5, 16), w)              # past the interpreter's max_rows 4
    assert not gemv.takes(torch.randn(1, 16, dtype=torch.float64), w.double())
    tiles(monkeypatch, cublas_shapes=[[8, 16]])               # a shape cuBLAS keeps
    assert not gemv.takes(torch.randn(1, 16), w) and gemv.takes(torch.randn(1, 16), torch.randn(9, 16))
    monkeypatch.setenv(gemv.ENV, "0")
    assert not gemv.takes(torch.randn(1, 16), w)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        gemv.linear(torch.randn(2, 16), torch.randn(8, 16), torch.randn(15))


def test_plan_runs_a_norm_with_its_linear():
    model = kimi_graph.load("tiny", dtype=torch.float32, device="cpu", pipeline="default")
    g = model.get_graph("decode", True)
    items = backend.plan(g)
    steps = [i for i in items if isinstance(i, backend.NormLinear)]
    kinds = [s.ops[0].kind for s in steps]
    assert {"add_rmsnorm", "rmsnorm", "gated_rmsnorm"} <= set(kinds)   # attention norms, the head's, KDA's output
    assert any(s.outputs[0] == g.outputs[0] for s in steps)   # the logits
    decode_steps = [i for i in items if isinstance(i, kda_decode.DecodeStep)]   # a KDA layer's step, f_b / g_b inside
    pairs = [i for i in items if isinstance(i, backend.LinearPair)] + \
        [p for d in decode_steps for p in d.parts if isinstance(p, backend.LinearPair)]
    assert len(pairs) == model.config.layer_kinds.count("kda")                  # f_b and g_b
    ran = {id(o) for s in steps + pairs for o in s.ops}
    assert not [i for i in items if id(i) in ran]


@pytest.mark.parametrize("B", [2, 5])                         # the kernel, and cuBLAS past max_rows
def test_tiny_decode_with_the_kernel_matches_the_interpreter(monkeypatch, B):
    from checkpoints import tiny_two_layers
    from test_triton_backend import state_inputs
    ref = kimi_graph.load(tiny_two_layers(), pipeline="default")
    tri = kimi_graph.load(tiny_two_layers(), pipeline="default", backend="triton")
    inputs = state_inputs(tri.get_graph("decode", True), torch.arange(B)[:, None] + 3, torch.arange(B) + 4, B=B)
    calls = []
    kernel = gemv.linear
    form = lambda a, k: "plain" if len(a) == 2 else "gated" if k.get("gate") is not None \
        else "norm" if a[4] is None else "residual"
    monkeypatch.setattr(gemv, "linear", lambda *a, **k: calls.append(form(a, k)) or kernel(*a, **k))
    two, per_head = gemv.pair, gemv.heads
    monkeypatch.setattr(gemv, "pair", lambda *a: calls.append("pair") or two(*a))
    monkeypatch.setattr(gemv, "heads", lambda *a: calls.append("heads") or per_head(*a))
    outs, expect = tri.execute("decode", True, inputs), ref.execute("decode", True, inputs)
    assert set(calls) == ({"plain", "norm", "residual", "gated", "pair", "heads"} if B <= 4 else set())
    assert len(outs) == len(expect)
    for a, b in zip(outs, expect):
        assert a.shape == b.shape and rel(a, b) < TOL
