"""The continuous-batching scheduler, stepped by hand: requests arriving mid-run, chunked
prefill beside decodes, per-request sampling; outputs equal each request generated alone."""
from __future__ import annotations

import random

import pytest

import kimi_graph
from kimi_graph.runtime import Engine, GenerationError, SamplingParams
from kimi_graph.runtime.scheduler import QueueFull, Scheduler


@pytest.fixture(scope="module")
def model():
    return kimi_graph.load("tiny")


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, kind, value):
        self.events.append((kind, value))

    @property
    def tokens(self):
        return [v for k, v in self.events if k == "token"]


def test_mixed_batch_equals_alone(model):
    rng = random.Random(0)
    reqs = [([rng.randrange(512) for _ in range(rng.randint(1, 11))],
             SamplingParams(max_new_tokens=rng.randint(1, 6), ignore_eos=True,
                            temperature=0.0 if i % 2 else 0.8, top_k=i % 3 * 10, seed=i))
            for i in range(10)]
    alone_engine = Engine(model, 1, 32)
    alone = [alone_engine.generate([p], sp)[0] for p, sp in reqs]
    engine = Engine(model, 3, 32)
    s = Scheduler(engine, prefill_chunk=4, step_tokens=6)
    sinks = [Recorder() for _ in reqs]
    for (p, sp), sink in zip(reqs[:4], sinks):
        s.submit(p, sp, sink)
    s.step()
    assert len(s.running) == 3 and len(s.waiting) == 1
    for (p, sp), sink in zip(reqs[4:], sinks[4:]):      # arrivals while others run
        s.submit(p, sp, sink)
        s.step()
    while not s.idle:
        assert len(s.running) <= 3
        s.step()
    assert [r.tokens for r in sinks] == alone
    assert all(r.events[-1] == ("finish", "length") for r in sinks)
    assert engine.cache.free_slots == 3


def test_chunks_fit_the_step_budget(model):
    engine = Engine(model, 4, 64)
    s = Scheduler(engine, prefill_chunk=4, step_tokens=6)
    calls = []
    prefill = engine.prefill
    engine.prefill = lambda slots, prompts, **kw: (calls.append([len(p) for p in prompts])
                                                   or prefill(slots, prompts, **kw))
    for n in (10, 3, 5):
        s.submit(list(range(1, n + 1)), SamplingParams(max_new_tokens=2, ignore_eos=True), Recorder())
    while not s.idle:
        s.step()
    # aligned chunks: 10 -> 4 4 2, 5 -> 4 1; at most 6 prefill tokens a step (one chunk always runs)
    assert calls[0] == [4] and all(sum(c) <= 6 or len(c) == 1 for c in calls)
    assert sorted(sum(calls, [])) == sorted([4, 4, 2, 3, 4, 1])


def test_cancel_stop_and_limits(model):
    engine = Engine(model, 2, 16)
    s = Scheduler(engine, max_queue=2)
    a, b = Recorder(), Recorder()
    ra = s.submit([1, 2, 3], SamplingParams(max_new_tokens=10, ignore_eos=True), a)
    s.submit([4, 5], SamplingParams(max_new_tokens=3, ignore_eos=True), b)
    with pytest.raises(QueueFull):
        s.submit([1], SamplingParams(max_new_tokens=1), Recorder())
    s.step()
    s.cancel(ra)
    s.step()
    assert a.events[-1] == ("cancelled", None) and len(a.tokens) <= 2
    assert engine.cache.free_slots == 1             # freed at once
    while not s.idle:
        s.step()
    assert len(b.tokens) == 3 and engine.cache.free_slots == 2
    with pytest.raises(GenerationError, match="context of 16"):
        s.submit(list(range(10)), SamplingParams(max_new_tokens=7), Recorder())
    with pytest.raises(GenerationError, match="out of range"):
        s.submit([512], SamplingParams(max_new_tokens=1), Recorder())
    # a stop id ends the request; the stop token is its last
    first = model.generate([[7, 8]], max_new_tokens=3, ignore_eos=True)[0]
    c = Recorder()
    s.submit([7, 8], SamplingParams(max_new_tokens=3, stop_ids=(first[1],), ignore_eos=True), c)
    while not s.idle:
        s.step()
    assert c.tokens == first[:first.index(first[1]) + 1] and c.events[-1] == ("finish", "stop")


def test_a_failing_step_ends_only_its_requests(model):
    engine = Engine(model, 2, 32, page_size=8, num_pages=3)
    s = Scheduler(engine)
    ok, bad = Recorder(), Recorder()
    s.submit([1, 2], SamplingParams(max_new_tokens=4, ignore_eos=True), ok)
    s.step()
    prefill = engine.prefill

    def broken(slots, prompts, **kw):
        raise RuntimeError("device lost")
    engine.prefill = broken
    s.submit([3, 4], SamplingParams(max_new_tokens=4, ignore_eos=True), bad)
    s.step()
    engine.prefill = prefill
    while not s.idle:
        s.step()
    assert bad.events == [("error", "prefill failed: RuntimeError: device lost")]
    assert ok.tokens == model.generate([[1, 2]], max_new_tokens=4, ignore_eos=True)[0]
    assert engine.cache.free_slots == 2 and engine.cache.free_pages == 3
    # paged: a request is admitted only when its worst case fits the pages left
    with pytest.raises(GenerationError, match="needs 4 cache pages; the cache has 3"):
        s.submit([1] * 20, SamplingParams(max_new_tokens=5), Recorder())
    for _ in range(2):
        s.submit([1] * 10, SamplingParams(max_new_tokens=6, ignore_eos=True), Recorder())
    s.step()
    assert len(s.running) == 1 and len(s.waiting) == 1 and engine.cache.free_slots == 1
    while not s.idle:
        s.step()
    assert engine.cache.free_pages == 3


@pytest.mark.parametrize("page_size", [None, 4])
def test_prefix_cache_keeps_outputs(model, page_size):
    """Prompts that share chunk-aligned prefixes continue from the saved states: the chunks
    that run are only the new ones, and the outputs equal a cold run's."""
    rng = random.Random(1)
    shared = [rng.randrange(512) for _ in range(9)]
    prompts = [shared + [rng.randrange(512) for _ in range(k)] for k in (0, 3, 6)] + [shared[:5] + [7]]
    params = [SamplingParams(max_new_tokens=3, ignore_eos=True, temperature=0.0 if i % 2 else 0.7, seed=i)
              for i in range(len(prompts))]
    cold = Engine(model, 1, 32)
    want = [cold.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    engine = Engine(model, 2, 32, page_size=page_size)
    s = Scheduler(engine, prefill_chunk=4, prefix_cache_bytes=1 << 20)
    ran = []
    prefill = engine.prefill
    engine.prefill = lambda slots, chunks, **kw: (ran.append([len(c) for c in chunks])
                                                  or prefill(slots, chunks, **kw))
    got = []
    for p, sp in zip(prompts, params):          # one after another: each finds the last's saves
        rec = Recorder()
        req = s.submit(p, sp, rec)
        while not s.idle:
            s.step()
        got.append((rec.tokens, req.cached))
    assert [t for t, _ in got] == want
    assert [c for _, c in got] == [0, 8, 8, 4]
    assert sum(sum(r) for r in ran) == 9 + 4 + 7 + 2
    # the budget holds: entries past it are dropped, oldest first
    small = Scheduler(Engine(model, 1, 32), prefill_chunk=4, prefix_cache_bytes=1)
    small.submit(shared, params[0], Recorder())
    while not small.idle:
        small.step()
    assert not small.prefix.entries
