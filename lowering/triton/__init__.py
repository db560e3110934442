"""Triton lowering: generated kernels per fused op, per-GPU targets, AOT builds, a backend.

- `targets`: the target table (sm_80, sm_89, sm_90, the CPU interpreter), tile configs per
  kernel family, per-device tuning files (`write_tuning`, `$KIMI_GRAPH_TRITON_TUNING`).
- `codegen`: `KernelSpec` (generated source + AOT signature); sources are written, readable,
  to `$KIMI_GRAPH_TRITON_CACHE` (default ~/.cache/kimi_graph/triton) and imported from there.
- one generator module per op family: `kda` (chunk prefill, recurrent step), `conv`, `norm`,
  `mla` (latent split-context decode, causal flash attention), `moe_route` (router logits split
  over the GPU, then grouped top-k), `moe_permute` (parallel stable counting sort, un-permute),
  `moe` (grouped SwiGLU; the MoE ops' entry points), `elementwise` (any chain of elementwise
  ops as one kernel), `gemv` (decode-sized projections, an RMSNorm prologue).
- `aot`: every kernel a model needs, compiled per target without a GPU, plus a manifest;
  at run time `$KIMI_GRAPH_TRITON_ARTIFACTS=DIR` makes launches use DIR's binaries for this GPU
  (same source hash and Triton version), else Triton JIT-compiles and caches on first use.
- `backend`: `kimi_graph.load(..., backend="triton")`; `register_custom_ops()` makes the torch
  lowering's `torch.ops.kimi_graph.*` run these kernels.

    model = kimi_graph.load("tiny", device="cuda", pipeline="default", backend="triton")
    kimi-graph compile tiny --target sm_80,sm_90 --out build/ [--tuning tuning-h100.json]
    TRITON_INTERPRET=1 python ...     # the same kernels on CPU, fp32 (tests)

Triton itself is imported only when a kernel is loaded or compiled.
"""
