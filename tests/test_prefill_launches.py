"""A prefill's kernel launches do not grow with the number of sequences it runs: the graph call
launches per op, whatever the batch, and the cache set-up (zeroing reused slots' states and
caches, page tables, new pages) takes a few multi-tensor launches for the whole batch, not one
per slot and state. Counted on CPU (lowering/triton/launches.py: Triton launches under the
interpreter plus torch ops dispatched); bench/prefill_split.py measures the H200 counts."""
from __future__ import annotations

import pytest
import torch

import kimi_graph
from kimi_graph.lowering.triton.launches import counting
from kimi_graph.runtime import Engine
from kimi_graph.runtime.cache import CacheManager, runs, zero_all
from reference_kimi import rel_err


def _prefill(engine: Engine, B: int, T: int, skip: str = "~") -> tuple[int, list[torch.Tensor]]:
    """(launches, last logits) of one prefill of B prompts of T tokens into fresh slots
    (allocated, prefilled, freed), not counting the schedule items whose names start with `skip`."""
    prompts = [[(5 * b + 3 * t) % 60 + 1 for t in range(T)] for b in range(B)]
    with counting() as c:
        slots = engine.cache.allocate(B)
        logits = engine.prefill(slots, prompts, last_only=True)
        engine.cache.free(slots)
    return c.total - sum(sum(n.values()) for k, n in c.by_item.items() if k.startswith(skip)), logits


@pytest.mark.usefixtures("triton_interpret")
def test_prefill_launches_do_not_grow_with_sequences(kda_mla_checkpoint):
    """1 x 32 tokens vs 8 x 4 (same tokens, one call each), slots reused so their caches are
    zeroed again: the batch of 8 launches no more than the one sequence, and both give the
    reference interpreter's logits (rel. error <= 1e-5, fp32). The last layer's MoE runs one row
    per sequence (last logits only), on decode-sized kernels whose form follows the row count:
    left out of the count."""
    engines = [Engine(kimi_graph.load(kda_mla_checkpoint, pipeline="default", backend=b), max_batch=8,
                      max_len=40, prefill_chunk=None) for b in ("triton", "interpreter")]
    moe = f"%l{len(engines[0].model.config.layer_kinds) - 1}.moe."
    (one, got1), (_, want1) = (_prefill(e, 1, 32, moe) for e in engines)
    (many, got8), (_, want8) = (_prefill(e, 8, 4, moe) for e in engines)
    assert many <= one, (one, many)
    for x, y in zip(got1 + got8, want1 + want8):
        assert rel_err(x, y) <= 1e-5


def _written(cache: CacheManager, slots: list[int], n: int) -> None:
    """`slots` hold n tokens: their states and every cache row written are 1 (as are pages not
    yet handed out; page 0, the zero page, stays zero)."""
    cache.reserve(slots, n)
    cache.advance(slots, n)
    for spec in cache.specs:
        t = cache.storage[spec.name]
        if spec.seq_axis is not None:
            t = t[1:] if cache.page_size else t[:, :n]
        t.fill_(1.0)


@pytest.mark.parametrize("page_size", [None, 2])
def test_cache_set_up_launches_do_not_grow_with_slots(kda_mla_checkpoint, page_size):
    """allocate (zeroing states and written rows), reserve (new pages) and free: the same
    launches for 1 slot as for 6 (not contiguous), on a cache every slot wrote before."""
    graph = kimi_graph.load(kda_mla_checkpoint).get_graph("decode")

    def launches(slots: list[int]) -> int:
        cache = CacheManager(graph, 8, 16, page_size=page_size)
        _written(cache, cache.allocate(8), 5)
        cache.free(slots)
        with counting() as c:
            got = cache.allocate(len(slots))
            cache.reserve(got, 6)
            cache.free(got)
        return c.total

    assert launches([3]) == launches([0, 1, 2, 5, 6, 7])


@pytest.mark.parametrize("page_size", [None, 2])
def test_reused_slots_start_from_zero_and_others_are_untouched(kda_mla_checkpoint, page_size):
    graph = kimi_graph.load(kda_mla_checkpoint).get_graph("decode")
    cache = CacheManager(graph, 6, 8, page_size=page_size)
    _written(cache, cache.allocate(6), 5)
    table = cache.table.clone()
    cache.free([0, 2, 3, 5])
    got = cache.allocate(3)
    assert got == [0, 2, 3] and cache.lengths == [0, 5, 0, 0, 5, 5]
    cache.reserve(got, 3)
    for spec in cache.specs:
        t = cache.storage[spec.name]
        if spec.seq_axis is None or not page_size:
            kept = t[[1, 4, 5]] if spec.seq_axis is None else t[[1, 4, 5], :5]
            assert t[got].eq(0).all() and kept.eq(1).all(), spec.name
        else:       # new pages zeroed; the pages slots 1 and 4 hold kept; page 0 stays zero
            new = [p for s in got for p in cache.pages[s]]
            kept = [p for s in (1, 4) for p in cache.pages[s]]
            assert t[new].eq(0).all() and t[kept].eq(1).all(), spec.name
    if page_size:
        for s in range(6):
            pages = cache.pages[s]
            assert cache.table[s, :len(pages)].tolist() == pages
            assert cache.table[s, len(pages):].eq(0).all()
        assert torch.equal(cache.table[[1, 4]], table[[1, 4]])
        cache.free(got)
        assert cache.table[got].eq(0).all()


def test_runs_and_zero_all():
    assert runs([5, 0, 1, 3, 2, 7, 1]) == [(0, 4), (5, 6), (7, 8)]
    assert runs([]) == []
    a, b, c, d = torch.ones(3, 4), torch.ones(2, dtype=torch.bfloat16), torch.ones(0), torch.ones(4, 3)
    zero_all([a[1:], b, c, d[:, 1:]])
    assert a[0].eq(1).all() and a[1:].eq(0).all() and b.eq(0).all()
    assert d[:, 0].eq(1).all() and d[:, 1:].eq(0).all()


def test_freeing_a_slot_twice_is_refused(kda_mla_checkpoint):
    from kimi_graph.runtime import CacheError
    cache = CacheManager(kimi_graph.load(kda_mla_checkpoint).get_graph("decode"), 2, 4)
    cache.allocate(2)
    with pytest.raises(CacheError, match="freed twice"):
        cache.free([1, 1])
    assert cache.free_slots == 0
