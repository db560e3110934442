"""ONNX lowering: optimized prefill / decode graphs -> ONNX models in two operator sets,
`ort` (ONNX Runtime's fused contrib ops) and `portable` (our domain, with function bodies
in standard ops). onnx is imported only when this package is used."""
from .export import DEFAULT_OPSET, OP_SETS, lower, state_output_name

__all__ = ["lower", "OP_SETS", "DEFAULT_OPSET", "state_output_name"]
