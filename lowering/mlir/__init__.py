"""MLIR through torch-mlir (optional extra)."""
