"""The runtime: prefill/decode through cache slots, batched generation, sampling, errors.

Tolerances (relative error ||got - want|| / ||want|| of the logits): fp32 <= 1e-5 between
the engine's split run (prefill T-k, then k decode steps) and both the full prefill and the
eager fp64 reference (tests/reference_kimi.py); fp64 <= 1e-10 against the reference; bf16
<= 3e-2 between split and full (bf16 rounding of activations, fp32 KDA state).
"""
from __future__ import annotations

import random

import pytest
import torch

import kimi_graph
from checkpoints import random_config
from kimi_graph.cli import main as cli_main
from kimi_graph.model import build_graph
from kimi_graph.presets import PRESETS
from kimi_graph.summary import summarize
from kimi_graph.runtime import (CacheError, CacheManager, Engine, GenerationError, Sampler,
                                SamplingParams, filter_logits)
from kimi_graph.runtime.sampling import sample
from reference_kimi import forward, read_checkpoint, rel_err

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SEEDS = list(range(12))



def split_logits(engine: Engine, ids: list[int], k: int, chunk: int | None = None) -> torch.Tensor:
    """Logits [T, V] from prefill of ids[:T-k] (in chunks of `chunk`) then k decode steps."""
    engine.prefill_chunk = chunk
    (slot,) = engine.cache.allocate(1)
    try:
        parts = [engine.prefill([slot], [ids[:len(ids) - k]])[0]]
        parts += [engine.decode([slot], [t]) for t in ids[len(ids) - k:]]
    finally:
        engine.cache.free(slot)
    return torch.cat(parts)


def tiny(dtype=torch.float32, **kw):
    return kimi_graph.load("tiny", dtype=dtype, seed=0, **kw)


# -- prefill(T) == prefill(T-k) + k decode steps ------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_split_prefill_decode_matches_full(seed, make_checkpoint):
    cfg = random_config(seed)
    path = make_checkpoint(cfg, seed=seed)
    r = random.Random(seed)
    W = cfg["linear_attn_config"]["short_conv_kernel_size"]
    T = r.randint(1, W - 1) + 1 if seed % 3 == 0 else r.randint(W + 1, 11)   # some T < kernel
    ids = [r.randrange(cfg["vocab_size"]) for _ in range(T)]
    ref_cfg, ref_w = read_checkpoint(path)
    want = forward(ref_cfg, ref_w, torch.tensor([ids]))[0]
    for dtype in (torch.float32, torch.float64):
        model = kimi_graph.load(path, dtype=dtype)
        engine = Engine(model, max_batch=2, max_len=16, window_block=4)
        full = model(torch.tensor([ids]))[0]
        assert rel_err(full, want) <= TOL[dtype]
        for k in sorted({1, T - 1, max(1, T // 2)}):
            got = split_logits(engine, ids, k)
            assert got.shape == full.shape
            assert rel_err(got, full) <= TOL[dtype], (dtype, T, k)
            assert rel_err(got, want) <= TOL[dtype], (dtype, T, k)


def test_chunked_prefill_continues_from_states():
    model = tiny()
    ids = torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    full = model(torch.tensor([ids]))[0]
    engine = Engine(model, max_batch=1, max_len=32, window_block=None)
    for chunk in (1, 2, 3, 5):          # chunks shorter than the conv kernel, and ragged ends
        assert rel_err(split_logits(engine, ids, 2, chunk=chunk), full) <= TOL[torch.float32]


def test_bf16_split_matches_full():
    model = tiny(torch.bfloat16)
    ids = [1, 5, 9, 14, 3, 7, 200]
    full = model(torch.tensor([ids]))[0]
    got = split_logits(Engine(model, max_len=8), ids, 3)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, full) <= 3e-2


# -- batched generation -----------------------------------------------------------------
PROMPTS = [[1, 5, 9, 14, 3], [7], [300, 2, 41], [11, 12, 13, 14, 15], [99, 98]]


def test_batched_greedy_equals_each_alone_and_is_deterministic():
    model = tiny()
    kw = dict(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    batched = model.generate(PROMPTS, **kw)
    alone = [model.generate([p], **kw)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(o) == 6 for o in batched)
    assert model.generate(PROMPTS, **kw) == batched
    # each sequence's first token is the argmax of its own full prefill
    for p, o in zip(PROMPTS, batched):
        assert o[0] == int(model(torch.tensor([p]))[0, -1].argmax())


def test_generation_with_stops_and_slot_reuse():
    """A sequence that stops early leaves a hole in the batch (non-contiguous slots); a
    reused engine and reused slots give what a fresh engine gives."""
    model = tiny()
    kw = dict(max_new_tokens=6, ignore_eos=True)
    free = model.generate(PROMPTS, **kw)
    stop = free[1][1]                               # prompt 1 stops at its 2nd token
    kw["stop_ids"] = (stop,)
    want = [model.generate([p], **kw)[0] for p in PROMPTS]
    assert want[1] == free[1][:2]
    for w, f in zip(want, free):                    # stop token kept, nothing after it
        n = f.index(stop) + 1 if stop in f else len(f)
        assert w == f[:n]
    engine = Engine(model, max_batch=6, max_len=16, window_block=8)
    params = SamplingParams(**kw)
    (busy,) = engine.cache.allocate(1)              # slot 0 taken: the batch starts at 1
    assert engine.generate(PROMPTS, params) == want
    engine.cache.free(busy)
    assert engine.generate(PROMPTS[::-1], params) == want[::-1]
    assert engine.cache.free_slots == 6


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=5)])
def test_overlapped_generation_gives_the_same_tokens(sampling):
    """Engine(overlap=True) queues each step before the host reads the draw it is fed: the same
    tokens as the plain loop, sequences stopping at different steps (a stop id), slots freed."""
    model = tiny()
    free = model.generate(PROMPTS, max_new_tokens=6, ignore_eos=True, **sampling)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, stop_ids=(free[1][1],), **sampling)
    plain, ahead = (Engine(model, max_batch=6, max_len=16, overlap=o) for o in (False, True))
    want = plain.generate(PROMPTS, params)
    assert any(len(w) < 6 for w in want) and any(len(w) == 6 for w in want)
    assert ahead.generate(PROMPTS, params) == want
    assert ahead.cache.free_slots == 6
    assert list(ahead.stream(PROMPTS[0], params)) == want[0]
    with pytest.raises(GenerationError, match="overlap must be True, False or None"):
        Engine(model, overlap="yes")
    assert Engine(model).overlap is False           # the default: on for CUDA models only


def test_overlapped_generation_raises_on_non_finite_logits():
    """A NaN row's draw goes into the step ahead as a valid id; the host raises on reading it."""
    from kimi_graph.finite import NonFiniteError
    model = kimi_graph.load("tiny", check_finite=False)
    model.weights["lm_head.weight"][:] = float("inf")
    engine = Engine(model, max_batch=1, max_len=16, overlap=True)
    with pytest.raises(NonFiniteError, match="next-token logits hold NaN or inf"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
    assert engine.cache.free_slots == 1


def test_eos_stops_generation():
    model = tiny()
    free = model.generate([[1, 5, 9]], max_new_tokens=8, ignore_eos=True)[0]
    model.config.eos_token_id = free[2]
    try:
        assert model.generate([[1, 5, 9]], max_new_tokens=8)[0] == free[:free.index(free[2]) + 1]
    finally:
        model.config.eos_token_id = PRESETS["tiny"]["eos_token_id"]


def test_stream_yields_the_generated_tokens_and_frees_its_slot():
    model = tiny()
    kw = dict(max_new_tokens=5, temperature=0.9, top_k=20, seed=7, ignore_eos=True)
    it = model.stream([1, 5, 9], **kw)
    assert list(it) == model.generate([[1, 5, 9]], **kw)[0]
    engine = Engine(model, max_batch=1, max_len=16)
    params = SamplingParams(**kw)
    s = engine.stream([1, 5, 9], params)
    next(s)
    assert engine.cache.free_slots == 0
    s.close()
    assert engine.cache.free_slots == 1


def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = tiny()
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = model.generate(PROMPTS, seed=3, **kw)
    assert a == model.generate(PROMPTS, seed=3, **kw)
    assert [model.generate([p], seed=3, **kw)[0] for p in PROMPTS] == a
    assert model.generate(PROMPTS, seed=4, **kw) != a


# -- sampling ---------------------------------------------------------------------------
def test_filter_logits_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0, -1.0]])
    inf = float("-inf")
    assert filter_logits(logits, 2, 1.0).tolist() == [[2.0, inf, inf, 3.0, inf]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    lp = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(lp, 0, p))[0].tolist()
    assert kept(0.8) == [True, True, False, False]       # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.1) == [True, False, False, False]      # the top token always stays
    assert kept(1.0) == [True] * 4


def test_sampler_draws_from_the_filtered_distribution():
    """Device sampling (Gumbel-max over counter-based noise) draws from softmax of the
    filtered, tempered logits, as filter_logits defines them."""
    n = 20000
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(n, 4) * 2.0
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)
    for T, k, p in [(2.0, 0, 0.85), (1.0, 2, 1.0), (0.7, 3, 0.9)]:
        draws = sample(logits, zeros, torch.arange(n), ones * T, zeros + k, ones * p)
        freq = torch.bincount(draws, minlength=4).double() / n
        want = filter_logits(logits[:1] / T, k, p).softmax(-1)[0].double()
        assert (freq - want).abs().max() < 0.015, (T, k, p)     # ~4 sigma at n = 20000
    # a row's draw depends on its seed, step and logits only, never on the other rows
    x = torch.randn(6, 50)
    args = (torch.tensor([3, 3, 4, 4, 5, 5]), torch.tensor([0, 1, 0, 1, 0, 1]), torch.full((6,), 0.8),
            torch.full((6,), 10), torch.full((6,), 0.95))
    both = sample(x, *args)
    for i in range(6):
        assert sample(x[i:i + 1], *(a[i:i + 1] for a in args)) == both[i]
    g = Sampler(SamplingParams(temperature=0.0), 2)
    assert g(torch.tensor([[0.0, 1.0, 1.0], [5.0, 0.0, 0.0]]), [0, 1]) == [1, 0]   # lowest id on ties
    with pytest.raises(FloatingPointError):
        g(torch.tensor([[0.0, float("nan")]]), [0])
    h = Sampler(SamplingParams(temperature=1.0, seed=1), 1)
    with pytest.raises(FloatingPointError):
        h(torch.tensor([[0.0, float("inf")]]), [0])


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-2),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(seed="x")])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


# -- cache accounting ---------------------------------------------------------------------
def test_published_cache_accounting_without_allocating():
    cfg = kimi_graph.KimiLinearConfig.from_dict(PRESETS["kimi-linear-48b-a3b"])
    g = build_graph(cfg, "decode", dtype="bf16")
    sizes = {n: CacheManager(g, 1, n, allocate=False) for n in (1000, 1001, 4096)}
    assert all(not c.storage for c in sizes.values())
    a, b = sizes[1000].allocation_bytes(), sizes[1001].allocation_bytes()
    grown = {k: b[k] - a[k] for k in a}
    assert sum(grown.values()) == 8064 == sizes[4096].bytes_per_token
    assert all(v == 0 for k, v in grown.items() if k.startswith("state."))
    assert len([k for k, v in grown.items() if v]) == 14          # 7 MLA layers x (latent, key)
    assert {k: v for k, v in grown.items() if v} == {
        **{f"cache.l{i}.latent": 512 * 2 for i in (3, 7, 11, 15, 19, 23, 26)},
        **{f"cache.l{i}.rope_key": 64 * 2 for i in (3, 7, 11, 15, 19, 23, 26)}}
    # the KDA state (and conv states) per sequence: constant in length
    fixed = {n: c.fixed_bytes_per_sequence for n, c in sizes.items()}
    assert set(fixed.values()) == {20 * (32 * 128 * 128 * 4 + 3 * 4096 * 3 * 2)} == {43_417_600}
    four = CacheManager(g, 4, 1000, allocate=False).allocation_bytes()
    assert sum(four.values()) == 4 * sum(a.values())
    facts = summarize(cfg)          # `kimi-graph inspect` reads the same numbers off the graph
    assert facts["kv_cache_bytes_per_token"] == 8064
    assert facts["kda_state_bytes_per_sequence"] == sizes[1000].fixed_bytes_per_sequence


def test_allocated_storage_matches_the_accounting():
    model = tiny()
    c = Engine(model, max_batch=3, max_len=10).cache
    assert {k: v.nbytes for k, v in c.storage.items()} == c.allocation_bytes()
    assert all(v.shape[0] == 3 for v in c.storage.values())
    assert c.storage["state.l0.kda"].dtype == torch.float32
    t = PRESETS["tiny"]
    assert c.bytes_per_token == 2 * (t["kv_lora_rank"] + t["qk_rope_head_dim"]) * 4


def test_state_specs_refuse_graphs_that_change_a_state_type():
    model = tiny()
    g = model.get_graph("decode").copy()
    out = g.outputs[1]
    g.types[out] = g.types[out].with_dtype("f64")
    with pytest.raises(CacheError, match="returns it as"):
        CacheManager(g, 1, 4)
    with pytest.raises(CacheError, match="not stateful"):
        CacheManager(model.get_graph("prefill"), 1, 4)


def test_cache_slots_allocate_free_reuse():
    model = tiny()
    c = Engine(model, max_batch=3, max_len=8).cache
    assert c.allocate(2) == [0, 1]
    c.free(0)
    assert c.allocate(2) == [0, 2]
    with pytest.raises(CacheError, match="slots free"):
        c.allocate(1)
    with pytest.raises(CacheError, match="not allocated"):
        c.free(5)
    c.advance([1], 8)
    with pytest.raises(CacheError, match="capacity of 8"):
        c.reserve([1], 1)


# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("prompts, match", [
    ([[]], "empty prompt"),
    ([], "no prompts"),
    ([[1, 512]], r"out of range \[0, 512\): \[512\]"),
    ([[-1, 3]], "out of range"),
    ([[1.5, 2]], "must be integers"),
    ([1, 5, 9], "list of prompts"),
    ([[1] * 4090], "past the model_max_length of 4096"),
])
def test_bad_prompts_get_clear_errors(prompts, match):
    with pytest.raises(GenerationError, match=match):
        tiny().generate(prompts, max_new_tokens=8)


def test_request_larger_than_the_cache():
    model = tiny()
    with pytest.raises(GenerationError, match="larger than the cache: 2 of 2 slots"):
        model.generate([[1]] * 3, max_new_tokens=2, max_batch=2)
    with pytest.raises(GenerationError, match="past the cache capacity of 10"):
        model.generate([[1, 2, 3]], max_new_tokens=8, max_len=10)
    with pytest.raises(GenerationError, match="exceeds the model's model_max_length"):
        Engine(model, max_len=5000)
    e = Engine(model, max_batch=1, max_len=10)
    with pytest.raises(CacheError, match="exceed the cache capacity"):
        e.prefill(e.cache.allocate(1), [list(range(11))])


# -- the command line -------------------------------------------------------------------
def test_cli_generate_streams_ids(capsys):
    want = tiny().generate([[1, 5, 9]], max_new_tokens=4, ignore_eos=True)[0]
    assert cli_main(["generate", "tiny", "--ids", "1,5,9", "--max-new-tokens", "4", "--ignore-eos"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == [str(t) for t in want]
    assert "3 prompt tokens, 4 new" in out.err


@pytest.mark.parametrize("argv, match", [
    (["--ids", "1,5,x"], "comma-separated integers"),
    (["--ids", "1,5,900"], "out of range"),
    (["--prompt", "hello"], "no directory with tokenizer files"),
    (["--ids", "1", "--chat"], "--chat needs --prompt"),
    (["--ids", "1", "--top-p", "0"], "top_p"),
])
def test_cli_generate_errors(argv, match, capsys):
    assert cli_main(["generate", "tiny", "--max-new-tokens", "2"] + argv) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("options", [dict(pipeline="default"), dict(backend="torch"),
                                     dict(backend="onnxruntime")],
                         ids=["default_pipeline", "torch_backend", "onnxruntime_backend"])
def test_engine_runs_unchanged_on_other_graphs_and_backends(options):
    """The engine only calls model.execute: optimized graphs and other executors work as is."""
    from kimi_graph.api import BACKENDS
    if options.get("backend", "interpreter") not in BACKENDS:
        pytest.skip(f"backend {options['backend']!r} is not registered")
    if options.get("backend") == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = tiny(**options)
    ids = [1, 5, 9, 14, 3, 7, 200]
    full = tiny()(torch.tensor([ids]))[0]
    assert rel_err(split_logits(Engine(model, max_len=8), ids, 3), full) <= TOL[torch.float32]
    prompts = PROMPTS[:3]
    kw = dict(max_new_tokens=4, ignore_eos=True)
    assert model.generate(prompts, **kw) == tiny().generate(prompts, **kw)


def test_prompt_forms():
    model = tiny()
    kw = dict(max_new_tokens=3, ignore_eos=True)
    want = model.generate([[1, 5, 9], [3, 4, 5]], **kw)
    assert model.generate(torch.tensor([[1, 5, 9], [3, 4, 5]]), **kw) == want
    assert model.generate([torch.tensor([1, 5, 9]), (3, 4, 5)], **kw) == want
    with pytest.raises(GenerationError, match="1-D integer ids"):
        model.generate([torch.tensor([1.0, 2.0])], **kw)


# -- paged MLA caches ---------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_paged_caches_give_what_preallocated_caches_give(page_size):
    model = tiny()
    ids = [1, 5, 9, 14, 3, 7, 200, 45, 3]
    full = model(torch.tensor([ids]))[0]
    paged = Engine(model, max_batch=5, max_len=20, page_size=page_size, window_block=4)
    assert rel_err(split_logits(paged, ids, 4, chunk=2), full) <= TOL[torch.float32]
    params = SamplingParams(max_new_tokens=7, ignore_eos=True)
    want = Engine(model, max_batch=5, max_len=20).generate(PROMPTS, params)
    assert paged.generate(PROMPTS, params) == want
    assert paged.cache.free_pages == paged.cache.num_pages          # all pages returned
    assert paged.generate(PROMPTS[::-1], params) == want[::-1]      # pages reused, stale rows


def test_paged_pool_accounting_and_exhaustion():
    model = tiny()
    e = Engine(model, max_batch=4, max_len=16, page_size=4, num_pages=6)
    c = e.cache
    t = PRESETS["tiny"]
    assert c.storage["cache.l1.latent"].shape == (7, 4, t["kv_lora_rank"])     # 6 pages + zero page
    assert {k: v.nbytes for k, v in c.storage.items()} == c.allocation_bytes()
    assert c.bytes_per_token == Engine(model, max_len=16).cache.bytes_per_token
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    with pytest.raises(GenerationError, match="needs up to 7 cache pages of 4 tokens; 6 of 6"):
        e.generate([[1] * 11, [2] * 6], params)                      # 4 + 3 pages
    assert len(e.generate([[1] * 11, [2] * 3], params)[0]) == 5      # 4 + 2 pages fit
    (s,) = c.allocate(1)
    c.reserve([s], 16)
    assert c.free_pages == 2
    with pytest.raises(CacheError, match="out of cache pages"):
        c.reserve(c.allocate(1), 9)
    with pytest.raises(CacheError, match="num_pages needs page_size"):
        Engine(model, num_pages=3)
    with Engine(model, max_batch=2, max_len=32, page_size=4, num_pages=3).sequence() as seq:
        seq.extend([1, 2, 3, 4, 5])                                  # 2 pages
        with pytest.raises(GenerationError, match="1 cache pages free"):
            seq.generate(SamplingParams(max_new_tokens=10))          # would need 4
        assert len(seq.generate(SamplingParams(max_new_tokens=6, ignore_eos=True))) == 6


# -- continuation: a sequence kept across turns ----------------------------------------------
@pytest.mark.parametrize("page_size", [None, 2])
def test_sequence_continues_across_turns(page_size):
    """Turn 2 of a kept sequence equals a fresh generation over the whole history: prefill
    continues from the states decode left (the reply's last token runs with the next turn)."""
    model = tiny()
    engine = Engine(model, max_batch=2, max_len=40, page_size=page_size, window_block=8)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    a, b = [1, 5, 9, 14], [300, 2]
    with engine.sequence() as seq:
        logits = seq.extend(a)
        assert rel_err(logits, model(torch.tensor([a]))[0]) <= TOL[torch.float32]
        r1 = seq.generate(params)
        assert r1 == model.generate([a], **vars(params))[0]
        seq.extend(b)
        r2 = seq.generate(params)
        assert seq.tokens == a + r1 + b + r2
        assert r2 == model.generate([a + r1 + b], **vars(params))[0]
        with pytest.raises(GenerationError, match="before generating"):
            seq.generate(params)
        # a reply stopped early: the sequence ends at the last token received
        seq.extend([7, 8])
        part = seq.stream(params)
        r3 = [next(part), next(part)]
        seq.extend([9])
        with pytest.raises(GenerationError, match="stale"):
            next(part)
        assert seq.tokens == a + r1 + b + r2 + [7, 8] + r3 + [9]
        r4 = seq.generate(params)
        assert r4 == model.generate([seq.tokens[:-5]], **vars(params))[0]
        with pytest.raises(GenerationError, match="does not fit"):
            seq.extend([7])
            seq.generate(SamplingParams(max_new_tokens=30))
    assert engine.cache.free_slots == 2
