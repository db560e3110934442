"""onnxruntime-genai (PyPI `onnxruntime-genai`, Microsoft's client, not ours) loads an
export-onnx directory and generates greedily the tokens our engine generates.

What genai cannot express of Kimi Linear (so not tested here):
- a batch of prompts of different lengths: genai left-pads the batch and runs the pads
  through the model; they would enter KDA's recurrent and conv states. Kimi needs each
  prompt prefilled on its own (as our engine does), so only equal-length batches match;
- fp32 KDA state under fp16/bf16 exports: genai gives every state the model's I/O dtype.
The MLA caches map onto genai's key/value caches with one KV head, latent ‖ rope_key split
into two halves of (R+P)/2 (genai gives keys and values one width); the KDA conv states
(q, k, v stacked) and recurrent state onto its past.%d.conv / past.%d.recurrent states of
model.type "qwen3_5_text".
"""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")

import kimi_graph  # noqa: E402
from kimi_graph.lowering.onnx.package import export_model  # noqa: E402


def genai_greedy(path, prompts, new_tokens):
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompts[0]) + new_tokens, do_sample=False,
                              batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(prompts)
    out = [[] for _ in prompts]
    while not gen.is_done():
        gen.generate_next_token()
        for i, t in enumerate(gen.get_next_tokens()):
            out[i].append(int(t))
    return out


@pytest.fixture(scope="module", params=["ort", "portable"])
def exported(request, tmp_path_factory):
    model = kimi_graph.load("tiny")
    out = tmp_path_factory.mktemp(f"genai_{request.param}")
    export_model(model, out, ops=request.param)
    return model, out


def test_genai_greedy_tokens_equal_ours(exported):
    model, out = exported
    for prompt in ([1, 5, 9, 14, 3], [7, 8, 200, 31, 4, 4, 9, 100, 2, 60, 61, 62, 63, 64, 65, 66, 67, 68]):
        assert genai_greedy(out, [prompt], 8) == model.generate([prompt], max_new_tokens=8, ignore_eos=True)


def test_genai_equal_length_batch(exported):
    model, out = exported
    prompts = [[1, 5, 9, 14], [300, 2, 7, 8]]
    assert genai_greedy(out, prompts, 6) == model.generate(prompts, max_new_tokens=6, ignore_eos=True)
