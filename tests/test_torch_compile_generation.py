"""Generation through torch.compile (Inductor on the CPU, the tiny preset), for the declared
graph and the default pipeline: a prompt of 90 tokens then 70 new ones (`load(...,
compile=True).generate(...)` as a user calls it), an Engine with fixed cache windows
(prefill 59 tokens, then decode), and a 200-token generation that recompiles nothing after
warm-up. Each compiles the model's regions (one per distinct attention or FFN, `regions.py`) with the
batch, sequence and cache-window dims dynamic, so the growing cache window and a new prompt
length reuse the compiled code. References: the same model run by the interpreter (tokens
equal, prefill logits within fp32 1e-5 relative).

Cost: one compiled model per pipeline, shared by the module's tests (compile state is kept
between them: no dynamo reset in between)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import kimi_graph
from kimi_graph.runtime import Engine, SamplingParams
from reference_kimi import rel_err


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    from torch._inductor import config as inductor_config
    torch._dynamo.reset()
    with inductor_config.patch(compile_threads=1):     # tiny graphs: no worker pool
        yield
    torch._dynamo.reset()


@pytest.fixture(scope="module", params=[None, "default"], ids=["declared", "default"])
def models(request):
    """(compiled, interpreted): the tiny preset's model twice, same weights."""
    return (kimi_graph.load("tiny", pipeline=request.param, backend="torch", compile=True),
            kimi_graph.load("tiny", pipeline=request.param))


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_generate_after_a_long_prompt(models):
    """The call that failed: the MLA caches' lengths got two symbols the op's fake
    implementation could not prove equal."""
    compiled, interpreted = models
    prompt = [[1, 2, 3] * 30]
    assert compiled.generate(prompt, max_new_tokens=70) == interpreted.generate(prompt, max_new_tokens=70)
    assert compiled.executor.regional


def test_engine_prefill_then_decode_with_fixed_windows(models):
    prompt, params = list(range(3, 62)), SamplingParams(max_new_tokens=12, ignore_eos=True)
    runs = []
    for model in models:
        with Engine(model, max_batch=1, max_len=96, window_block=None).sequence() as seq:
            runs.append((seq.extend(prompt), seq.generate(params)))
    (logits, tokens), (ref_logits, ref_tokens) = runs
    assert logits.shape == ref_logits.shape == (59, 512)
    assert rel_err(logits, ref_logits) <= 1e-5
    assert tokens == ref_tokens


def test_no_recompiles_over_200_tokens(models):
    compiled, _ = models
    warm = [[4, 5, 6, 7, 8]]
    compiled.generate(warm, max_new_tokens=3)       # warm-up: prefill and decode compiled
    before = compiled_graphs()
    out = compiled.generate([list(range(9, 18))], max_new_tokens=200, ignore_eos=True)
    assert len(out[0]) == 200
    assert compiled_graphs() == before, "recompiled during generation"
