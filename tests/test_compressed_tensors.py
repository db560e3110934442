"""Pre-quantized checkpoints in compressed-tensors' "pack-quantized" layout (W4A16, group 128
or channel; W8A16), written here by the test's own packer from the format's description
(int32 words, codes q + 2^(bits-1), least significant first; w = q * scale): the routed
experts load as packed parameters without a float copy, other packed linears are
dequantized as read, and the model equals the float model run on the dequantized weights."""
from __future__ import annotations

import json

import pytest
import torch

import kimi_graph
from checkpoints import random_config, write_checkpoint
from kimi_graph.compressed import QuantizationError
from kimi_graph.weights import save_safetensors
from reference_kimi import rel_err

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def pack(w: torch.Tensor, bits: int, group: int | None):
    """-> (weight_packed int32, weight_scale, dequantized w) for symmetric codes."""
    N, K = w.shape
    G = group or K
    blocks = w.double().reshape(N, K // G, G)
    half = 2 ** (bits - 1)
    scale = (blocks.abs().amax(-1) / (half - 0.5)).clamp(min=1e-12).float()
    q = torch.round(blocks / scale.double().unsqueeze(-1)).clamp(-half, half - 1)
    deq = (q * scale.double().unsqueeze(-1)).reshape(N, K).float()
    u = (q.reshape(N, K) + half).long()
    per = 32 // bits
    words = torch.zeros(N, K // per, dtype=torch.long)
    for i in range(per):
        words |= u[:, i::per] << (bits * i)
    packed = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return packed, scale, deq


def quantization_config(bits: int, group: int | None, **weights) -> dict:
    w = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group" if group else "channel",
         "group_size": group, "dynamic": False, "actorder": None, **weights}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head", "re:.*gate$"]}


def write_packed(tmp_path, bits: int, group: int | None, **weights):
    """A tiny checkpoint whose experts, shared experts and MLA q_proj are packed; and the same
    model with those weights dequantized, as a float checkpoint."""
    cfg = random_config(3, hidden_size=64, moe_intermediate_size=64, first_k_dense_replace=1)
    float_w = write_checkpoint(tmp_path / "float", cfg, seed=3)
    packed_w, deq_w = {}, dict(float_w)
    for name, t in float_w.items():
        if t.dim() == 2 and (".experts." in name or name.endswith("q_proj.weight")):
            p, s, d = pack(t, bits, group)
            base = name[:-len(".weight")]
            packed_w.update({base + ".weight_packed": p, base + ".weight_scale": s,
                             base + ".weight_shape": torch.tensor(t.shape, dtype=torch.int32)})
            deq_w[name] = d
        else:
            packed_w[name] = t
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "config.json").write_text(
        json.dumps({**cfg, "quantization_config": quantization_config(bits, group, **weights)}))
    save_safetensors(packed_w, tmp_path / "packed")
    write_checkpoint(tmp_path / "deq", cfg, weights=deq_w)
    return tmp_path / "packed", tmp_path / "deq"


@pytest.mark.parametrize("bits,group", [(4, 32), (4, None), (8, 32)])
def test_packed_checkpoint_equals_float_model_on_dequantized_weights(tmp_path, bits, group):
    packed, deq = write_packed(tmp_path, bits, group)
    m = kimi_graph.load(packed)                                 # experts: the checkpoint's format
    assert m.experts == f"int{bits}"
    codes = [n for n in m.weights if n.endswith("experts.w13.codes")]
    assert codes and set(m.source.direct) >= set(codes)       # read as they are, not requantized
    want = kimi_graph.load(deq, pipeline="default")(IDS)
    assert rel_err(m(IDS), want) <= 1e-5
    # dequantized on read into the declared graph
    assert rel_err(kimi_graph.load(packed, experts="bf16")(IDS), kimi_graph.load(deq)(IDS)) <= 1e-5


def test_packed_codes_are_the_checkpoint_bytes(tmp_path):
    packed, _ = write_packed(tmp_path, 4, 32)
    m = kimi_graph.load(packed)
    from safetensors.torch import load_file
    raw = load_file(str(packed / "model.safetensors"))
    layer = next(n for n in m.weights if n.endswith("experts.w13.codes")).rsplit("experts.", 1)[0]
    w1 = raw[layer + "experts.0.w1.weight_packed"]
    got = m.weights[layer + "experts.w13.codes"][0, :w1.shape[0]]
    assert torch.equal(got, w1.view(torch.uint8))


@pytest.mark.parametrize("change,message", [
    ({"num_bits": 3}, "3-bit weights"), ({"symmetric": False}, "asymmetric"),
    ({"actorder": "group"}, "act-order"), ({"type": "float"}, "type 'float'")])
def test_unsupported_schemes_are_refused(tmp_path, change, message):
    packed, _ = write_packed(tmp_path, 4, 32)
    cfg = json.loads((packed / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(change)
    (packed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=message):
        kimi_graph.load(packed)


def test_other_methods_and_activation_quantization_are_refused(tmp_path):
    packed, _ = write_packed(tmp_path, 4, 32)
    cfg = json.loads((packed / "config.json").read_text())
    q = cfg["quantization_config"]
    q["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    (packed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match="quantized activations"):
        kimi_graph.load(packed)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (packed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match="quant_method 'awq'"):
        kimi_graph.load(packed)
