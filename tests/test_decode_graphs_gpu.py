"""GPU only (skipped without CUDA): the decode step replayed from CUDA graphs (Engine(...,
cuda_graphs=True)) against the same engine's eager in-place path, step by step: ragged
contexts, sequences finishing at different steps, slots freed and reused mid-batch, batches
padded to their bucket, paged and unpaged caches, seeded sampling; and a 2k-step greedy
generation on a published-width slice equal token for token.

Tolerances: the tiny model in fp32 <= 1e-4 (padded GEMM shapes may sum differently); the
published-width slice in bf16 <= 2e-2. At batch 1 the graph runs the eager step's kernels on
the eager step's shapes, so greedy tokens must match exactly.

    python -m pytest tests/test_decode_graphs_gpu.py -q
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import kimi_graph  # noqa: E402
from kimi_graph.config import KimiLinearConfig  # noqa: E402
from kimi_graph.presets import PRESETS  # noqa: E402
from kimi_graph.runtime import Engine, SamplingParams  # noqa: E402
from reference_kimi import rel_err  # noqa: E402


@pytest.fixture(autouse=True)
def _gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def tiny():
    return kimi_graph.load("tiny", device="cuda", pipeline="default", backend="triton")


def slice_of_published(**load):
    """Layers 1-4 of the published config (3 KDA, then MLA; a dense layer, then MoE) with 32
    experts instead of 256, in bf16."""
    cfg = json.loads(json.dumps(PRESETS["kimi-linear-48b-a3b"]))
    cfg.update(num_hidden_layers=4, num_experts=32)
    cfg["linear_attn_config"].update(kda_layers=[1, 2, 3], full_attn_layers=[4])
    return kimi_graph.load(KimiLinearConfig.from_dict(cfg), dtype=torch.bfloat16, device="cuda",
                           pipeline="default", backend="triton", **load)


@pytest.fixture(scope="module")
def published_slice():
    return slice_of_published()


def script(engine: Engine) -> list[torch.Tensor]:
    """Prefills, decodes (batches of 3, 2 and 5: padded to 4, 2 and 8), a sequence finishing
    early, a slot freed and reused, a continuation -> every step's logits and the end states."""
    out = []
    a, b, c, x, y = engine.cache.allocate(5)
    out += engine.prefill([a, b, c, x, y], [[1, 5, 9, 14, 3], [7], [30, 2, 41], [8] * 9, [3, 3]])
    for t in range(3):
        out.append(engine.decode([a, b, c], [4 + t, 8, 15]))
    out.append(engine.decode([a, c], [16, 23]))                   # b finished
    engine.cache.free([b])
    (d,) = engine.cache.allocate(1)
    out += engine.prefill([d], [[42, 43]])
    for t in range(3):
        out.append(engine.decode([c, d, a, x, y], [1, 2, 3, t, t]))
    out += engine.prefill([a], [[9, 8, 7]])
    out.append(engine.decode([a, d], [5, 6]))
    for name, t in engine.cache.storage.items():
        out.append(t.float().flatten())
    return out


def compare(model, tol, **kw):
    got = script(Engine(model, cuda_graphs=True, **kw))
    want = script(Engine(model, **kw))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and rel_err(g, w) <= tol, i


@pytest.mark.parametrize("page_size", [None, 16])
def test_tiny_replay_equals_eager_step_by_step(tiny, page_size):
    compare(tiny, 1e-4, max_batch=8, max_len=64, page_size=page_size)


@pytest.mark.parametrize("page_size", [None, 64])
def test_published_slice_replay_equals_eager_step_by_step(published_slice, page_size):
    compare(published_slice, 2e-2, max_batch=8, max_len=256, page_size=page_size)


def test_published_slice_int4_experts_replay_equals_eager():
    """int4 experts: the decode step's low-bit MoE (the permuted W4A8 kernels on sm_90) under
    graphs, step by step against the same engine without graphs."""
    compare(slice_of_published(experts="int4"), 2e-2, max_batch=8, max_len=256)


def test_l2_prefetch_changes_no_result(published_slice, monkeypatch):
    """l2_prefetch on (weights into L2 on a side stream beside the latency-bound steps): the
    one-token steps, eager and replayed from graphs, bitwise those without it; it did launch."""
    from kimi_graph.lowering.triton import prefetch
    from kimi_graph.lowering.triton.targets import TARGETS, current_target

    def steps(**kw):
        engine = Engine(published_slice, max_batch=1, max_len=64, **kw)
        (s,) = engine.cache.allocate(1)
        out = engine.prefill([s], [[5, 9, 14]])
        return out + [engine.decode([s], [t]) for t in (3, 7, 11, 2)]
    want = steps(), steps(cuda_graphs=True)
    monkeypatch.setitem(TARGETS[current_target()]["configs"]["l2_prefetch"], "enabled", True)
    calls = []
    monkeypatch.setattr(prefetch, "issue", lambda ts, _f=prefetch.issue: calls.append(len(ts)) or _f(ts))
    got = steps(), steps(cuda_graphs=True)
    assert calls
    for w, g in zip(want, got):
        assert all(torch.equal(a, b) for a, b in zip(w, g))


def test_contexts_grow_without_recapture_and_padding_touches_no_slot(tiny):
    engine = Engine(tiny, max_batch=8, max_len=300, page_size=16, cuda_graphs=True)
    engine.capture_graphs([3])                                  # ahead of time: bucket 4
    assert list(engine.graphs.graphs) == [(4, True)]
    idle, a, b, c = engine.cache.allocate(4)
    engine.prefill([idle, a, b, c], [[1, 2], [3], [4, 5, 6], [7]])
    before = {k: v.clone() for k, v in engine.cache.storage.items()}
    for t in range(200):
        engine.decode([a, b, c], [t % 500, 1, 2])               # batch 3 pads to 4
    assert list(engine.graphs.graphs) == [(4, True)]            # one capture for 200 steps
    for spec in engine.cache.specs:                             # the idle slot is untouched
        rows = engine.cache.pages[idle] if spec.seq_axis is not None else [idle]
        t = engine.cache.storage[spec.name]
        assert torch.equal(t[rows], before[spec.name][rows]), spec.name


def test_seeded_sampling_equals_eager(tiny):
    params = SamplingParams(max_new_tokens=40, temperature=0.8, top_k=50, top_p=0.9, seed=5, ignore_eos=True)
    prompts = [[1, 5, 9], [7], [30, 2, 41, 8]]
    kw = dict(max_batch=4, max_len=64)
    want = Engine(tiny, **kw).generate(prompts, params)
    assert Engine(tiny, cuda_graphs=True, **kw).generate(prompts, params) == want
    alone = [Engine(tiny, cuda_graphs=True, **kw).generate([p], params)[0] for p in prompts]
    assert alone == want                                         # not on the batch


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=50, seed=5)])
def test_overlapped_generation_under_graphs_equals_the_plain_loop(tiny, sampling):
    """Engine(overlap=True) with graphs: each step queued, fed the previous draw on the device,
    before the host reads it; the same tokens as the plain loop, sequences stopping at different
    steps (one stop id), the slots freed."""
    prompts = [[1, 5, 9], [7], [30, 2, 41, 8]]
    kw = dict(max_batch=4, max_len=64, cuda_graphs=True)
    free = Engine(tiny, **kw).generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True, **sampling))
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, stop_ids=(free[1][3],), **sampling)
    want = Engine(tiny, **kw).generate(prompts, params)
    ahead = Engine(tiny, overlap=True, **kw)
    assert ahead.generate(prompts, params) == want and ahead.cache.free_slots == 4


def test_2k_step_greedy_generation_equals_eager(published_slice):
    params = SamplingParams(max_new_tokens=2000, ignore_eos=True)
    prompt = [[(i * 7919) % 163840 for i in range(16)]]
    kw = dict(max_batch=1, max_len=2048, page_size=64)
    want = Engine(published_slice, **kw).generate(prompt, params)[0]
    got = Engine(published_slice, cuda_graphs=True, **kw).generate(prompt, params)[0]
    first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
    assert first is None, f"tokens differ from step {first}"
    assert len(got) == 2000
