"""Lowering to torch: FX GraphModule with custom ops, torch.compile backend."""
