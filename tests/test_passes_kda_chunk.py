"""kda_chunkwise (the chunkwise WY/UT form) against a float64 token loop written here from the
published delta rule, apart from kimi_graph.ops. Tolerances (max abs error / max |ref|):
fp64 1e-12, fp32 2e-5 (the chunk form sums in a different order)."""
from __future__ import annotations

import pytest
import torch

from kimi_graph.ops.kda import kda_chunkwise

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def delta_rule(q, k, v, g, beta, state, scale):
    """S = S * exp(g)[:, None]; S += k (beta (v - k^T S))^T; o = (scale q)^T S, per head."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if state is None else state.double().clone()
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(T):
                kt, qt = k[b, t, h].double(), q[b, t, h].double()
                s = s * g[b, t, h].double().exp()[:, None]
                s = s + torch.outer(kt, beta[b, t, h].double() * (v[b, t, h].double() - kt @ s))
                out[b, t, h] = (scale * qt) @ s
            S[b, h] = s
    return out, S


def inputs(B, T, H, K, V, dtype, decay=3.0, seed=0, with_state=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    k = torch.nn.functional.normalize(r(B, T, H, K), dim=-1)
    q = torch.nn.functional.normalize(r(B, T, H, K), dim=-1)
    g = -decay * torch.rand(B, T, H, K, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    s0 = r(B, H, K, V) if with_state else None
    return [t.to(dtype) if t is not None else None for t in (q, k, r(B, T, H, V), g, beta, s0)]


def err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T,chunk", [(1, 64), (5, 16), (37, 8), (64, 64), (100, 7), (33, 1), (16, 4)])
def test_chunkwise_matches_the_recurrence(dtype, T, chunk):
    q, k, v, g, beta, s0 = inputs(2, T, 2, 8, 6, dtype, seed=T)
    scale = 8 ** -0.5
    want_o, want_s = delta_rule(q, k, v, g, beta, s0, scale)
    o, s = kda_chunkwise(q, k, v, g, beta, s0, scale, chunk)
    assert o.dtype == s.dtype == dtype and o.shape == (2, T, 2, 6) and s.shape == (2, 2, 8, 6)
    assert err(o, want_o) < TOL[dtype] and err(s, want_s) < TOL[dtype]


def test_no_initial_state_and_empty_sequence():
    q, k, v, g, beta, _ = inputs(1, 20, 3, 4, 4, torch.float64, with_state=False)
    o, s = kda_chunkwise(q, k, v, g, beta, None, 0.5, 6)
    want_o, want_s = delta_rule(q, k, v, g, beta, None, 0.5)
    assert err(o, want_o) < 1e-12 and err(s, want_s) < 1e-12
    q, k, v, g, beta, s0 = inputs(1, 0, 1, 4, 4, torch.float64)
    o, s = kda_chunkwise(q, k, v, g, beta, s0, 1.0, 4)
    assert o.shape == (1, 0, 1, 4) and torch.equal(s, s0)


def test_strong_decay_stays_finite_and_exact():
    """Cumulative decay far below exp's fp32 range inside one chunk: ratios are exp of
    differences, so nothing overflows."""
    q, k, v, g, beta, s0 = inputs(1, 128, 1, 8, 8, torch.float32, decay=40.0)
    o, s = kda_chunkwise(q, k, v, g, beta, s0, 1.0, 64)
    want_o, want_s = delta_rule(q, k, v, g, beta, s0, 1.0)
    assert torch.isfinite(o).all() and err(o, want_o) < 1e-5 and err(s, want_s) < 1e-5


@pytest.mark.parametrize("bad", [0, -4, 2.5, None])
def test_bad_chunk_size_is_an_error(bad):
    q, k, v, g, beta, s0 = inputs(1, 4, 1, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        kda_chunkwise(q, k, v, g, beta, s0, 1.0, bad)
