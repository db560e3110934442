"""Lowering to generated Triton kernels with per-GPU variants."""
