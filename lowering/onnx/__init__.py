"""Lowering to ONNX (ONNX Runtime contrib ops or portable function bodies)."""
