"""MLA prefill attention over a long cache in key blocks (mla.prefix_attention): the flash
kernel's state form merges key blocks by log-sum-exp, so attention over blocks equals attention
over all keys at once, and a chunked prefill equals the one-shot prefill at any chunk and key
block size. Kernels run through the Triton interpreter (fp32, rel. error <= 1e-5) against fp64
references written here, apart from the op library; the last test runs bf16 on a GPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kimi_graph.lowering.triton import mla  # noqa: E402
from kimi_graph.lowering.triton.targets import TARGETS  # noqa: E402
from kimi_graph.runtime.views import PagedRows  # noqa: E402
from reference_kimi import rel_err as rel  # noqa: E402

TOL = 1e-5


def attention64(q, k, v, q_start, scale):
    """Causal attention in fp64: query t of sequence b at q_start[b] + t sees keys j <= it."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    pos = q_start.double().view(B, 1) + torch.arange(T).view(1, T)
    seen = torch.arange(S).view(1, 1, S) <= pos[..., None]                      # [B, T, S]
    s = torch.einsum("bthd,bshd->bhts", q.double(), k.double()) * scale
    p = torch.softmax(s.masked_fill(~seen[:, None], float("-inf")), -1)
    return torch.einsum("bhts,bshd->bthd", p, v.double())


def mla64(q, latent, w, kr, q_start, nope, scale):
    """MLA prefill attention in fp64 from the latent rows: per head k ‖ v = latent W_h^T, the
    shared rope key appended to every head's keys."""
    B, T, H, _ = q.shape
    S = latent.shape[1]
    kv = (latent.double() @ w.double().T).view(B, S, H, -1)
    k = torch.cat([kv[..., :nope], kr.double()[:, :, None].expand(B, S, H, kr.shape[2])], -1)
    return attention64(q, k, kv[..., nope:], q_start, scale)


@pytest.fixture
def attention_config(triton_interpret, monkeypatch):
    """set(**over): the interpreter's "attention" config with `over` applied, kernels rebuilt."""
    def set_(**over):
        monkeypatch.setitem(TARGETS["interpret"]["configs"], "attention",
                            {**TARGETS["interpret"]["configs"]["attention"], **over})
        mla.flash_spec.cache_clear()
    yield set_
    mla.flash_spec.cache_clear()


VARIANTS = [{}, {"lazy_rescale": 3.0}, {"fold_scale": True, "BN": 32}, {"split": False, "order": "forward"},
            {"overlap": True, "lazy_rescale": 8.0, "BM": 32}]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "base")
def test_key_blocks_merged_in_any_order_equal_all_keys(variant, attention_config):
    """The state form over ragged key blocks (13, 16, 31 keys: some wholly before every query,
    some past a sequence's last query, some whose first rows no query of a tile sees yet), in
    forward and shuffled order, equals fp64 attention over all keys at once; ragged starts."""
    torch.manual_seed(0)
    attention_config(**variant)
    B, T, H, N, P, DV, S = 3, 21, 2, 24, 8, 12, 60
    q, kv, kr = 3 * torch.randn(B, T, H, N + P), torch.randn(B, S, H, N + DV), torch.randn(B, S, P)
    qs = torch.tensor([39, 0, 17])
    k = torch.cat([kv[..., :N], kr[:, :, None].expand(B, S, H, P)], -1)
    ref = attention64(q, k, kv[..., N:], qs, 0.5)
    bounds = [0, 13, 29, 60]
    for order in ([0, 1, 2], [2, 0, 1]):
        state = (torch.zeros(B, T, H, DV), torch.full((B, T, H), float("-inf")))
        for i in order:
            a, b = bounds[i], bounds[i + 1]
            o = mla.causal_attention(q, kv[:, a:b, :, :N], kv[:, a:b, :, N:], qs, scale=0.5, rope_key=kr[:, a:b],
                                     state=state, key_offset=a)
        assert o is state[0]
        assert rel(o, ref) < TOL
    with pytest.raises(ValueError, match="state must be"):
        mla.causal_attention(q, kv[..., :N], kv[..., N:], qs, scale=0.5, rope_key=kr,
                             state=(torch.zeros(B, T, H, DV, dtype=torch.float64), state[1]))


def paged(x: torch.Tensor, page_size: int) -> PagedRows:
    """x [B, S, C] as a PagedRows view over shuffled pages of a pool (page 0 unused)."""
    B, S, C = x.shape
    per = -(-S // page_size)
    order = torch.randperm(B * per) + 1
    pool = torch.zeros(B * per + 1, page_size, C)
    table = order.view(B, per).to(torch.int32)
    padded = torch.zeros(B, per * page_size, C)
    padded[:, :S] = x
    pool[order] = padded.view(B * per, page_size, C)
    return PagedRows(pool, torch.arange(B), table, S, per * page_size)


@pytest.mark.parametrize("key_block,caches", [(None, "paged"), (64, "dense"), (16, "paged"), (13, "dense")])
def test_prefix_attention_in_key_blocks(key_block, caches, attention_config):
    """mla.prefix_attention decompressing 13 / 16 / 64 rows at a time (and one block: the
    config's key_block) equals the fp64 decompressed attention over the whole cache, read
    dense or through shuffled pages; a chunk of queries continuing ragged prefixes."""
    torch.manual_seed(1)
    attention_config()
    B, T, H, R, N, P, V, S = 2, 19, 2, 20, 24, 8, 12, 57
    q, latent, kr = 2 * torch.randn(B, T, H, N + P), torch.randn(B, S, R), torch.randn(B, S, P)
    w = torch.randn(H * (N + V), R) / R ** 0.5
    qs = torch.tensor([S - T, 11])
    c, k = (latent, kr) if caches == "dense" else (paged(latent, 8), paged(kr, 8))
    out = mla.prefix_attention(q, c, w, k, qs, nope=N, scale=0.4, key_block=key_block)
    assert out.shape == (B, T, H, V) and out.dtype == q.dtype
    assert rel(out, mla64(q, latent, w, kr, qs, N, 0.4)) < TOL
    with pytest.raises(ValueError, match="do not fit"):
        mla.prefix_attention(q, c, w, k, qs, nope=N + 1, scale=0.4)


# one MLA layer and a dense MLP: the interpreter runs the engine's prefill calls in seconds
MLA_ONLY = dict(num_hidden_layers=1, first_k_dense_replace=1, num_attention_heads=2, vocab_size=61,
                linear_attn_config={"kda_layers": [], "full_attn_layers": [1], "num_heads": 1, "head_dim": 4,
                                    "short_conv_kernel_size": 3})


@pytest.fixture(scope="module")
def mla_model(make_checkpoint):
    import kimi_graph
    from checkpoints import random_config
    return kimi_graph.load(make_checkpoint(random_config(3, **MLA_ONLY), seed=3), pipeline="default",
                           backend="triton", device="cpu")


def test_prefill_plans_mla_attention_in_key_blocks(triton_interpret, mla_model):
    """The stateful prefill graphs take each MLA attention with its decompression as one
    PrefixAttention step; the stateless prefill keeps its norm + linear and the SplitKeyAttention."""
    from kimi_graph.lowering.triton import backend
    model = mla_model
    n_mla = model.config.layer_kinds.count("mla")
    for logits in ("all", "last"):
        steps = [s for s in backend.plan(model.get_graph("prefill", True, logits)) if isinstance(s, mla.PrefixAttention)]
        assert n_mla and len(steps) == n_mla
        assert [op.kind for op in steps[0].ops][:4] == ["linear", "reshape", "slice", "slice"]
    assert not any(isinstance(s, mla.PrefixAttention) for s in backend.plan(model.get_graph("prefill", False)))


def test_chunked_prefill_equals_one_shot_in_key_blocks(attention_config, mla_model):
    """Continuation == one-shot: a 30-token prompt prefilled 7 (then 16) tokens a call, MLA
    attending over its paged cache 5 (then 16) rows at a time (blocks that straddle chunks,
    ragged last chunks and blocks), gives the one-shot prefill's logits (one block), and the
    next decode step's."""
    from kimi_graph.runtime.engine import Engine
    attention_config()
    model = mla_model
    prompt = [(7 * i + 3) % model.config.vocab_size for i in range(30)]
    whole = Engine(model, max_len=40, prefill_chunk=None)
    ref = whole.prefill(whole.cache.allocate(1), [prompt])[0]
    nxt = int(ref[-1].argmax())
    ref_step = whole.decode([0], [nxt])
    for chunk, key_block in ((7, 5), (16, 16)):
        attention_config(key_block=key_block)
        eng = Engine(model, max_len=40, prefill_chunk=chunk, page_size=8)
        slot = eng.cache.allocate(1)
        assert rel(eng.prefill(slot, [prompt])[0], ref) < TOL
        assert rel(eng.decode(slot, [nxt]), ref_step) < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prefix_attention_bf16_on_gpu(monkeypatch):
    """bf16 at the published MLA width (32 heads, R 512, nope 128, rope 64, v 128): a 2k-token
    chunk continuing a 10k prefix, decompressed 4k rows at a time (blocks straddling the chunk's
    diagonal), equals the one-block form and an fp32 torch reference within bf16 rounding."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    B, T, H, R, N, P, V, S = 1, 2048, 32, 512, 128, 64, 128, 12288
    q = torch.randn(B, T, H, N + P, device=dev, dtype=bf)
    latent, kr = torch.randn(B, S, R, device=dev, dtype=bf), torch.randn(B, S, P, device=dev, dtype=bf)
    w = (torch.randn(H * (N + V), R, device=dev) / R ** 0.5).to(bf)
    qs = torch.tensor([S - T], device=dev)
    scale = (N + P) ** -0.5
    blocked = mla.prefix_attention(q, latent, w, kr, qs, nope=N, scale=scale, key_block=4096)
    whole = mla.prefix_attention(q, latent, w, kr, qs, nope=N, scale=scale, key_block=S)
    kv = (latent.float() @ w.float().T).view(B, S, H, N + V)
    k = torch.cat([kv[..., :N], kr.float()[:, :, None].expand(B, S, H, P)], -1)
    mask = torch.arange(S, device=dev)[None, :] <= (S - T + torch.arange(T, device=dev))[:, None]
    s = torch.einsum("bthd,bshd->bhts", q.float(), k) * scale
    ref = torch.einsum("bhts,bshd->bthd", torch.softmax(s.masked_fill(~mask, float("-inf")), -1), kv[..., N:])
    assert blocked.dtype == bf
    assert rel(blocked, ref) < 2e-2 and rel(whole, ref) < 2e-2
    assert rel(blocked, whole) < 1e-2
