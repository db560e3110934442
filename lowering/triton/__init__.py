"""Triton lowering: generated kernels per fused op, per-GPU targets, AOT compile, a backend.

- `targets`: the target table (sm_80, sm_89, sm_90, the CPU interpreter) and tile configs.
- `codegen`: `KernelSpec` (generated source + signature), the readable cache directory.
- one generator module per op family: `kda`, `conv`, `norm`, `mla`, `moe`, `elementwise`.
- `aot`: compile every kernel a model needs for given targets, with a manifest.
- `backend`: `kimi_graph.load(..., backend="triton")` runs graphs on these kernels.
Triton itself is imported only when a kernel is loaded or compiled.
"""
