"""Property: a continuation equals one-shot prefill, on every backend (interpreter, torch,
ONNX Runtime, Triton under TRITON_INTERPRET=1).

Hypothesis draws two prompts, cuts each at random split points into prefill chunks and
single-token decode steps (a sequence may even start with a decode step), and interleaves the
two sequences in one engine, decode steps of both sometimes batched together. Each
sequence's logits equal its one-shot prefill on the same backend (fp32 rel. error <= 1e-5;
ONNX Runtime <= 1e-4) and so do its greedy tokens. The model has a KDA and an MLA layer, a conv
kernel longer than some chunks, and grouped MoE with groups of 3 experts; the default pass
pipeline fuses KDA and the MoE dispatch. Examples are few and derandomized: CI runs the same
cases every time."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kimi_graph  # noqa: E402
from checkpoints import random_config  # noqa: E402
from kimi_graph.runtime import Engine  # noqa: E402
from reference_kimi import rel_err  # noqa: E402

MAX_T = 9
# backend -> (load options, tolerance, examples); Triton's interpreter is slow (seconds a step)
BACKENDS = {
    "interpreter": ({}, 1e-5, 20),
    "torch": ({}, 1e-5, 10),
    "onnxruntime": ({"threads": 1}, 1e-4, 15),
    "triton": ({}, 1e-5, 2),
}
CONFIG = random_config(
    5, num_hidden_layers=2, first_k_dense_replace=1, num_experts=6, num_expert_group=2,
    topk_group=1, num_experts_per_token=2, num_shared_experts=1, vocab_size=61,
    linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "num_heads": 1,
                        "head_dim": 4, "short_conv_kernel_size": 3})


@st.composite
def schedules(draw):
    """(prompts, steps, window_block): steps are (sequence, "prefill" | "decode", tokens)."""
    prompts, segments = [], []
    for _ in range(2):
        T = draw(st.integers(1, MAX_T))
        prompts.append(draw(st.lists(st.integers(0, CONFIG["vocab_size"] - 1), min_size=T, max_size=T)))
        cuts = sorted(draw(st.sets(st.integers(1, T - 1))) if T > 1 else [])
        bounds = [0, *cuts, T]
        segments.append([("decode" if b - a == 1 and draw(st.booleans()) else "prefill",
                          prompts[-1][a:b]) for a, b in zip(bounds, bounds[1:])])
    order = draw(st.permutations([0] * len(segments[0]) + [1] * len(segments[1])))
    pending = [iter(s) for s in segments]
    steps = [(i, *next(pending[i])) for i in order]
    return prompts, steps, draw(st.sampled_from([None, 4]))


def run_schedule(engine: Engine, prompts, steps, batch_decodes: bool) -> list[torch.Tensor]:
    """Logits [T_i, V] per prompt, from the steps run in order (adjacent decode steps of the
    two sequences in one batch when `batch_decodes`)."""
    slots = engine.cache.allocate(2)
    out: list[list[torch.Tensor]] = [[], []]
    try:
        k = 0
        while k < len(steps):
            i, kind, toks = steps[k]
            nxt = steps[k + 1] if k + 1 < len(steps) else None
            if kind == "decode" and batch_decodes and nxt and nxt[1] == "decode" and nxt[0] != i:
                both = engine.decode([slots[i], slots[nxt[0]]], [toks[0], nxt[2][0]])
                out[i].append(both[:1])
                out[nxt[0]].append(both[1:])
                k += 2
                continue
            if kind == "decode":
                out[i].append(engine.decode([slots[i]], toks))
            else:
                out[i].append(engine.prefill([slots[i]], [toks])[0])
            k += 1
    finally:
        for s in slots:
            engine.cache.free(s)
    return [torch.cat(o) for o in out]


@pytest.fixture(scope="module")
def model_for(make_checkpoint):
    path, models = make_checkpoint(CONFIG, seed=5), {}

    def get(backend):
        if backend not in models:
            models[backend] = kimi_graph.load(path, backend=backend, pipeline="default",
                                              **BACKENDS[backend][0])
        return models[backend]
    return get


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_continuation_equals_one_shot_prefill(backend, model_for, request):
    if backend == "triton":
        pytest.importorskip("triton")
        request.getfixturevalue("triton_interpret")
    elif backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = model_for(backend)
    _, tol, examples = BACKENDS[backend]

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None)
    @given(schedule=schedules(), batch_decodes=st.booleans())
    def check(schedule, batch_decodes):
        prompts, steps, window_block = schedule
        engine = Engine(model, max_batch=2, max_len=2 * MAX_T, window_block=window_block)
        for got, prompt in zip(run_schedule(engine, prompts, steps, batch_decodes), prompts):
            want = model(torch.tensor([prompt]))[0]
            assert got.shape == want.shape
            assert rel_err(got, want) <= tol, steps
            assert torch.equal(got.argmax(-1), want.argmax(-1)), steps     # greedy tokens

    check()
