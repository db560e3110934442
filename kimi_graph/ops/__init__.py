"""The op library. Importing it registers every op; `REGISTRY` maps kind -> OpDef."""
from . import attention, conv, elementwise, kda, linalg, moe, norm, parallel, quant, tensor  # noqa: F401 (register)
from .registry import (FLOAT_DTYPES, IR_DTYPES, REGISTRY, REQUIRED, TORCH_DTYPES, OpDef, expect,
                       get_op, register)

__all__ = ["REGISTRY", "OpDef", "REQUIRED", "register", "get_op", "expect", "TORCH_DTYPES",
           "IR_DTYPES", "FLOAT_DTYPES"]
