"""Shared fixtures: random tiny HF checkpoints on disk (see tests/checkpoints.py)."""
from __future__ import annotations

import pytest
import torch

from checkpoints import random_config, write_checkpoint


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads and lose a lot on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def triton_interpret(monkeypatch, tmp_path_factory):
    """Run Triton kernels through its CPU interpreter, with a per-session kernel cache."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("KIMI_GRAPH_TRITON_CACHE", str(tmp_path_factory.getbasetemp() / "triton-cache"))


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(cfg=None, seed=0, shard_bytes=None) -> directory of a written checkpoint
    (a random config from `seed` when cfg is None)."""
    made = {}

    def make(cfg: dict | None = None, seed: int = 0, shard_bytes: int | None = None):
        cfg = cfg if cfg is not None else random_config(seed)
        key = (repr(cfg), seed, shard_bytes)
        if key not in made:
            path = tmp_path_factory.mktemp("ckpt")
            write_checkpoint(path, cfg, seed, shard_bytes=shard_bytes)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint):
    """One small checkpoint with KDA, MLA, a dense layer and grouped MoE layers."""
    cfg = random_config(0, num_hidden_layers=3, first_k_dense_replace=1, num_experts=8,
                        num_experts_per_token=2, num_expert_group=2, topk_group=1,
                        num_shared_experts=1, tie_word_embeddings=False,
                        linear_attn_config={"kda_layers": [1, 3], "full_attn_layers": [2],
                                            "num_heads": 2, "head_dim": 4,
                                            "short_conv_kernel_size": 4})
    return make_checkpoint(cfg, seed=1)
