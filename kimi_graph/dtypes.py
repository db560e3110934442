"""The IR's dtypes, their torch counterparts and sizes, and the accumulation rule, once.

Accumulation: router scores, decay gates, norm statistics, softmax and the KDA state are
computed in fp32, or in fp64 when the values are fp64 (`acc_dtype`, `acc_torch`).
"""
from __future__ import annotations

import torch

# u8 and f8e4m3 (float8 e4m3fn) hold quantized weights only (packed codes; see ops/quant.py)
DTYPES = ("f64", "f32", "f16", "bf16", "i64", "i32", "bool", "u8", "f8e4m3")
FLOAT_DTYPES = ("f64", "f32", "f16", "bf16")
DTYPE_BYTES = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "bool": 1, "u8": 1,
               "f8e4m3": 1}
TORCH_DTYPES = {"f64": torch.float64, "f32": torch.float32, "f16": torch.float16,
                "bf16": torch.bfloat16, "i64": torch.int64, "i32": torch.int32, "bool": torch.bool,
                "u8": torch.uint8, "f8e4m3": torch.float8_e4m3fn}
IR_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def acc_dtype(dtype: str) -> str:
    """The accumulation dtype for values of IR dtype `dtype`: f64 for f64, else f32."""
    return "f64" if dtype == "f64" else "f32"


def acc_torch(dtype: torch.dtype) -> torch.dtype:
    """`acc_dtype` for torch dtypes."""
    return TORCH_DTYPES[acc_dtype(IR_DTYPES.get(dtype, ""))]
