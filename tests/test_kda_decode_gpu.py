"""GPU only (skipped without CUDA): KDA's one-launch decode step (lowering/triton/kda_decode.py)
against the plain kernels (conv group, f_b / g_b pair, kda_recurrent_step) at the published
width in bf16 (32 heads, K = V = 128, f_a / g_a 128 wide), through the engine with CUDA graphs
(a batch of 3 padded to 4 with a slot -1 row; the state's V columns in one program a head and
split over four), step by step: logits and every state within
2e-2 (bf16: f and the output gate are the same fp32 sums in another order, rounded once). The
slice has dense MLPs only, so no routing choice can flip between the two forms.

    python -m pytest tests/test_kda_decode_gpu.py -q
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
from kimi_graph.lowering.triton import kda_decode  # noqa: E402
from kimi_graph.lowering.triton.targets import TARGETS, current_target  # noqa: E402
from kimi_graph.presets import PRESETS  # noqa: E402
from kimi_graph.runtime import Engine  # noqa: E402
from reference_kimi import rel_err  # noqa: E402


@pytest.fixture(autouse=True)
def _gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _script(engine: Engine) -> list[torch.Tensor]:
    a, b, c = engine.cache.allocate(3)
    out = list(engine.prefill([a, b, c], [[1, 5, 9, 14, 3], [7], [30, 2, 41]]))
    for t in range(4):
        out.append(engine.decode([a, b, c], [4 + t, 8, 15]).float())
    return out + [t.float().flatten() for t in engine.cache.storage.values()]


def test_one_launch_step_equals_the_plain_kernels_in_bf16(monkeypatch):
    cfg = json.loads(json.dumps(PRESETS["kimi-linear-48b-a3b"]))
    cfg.update(num_hidden_layers=3, first_k_dense_replace=3)
    cfg["linear_attn_config"].update(kda_layers=[1, 2], full_attn_layers=[3])
    model = kimi_graph.load(KimiLinearConfig.from_dict(cfg), dtype=torch.bfloat16, device="cuda",
                            pipeline="default", backend="triton")
    names = []
    monkeypatch.setattr(kda_decode, "launch",
                        lambda spec, *a, _l=kda_decode.launch: names.append(spec.name) or _l(spec, *a))
    runs = {}
    cfg = TARGETS[current_target()]["configs"]["kda_recurrent"]
    for fused, split in ((256, 1), (256, 4), (0, 1)):      # split: each head's V columns over 4 programs
        for key, value in (("fused_decode", fused), ("decode_split", split), ("decode_split_rows", 4)):
            monkeypatch.setitem(cfg, key, value)
        runs[fused, split] = _script(Engine(model, max_batch=4, max_len=64, cuda_graphs=True))
    assert "kda_decode_step" in names and not kda_decode._UNBUILT
    for i, (got, split, want) in enumerate(zip(runs[256, 1], runs[256, 4], runs[0, 1])):
        assert got.shape == want.shape and rel_err(got, want) <= 2e-2 and rel_err(split, want) <= 2e-2, i
