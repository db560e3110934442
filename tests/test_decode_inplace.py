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
from kimi_graph.runtime import Engine, SamplingParams  # noqa: E402
from kimi_graph.runtime.views import PagedRows, SlotRows  # noqa: E402
from reference_kimi import rel_err  # noqa: E402

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("triton_interpret")


@pytest.fixture(scope="module")
def small(kda_mla_checkpoint):
    return kda_mla_checkpoint


def script(engine: Engine) -> list[torch.Tensor]:
    """Ragged prefills, a batch out of slot order, a sequence finishing while another goes on,
    its slot freed and reused, a continuation -> each step's logits and the live states."""
    out = []
    a, b = engine.cache.allocate(2)
    out += engine.prefill([a, b], [[1, 5, 9, 14, 3], [7, 2]])       # ragged: two calls
    out.append(engine.decode([b, a], [4, 8]))
    engine.cache.free([a])                                           # a finished
    (d,) = engine.cache.allocate(1)                                  # its slot, states reset
    out += engine.prefill([d], [[42, 43, 44]])
    out.append(engine.decode([b, d], [5, 6]))
    for spec in engine.cache.specs:
        t = engine.cache.storage[spec.name]
        for s in (b, d):
            rows = engine.cache.pages[s] if engine.cache.page_size and spec.seq_axis is not None else [s]
            out.append(t[rows].flatten())
    return out


@pytest.mark.parametrize("pipeline,page_size", [("default", None), ("default", 2), (None, 3)])
def test_in_place_steps_equal_the_functional_path(small, pipeline, page_size, monkeypatch):
    """A decode step writes MLA's normalised latent and shared key rows by one launch a layer
    (mla.CacheRows), in paged and unpaged caches."""
    from kimi_graph.lowering.triton import mla
    tri = kimi_graph.load(small, pipeline=pipeline, backend="triton")
    ref = kimi_graph.load(small, pipeline=pipeline)
    kw = dict(max_batch=3, max_len=12, page_size=page_size, window_block=4)
    fast, slow = Engine(tri, **kw), Engine(ref, **kw)
    assert fast.in_place("decode") and fast.in_place("prefill")
    assert not slow.in_place("decode")
    names = []
    monkeypatch.setattr(mla, "launch", lambda spec, *a, _l=mla.launch: names.append(spec.name) or _l(spec, *a))
    got, want = script(fast), script(slow)
    assert "cache_write_norm_pair" in names
    assert len(got) == len(want)
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.shape == y.shape and rel_err(x, y) <= TOL, i


def test_views_never_gather_or_scatter(small, monkeypatch):
    """The in-place engine never moves a cache: gather and scatter are not called."""
    engine = Engine(kimi_graph.load(small, pipeline="default", backend="triton"), max_batch=2,
                    max_len=16, page_size=4)
    for name in ("gather", "scatter"):
        monkeypatch.setattr(engine.cache, name, lambda *a, **k: pytest.fail("cache moved"))
    out = engine.generate([[1, 2, 3], [4]], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert [len(o) for o in out] == [2, 2]


def test_views_locate_rows_in_the_storage(small):
    tri = kimi_graph.load(small, pipeline="default", backend="triton")
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


def test_graph_buckets_and_clear_errors_without_cuda(small):
    from kimi_graph.runtime.engine import GenerationError
    from kimi_graph.runtime.graphs import bucket
    assert [bucket(n) for n in (1, 2, 3, 5, 17, 256, 257, 600)] == [1, 2, 4, 8, 32, 256, 512, 768]
    model = kimi_graph.load(small)
    with pytest.raises(GenerationError, match="needs a CUDA device"):
        Engine(model, cuda_graphs=True)
    with pytest.raises(GenerationError, match="needs Engine"):
        Engine(model).capture_graphs()


@pytest.mark.parametrize("page_size", [None, 4])
def test_fill_context_primes_slots_for_timing(small, page_size):
    """fill_context: slots hold L tokens of random contents; decode continues from there."""
    engine = Engine(kimi_graph.load(small), max_batch=2, max_len=16, page_size=page_size)
    slots = engine.cache.allocate(2)
    engine.fill_context(slots, 9)
    assert [engine.cache.lengths[s] for s in slots] == [9, 9]
    logits = engine.decode(slots, [1, 2])
    assert logits.shape[0] == 2 and bool(torch.isfinite(logits).all())
    assert [engine.cache.lengths[s] for s in slots] == [10, 10]
    lat = next(n for n, t in engine.cache.storage.items() if "latent" in n)
    rows = engine.cache.views(slots, 10)[lat].dense()
    assert bool((rows[:, :9].abs().sum(-1) > 0).all())          # every primed row written


def test_padded_graph_steps_equal_eager_steps(small):
    """The CUDA-graph path's step (static buffers, batch padded to its bucket with slot -1
    rows, caches seen at full capacity, sampling inside), run eagerly here (capturing needs
    CUDA), equals the plain in-place step: padding rows touch no state."""
    from kimi_graph.runtime.graphs import DecodeGraphs
    from kimi_graph.runtime.sampling import Sampler
    tri = kimi_graph.load(small, pipeline="default", backend="triton")
    kw = dict(max_batch=4, max_len=12, page_size=2, window_block=4)
    runs = []
    for padded in (False, True):
        engine = Engine(tri, **kw)
        if padded:
            engine.graphs = DecodeGraphs(engine, capture=False)
        sampler = Sampler(SamplingParams(temperature=0.9, top_k=20, seed=3), 3)
        a, b, c = engine.cache.allocate(3)
        out = engine.prefill([a, b, c], [[1, 5, 9], [7, 2, 4], [3]])
        logits, tokens = engine.decode_sample([b, a, c], [4, 8, 15], sampler, [1, 0, 2])   # pads to 4
        out += [logits.clone(), tokens.clone()]
        logits, tokens = engine.decode_sample([c, a], [16, 23], sampler, [2, 0])           # bucket 2
        out += [logits.clone(), tokens.clone()]
        for t in engine.cache.storage.values():
            out.append(t.flatten())
        runs.append(out)
    for i, (x, y) in enumerate(zip(*runs)):
        assert x.shape == y.shape and rel_err(x.float(), y.float()) <= TOL, i
