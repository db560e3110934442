"""The triton backend's in-place path (states and caches updated where they live, through
runtime/views.py) against the functional path (the reference interpreter, states gathered
and scattered), step by step on the tiny model through the Triton interpreter (CPU, fp32):
ragged contexts, sequences finishing at different steps, slots freed and reused mid-batch,
paged and unpaged caches. Tolerance: rel. error <= 1e-5 (fp32, different summation order)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kimi_graph  # noqa: E402
from kimi_graph.lowering.triton.backend import accepts_views  # noqa: E402
from kimi_graph.runtime import Engine  # noqa: E402
from kimi_graph.runtime.views import PagedRows, SlotRows  # noqa: E402
from reference_kimi import rel_err  # noqa: E402

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("triton_interpret")


def script(engine: Engine) -> list[torch.Tensor]:
    """A fixed schedule of prefills, decodes, frees and reuses -> every step's logits (and
    the live slots' states at the end, flattened)."""
    out = []
    a, b, c = engine.cache.allocate(3)
    out += engine.prefill([a, b, c], [[1, 5, 9, 14, 3], [7], [300, 2, 41]])      # ragged
    out.append(engine.decode([a, b, c], [4, 8, 15]))
    out.append(engine.decode([a, c], [16, 23]))          # b finished: a hole in the batch
    engine.cache.free([b])
    (d,) = engine.cache.allocate(1)                       # b's slot again, states reset
    out += engine.prefill([d], [[42, 43]])
    out.append(engine.decode([c, d, a], [1, 2, 3]))      # a batch out of slot order
    out += engine.prefill([a], [[9, 8, 7]])               # a continuation mid-generation
    out.append(engine.decode([a, d], [5, 6]))
    for s in (a, c, d):
        for name, t in engine.cache.storage.items():
            if engine.cache.page_size is None or t.dim() != 3:
                out.append(t[s].flatten())
    return out


@pytest.mark.parametrize("page_size", [None, 2])
@pytest.mark.parametrize("pipeline", ["default", None])
def test_in_place_steps_equal_the_functional_path(pipeline, page_size):
    tri = kimi_graph.load("tiny", pipeline=pipeline, backend="triton")
    ref = kimi_graph.load("tiny", pipeline=pipeline)
    kw = dict(max_batch=4, max_len=24, page_size=page_size, window_block=4)
    fast, slow = Engine(tri, **kw), Engine(ref, **kw)
    got, want = script(fast), script(slow)
    assert fast.in_place("decode") and fast.in_place("prefill")
    assert not slow.in_place("decode")
    assert len(got) == len(want)
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.shape == y.shape and rel_err(x, y) <= TOL, i


def test_views_never_gather_or_scatter(monkeypatch):
    """The in-place engine never moves a cache: gather and scatter are not called."""
    tri = kimi_graph.load("tiny", pipeline="default", backend="triton")
    engine = Engine(tri, max_batch=2, max_len=16, page_size=4)
    for name in ("gather", "scatter"):
        monkeypatch.setattr(engine.cache, name, lambda *a, **k: pytest.fail("cache moved"))
    out = engine.generate([[1, 2, 3], [4]], kimi_graph.runtime.SamplingParams(max_new_tokens=3,
                                                                             ignore_eos=True))
    assert [len(o) for o in out] == [3, 3]


def test_views_locate_rows_in_the_storage():
    tri = kimi_graph.load("tiny", pipeline="default", backend="triton")
    assert accepts_views(tri.get_graph("decode", True))
    engine = Engine(tri, max_batch=3, max_len=8, page_size=2)
    s0, s1 = engine.cache.allocate(2)
    engine.cache.reserve([s1], 5)                       # 3 pages for slot 1
    views = engine.cache.views([s1], window=6)
    lat = next(v for v in views.values() if isinstance(v, PagedRows))
    assert isinstance(next(v for v in views.values() if not isinstance(v, PagedRows)), SlotRows)
    new = torch.randn(1, 5, lat.shape[2])
    lat.write(new, torch.tensor([0]))
    assert torch.equal(lat.dense()[0, :5], new[0])
    pages = engine.cache.pages[s1]
    assert torch.equal(lat.storage[pages[1]], new[0, 2:4])
