"""onnxruntime-genai (PyPI `onnxruntime-genai`, Microsoft's client, not ours) loads an
export-onnx directory and generates greedily the tokens our engine generates.

genai batches prompts of different lengths right-padded (attention_mask 0 on the pads, new
tokens appended at one cache row for the whole batch); the export makes pads inert (see
kimi_graph/lowering/onnx/genai.py), so batches of different lengths give our tokens too.
The MLA caches map onto genai's key/value caches with one KV head, latent ‖ rope_key split
into two halves of (R+P)/2 (genai gives keys and values one width); the KDA conv states
(q, k, v stacked) and recurrent state onto its past.%d.conv / past.%d.recurrent states of
model.type "qwen3_5_text". Not expressible: a prompt that really ends in pad_token_id
(genai reads trailing pad ids as padding).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")

import kimi_graph  # noqa: E402
from kimi_graph.lowering.onnx.package import export_model  # noqa: E402


def genai_greedy(path, prompts, new_tokens, pad=0):
    """genai's greedy tokens; prompts of different lengths right-padded with `pad`, as
    genai's own batching lays them out."""
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    L = max(map(len, prompts))
    params.set_search_options(max_length=L + new_tokens, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([p + [pad] * (L - len(p)) for p in prompts], np.int32))
    out = [[] for _ in prompts]
    while not gen.is_done():
        gen.generate_next_token()
        for i, t in enumerate(gen.get_next_tokens()):
            out[i].append(int(t))
    return out


@pytest.fixture(scope="module", params=["ort", "portable", "standard"])
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


def test_genai_batch_of_different_lengths(exported):
    model, out = exported
    prompts = [[1, 5, 9, 14, 3], [7, 8], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]]
    got = genai_greedy(out, prompts, 6, pad=model.config.pad_token_id)
    assert got == model.generate(prompts, max_new_tokens=6, ignore_eos=True)


def test_genai_fp16_export(tmp_path):
    """fp16 weights and activations, KDA state still fp32 at genai's boundary."""
    model = kimi_graph.load("tiny", dtype=torch.float16)
    export_model(model, tmp_path, ops="ort")
    ours = kimi_graph.load(tmp_path, backend="onnxruntime", dtype=torch.float16)
    ref = ours.generate([[1, 5, 9, 14, 3]], max_new_tokens=6, ignore_eos=True)
    assert genai_greedy(tmp_path, [[1, 5, 9, 14, 3]], 6) == ref


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_in_the_genai_model_directly(exported, side):
    """The genai model under plain ONNX Runtime: a padded prefill (either side) and two
    decode steps give each prompt's own logits."""
    import onnxruntime as ort
    model, out = exported
    sess = ort.InferenceSession(str(out / "genai.onnx"), providers=["CPUExecutionProvider"])
    prompts = [[1, 5, 9, 14, 3], [7, 8], [2, 4, 6, 8, 10, 12, 14, 16]]
    L = max(map(len, prompts))
    pad = lambda p, fill: [fill] * (L - len(p)) + p if side == "left" else p + [fill] * (L - len(p))  # noqa: E731
    feeds = {"input_ids": np.array([pad(p, 0) for p in prompts]),
             "attention_mask": np.array([pad([1] * len(p), 0) for p in prompts])}
    for i in sess.get_inputs():
        if i.name not in feeds:
            feeds[i.name] = np.zeros([3 if d == "batch_size" else 0 if d == "past_sequence_length" else d
                                      for d in i.shape], np.float32)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    last = [L - 1 if side == "left" else len(p) - 1 for p in prompts]
    seqs = [list(p) for p in prompts]
    for step in range(3):
        for b, p in enumerate(seqs):
            ref = model(torch.tensor([p]))[0, -1]
            got = torch.from_numpy(outs["logits"][b, last[b]])
            assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4, (side, step, b)
        if step == 2:
            break
        nxt = [int(outs["logits"][b, last[b]].argmax()) for b in range(3)]
        for b, t in enumerate(nxt):
            seqs[b].append(t)
        feeds = {"input_ids": np.array([[t] for t in nxt]),
                 "attention_mask": np.concatenate([feeds["attention_mask"], np.ones((3, 1), np.int64)], 1)}
        for n in names[1:]:
            feeds[n.replace("present.", "past_key_values.") if n.endswith((".key", ".value"))
                  else n.replace("present.", "past.")] = outs[n]
        outs = dict(zip(names, sess.run(None, feeds)))
        last = [0, 0, 0]
