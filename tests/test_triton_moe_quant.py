"""The quantized grouped SwiGLU kernels (lowering/triton/moe_quant.py) through the Triton
interpreter (fp32), against a float64 SwiGLU over weights dequantized here, independently
of the op library; and a model with low-bit experts on the triton backend against the
interpreter. GPU (bf16, and fp8 tensor cores on sm_89+): tests/test_triton_moe_quant.py's
GPU-only test at the end."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kimi_graph  # noqa: E402
from kimi_graph.lowering.triton.moe_quant import quantized_grouped_swiglu  # noqa: E402
from kimi_graph.ops.quant import quantize  # noqa: E402
from reference_kimi import rel_err  # noqa: E402


def dequantized_fp64(codes, scales, zeros, fmt: str, G: int) -> torch.Tensor:
    """The float weight, from the format's definition (ops/quant.py's docstring)."""
    s = scales.double()
    if fmt == "fp8":
        N, K = codes.shape[-2:]
        full = s.repeat_interleave(G, -2)[..., :N, :].repeat_interleave(G, -1)[..., :K]
        return codes.double() * full
    if fmt == "int4":
        c = torch.empty(*codes.shape[:-1], 2 * codes.shape[-1], dtype=torch.float64)
        c[..., 0::2], c[..., 1::2] = (codes & 15).double(), (codes >> 4).double()
    else:
        c = codes.double()
    z = zeros.double() if zeros is not None else torch.full_like(s, 8.0 if fmt == "int4" else 128.0)
    return (c - z.repeat_interleave(G, -1)) * s.repeat_interleave(G, -1)


def swiglu_fp64(rows, offsets, w13, w2):
    I = w2.shape[-1]
    out = torch.zeros(rows.shape, dtype=torch.float64)
    for e in range(w13.shape[0]):
        x = rows[offsets[e]:offsets[e + 1]].double()
        g, u = x @ w13[e, :I].T, x @ w13[e, I:].T
        out[offsets[e]:offsets[e + 1]] = (g * torch.sigmoid(g) * u) @ w2[e].T
    return out


CASES = [("int4", True, 32), ("int4", False, 64), ("int8", True, 16), ("int8", False, 128), ("fp8", True, 32)]


@pytest.mark.parametrize("fmt,symmetric,group", CASES)
def test_kernel_matches_fp64_on_dequantized_weights(triton_interpret, fmt, symmetric, group):
    gen = torch.Generator().manual_seed(1)
    E, I, D = 4, 32, 64
    w13 = torch.randn(E, 2 * I, D, generator=gen) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=gen) / I ** 0.5
    (q13, s13, z13), (q2, s2, z2) = (quantize(w, fmt, group, symmetric) for w in (w13, w2))
    counts = [3, 0, 1, 20]                      # an expert without rows, one past a tile
    offsets = torch.tensor([0] + counts).cumsum(0)
    rows = torch.randn(sum(counts), D, generator=gen)
    zeros = [] if symmetric else [z13, z2]
    got = quantized_grouped_swiglu(rows, offsets, q13, s13, q2, s2, *zeros, fmt=fmt, group_size=group)
    G1, G2 = min(group, D), min(group, I)
    want = swiglu_fp64(rows, offsets, dequantized_fp64(q13, s13, None if symmetric else z13, fmt, G1),
                       dequantized_fp64(q2, s2, None if symmetric else z2, fmt, G2))
    assert rel_err(got, want) <= 1e-5


def test_triton_backend_runs_the_kernel_for_low_bit_experts(triton_interpret):
    from kimi_graph.lowering.triton.backend import KERNELS, covered
    for fmt in ("int4", "int8", "fp8"):
        g = kimi_graph.load("tiny", device="meta", experts=fmt).graph
        ops = [op for op in g.ops() if op.kind == "quantized_grouped_swiglu"]
        assert len(ops) == 3 and all(covered(g, op) for op in ops)
    assert "quantized_grouped_swiglu" in KERNELS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU: bf16 kernels")
@pytest.mark.parametrize("fmt,tokens", [("int4", 4), ("int8", 16), ("fp8", 16), ("fp8", 512)])
def test_gpu_bf16_kernel_against_fp64(fmt, tokens):
    """bf16 on the GPU, published widths: <= 1e-2 weight-only; fp8 prefill tiles on fp8
    tensor cores (sm_89+: activations in e4m3 too) <= 4e-2."""
    gen = torch.Generator().manual_seed(0)
    E, I, D, k = 16, 1024, 2304, 8
    w13 = torch.randn(E, 2 * I, D, generator=gen) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=gen) / I ** 0.5
    (q13, s13, _), (q2, s2, _) = (quantize(w.cuda().bfloat16(), fmt, 128) for w in (w13, w2))
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)]).reshape(-1)
    order = ids.sort(stable=True)[1]
    offsets = torch.zeros(E + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(ids, minlength=E).cumsum(0)
    rows = torch.randn(tokens, D, generator=gen)[order // k]
    got = quantized_grouped_swiglu(rows.cuda().bfloat16(), offsets.cuda(), q13, s13, q2, s2, fmt=fmt)
    if got is None:
        pytest.skip(f"no {fmt} kernel on this GPU (fp8: sm_89+)")
    want = swiglu_fp64(rows, offsets, dequantized_fp64(q13.cpu(), s13.cpu(), None, fmt, 128),
                       dequantized_fp64(q2.cpu(), s2.cpu(), None, fmt, 128))
    assert rel_err(got.cpu(), want) <= (4e-2 if fmt == "fp8" and tokens * k > 256 else 1e-2)
