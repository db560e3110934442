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


def patch_device_calls_once():
    """Make the Triton interpreter patch triton.language once per launch, not once more at every
    device-function call (a @triton.jit helper called from a kernel): each of those re-patches
    the same modules (inspect.getmembers over them), a third of an interpreted launch's time in
    kernels built from helpers. A launch patches and restores as before; a helper whose module
    sees a language module the launch has not patched still patches it. Kernels compute the same;
    where Triton's interpreter lacks these internals nothing changes."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter
    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None or getattr(patch, "once_per_launch", False) or not hasattr(interpreter, "_LangPatchScope"):
        return
    patched: list[set] = []         # while a launch runs: the language modules patched

    def patch_lang(fn):
        mods = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if patched:                                 # a device-function call inside a launch
            if not mods <= patched[0]:
                patch(fn)
                patched[0] |= mods
            return interpreter._LangPatchScope()
        scope = patch(fn)
        restore = scope.restore
        patched.append(mods)

        def undo():
            patched.clear()
            restore()
        scope.restore = undo
        return scope

    patch_lang.once_per_launch = True
    interpreter._patch_lang = patch_lang


def skip_unasserted_overflow_checks():
    """The interpreter's integer add / sub / mul each build an int64 overflow check (casts, the op
    again, two compares) that device_assert then drops: the interpreter's options never enable
    debug, the only setting under which it asserts. Skip building it when it would be dropped
    (up to a third of an interpreted launch in integer-heavy kernels); results are unchanged."""
    from triton.runtime import interpreter
    sem = getattr(interpreter, "interpreter_semantic", None)
    check = getattr(sem, "binary_op_sanitize_overflow_impl", None)
    if check is None or getattr(check, "skips_unasserted", False):
        return

    def sanitize(lhs, rhs, binary_op):
        if sem.builder.options.debug:
            check(lhs, rhs, binary_op)
    sanitize.skips_unasserted = True
    sem.binary_op_sanitize_overflow_impl = sanitize


def cache_numpy_dtypes():
    """The interpreter maps a Triton dtype to numpy's through a table it builds again at every
    call (a few per interpreted op); look each dtype up once."""
    from triton.runtime import interpreter
    import triton.language as tl
    get = getattr(interpreter, "_get_np_dtype", None)
    if get is None or getattr(get, "cached", False):
        return
    pointer, memo = get(tl.pointer_type(tl.int8)), {}

    def np_dtype(tt):
        if isinstance(tt, tl.block_type):
            tt = tt.element_ty
        if isinstance(tt, tl.pointer_type):
            return pointer
        if tt not in memo:
            memo[tt] = get(tt)
        return memo[tt]
    np_dtype.cached = True
    interpreter._get_np_dtype = np_dtype


@pytest.fixture
def triton_interpret(monkeypatch, tmp_path_factory):
    """Run Triton kernels through its CPU interpreter, with a per-session kernel cache."""
    patch_device_calls_once()
    skip_unasserted_overflow_checks()
    cache_numpy_dtypes()
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


@pytest.fixture(scope="session")
def kda_mla_checkpoint(make_checkpoint):
    """Two layers (KDA with a dense MLP, then MLA with MoE), small enough for the interpreter."""
    cfg = random_config(0, num_hidden_layers=2, first_k_dense_replace=1, num_experts=4,
                        num_experts_per_token=2, num_expert_group=1, topk_group=1, vocab_size=61,
                        num_shared_experts=1, tie_word_embeddings=False,
                        linear_attn_config={"kda_layers": [1], "full_attn_layers": [2],
                                            "num_heads": 2, "head_dim": 8, "short_conv_kernel_size": 4})
    return make_checkpoint(cfg, seed=2)
