"""Elementwise fusion: any chain (a DAG) of elementwise ops becomes one generated kernel.

A `Chain` lists external inputs (broadcast to the output shape through strides, 0 where
broadcast), steps `(value, kind, operands, attrs)` and outputs (any step's value, each
stored in its own dtype). Arithmetic runs in fp32 (fp64 if any input is fp64); `cast`
steps round through their dtype so narrowing casts keep their meaning.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .codegen import TL_DTYPES, KernelSpec, launch, render
from .targets import config, current_target

KINDS = ("add", "sub", "mul", "div", "neg", "exp", "sigmoid", "silu", "softplus", "scale", "cast")
_TORCH_TO_IR = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}
_IR_TO_TORCH = {v: k for k, v in _TORCH_TO_IR.items()}


def ir_dtype(t: torch.Tensor) -> str:
    try:
        return _TORCH_TO_IR[t.dtype]
    except KeyError:
        raise TypeError(f"triton kernels take f32/bf16/f16/f64 tensors, got {t.dtype}") from None


def ptr_type(dtype: str) -> str:
    return {"f32": "*fp32", "bf16": "*bf16", "f16": "*fp16", "f64": "*fp64"}[dtype]


@dataclass(frozen=True)
class Chain:
    inputs: tuple[tuple[str, str], ...]                  # (value, dtype)
    steps: tuple[tuple[str, str, tuple[str, ...], tuple], ...]  # (value, kind, operands, attrs items)
    outputs: tuple[tuple[str, str], ...]                 # (value, dtype)
    rank: int


def _expr(kind: str, a: list[str], attrs: dict, ct: str) -> str:
    if kind in ("add", "sub", "mul", "div"):
        return f"{a[0]} {dict(add='+', sub='-', mul='*', div='/')[kind]} {a[1]}"
    x = a[0]
    return {
        "neg": f"-{x}",
        "exp": f"tl.exp({x})",
        "sigmoid": f"1.0 / (1.0 + tl.exp(-{x}))",
        "silu": f"{x} / (1.0 + tl.exp(-{x}))",
        "softplus": f"tl.where({x} > 20.0, {x}, tl.log(1.0 + tl.exp(tl.minimum({x}, 20.0))))",
        "scale": f"{x} * {float(attrs.get('factor', 1.0))!r}",
        "cast": f"{x}.to({TL_DTYPES[attrs['dtype']]}).to({ct})" if attrs.get("dtype") in TL_DTYPES else x,
    }[kind]


_TEMPLATE = """
@triton.jit
def elementwise_fused($args):
    # $doc
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    $body
"""


@functools.lru_cache(maxsize=None)
def chain_spec(chain: Chain, target: str) -> KernelSpec:
    cfg = config("elementwise", target)
    ct = "tl.float64" if any(d == "f64" for _, d in chain.inputs) else "tl.float32"
    names = {v: f"x{i}" for i, (v, _) in enumerate(chain.inputs)}
    R = chain.rank
    args = [f"in{i}" for i in range(len(chain.inputs))] + [f"out{i}" for i in range(len(chain.outputs))]
    args += ["n"] + [f"size{d}" for d in range(1, R)]
    args += [f"st{i}_{d}" for i in range(len(chain.inputs)) for d in range(R)]
    body = ["rem = offs"]
    for d in range(R - 1, 0, -1):
        body += [f"i{d} = rem % size{d}", f"rem = rem // size{d}"]
    body.append("i0 = rem")
    for i, (v, _) in enumerate(chain.inputs):
        off = " + ".join(f"i{d} * st{i}_{d}" for d in range(R)) if R else "0"
        body.append(f"x{i} = tl.load(in{i} + {off}, mask=m, other=0.0).to({ct})")
    for j, (v, kind, ops, attrs) in enumerate(chain.steps):
        names[v] = f"t{j}"
        body.append(f"t{j} = {_expr(kind, [names[o] for o in ops], dict(attrs), ct)}")
    for i, (v, dt) in enumerate(chain.outputs):
        body.append(f"tl.store(out{i} + offs, {names[v]}.to({TL_DTYPES[dt]}), mask=m)")
    doc = " -> ".join(k for _, k, _, _ in chain.steps)
    src = render("elementwise_fused", _TEMPLATE, {"BLOCK": cfg["BLOCK"]}, args=", ".join(args),
                 doc=doc, body="\n".join(body))
    sig = {f"in{i}": ptr_type(d) for i, (_, d) in enumerate(chain.inputs)}
    sig.update({f"out{i}": ptr_type(d) for i, (_, d) in enumerate(chain.outputs)})
    sig.update({a: "i32" for a in args if a not in sig})
    return KernelSpec("elementwise_fused", "elementwise_fused", src, sig, cfg["num_warps"], 1,
                      {"BLOCK": cfg["BLOCK"]})


def run_chain(chain: Chain, tensors: list[torch.Tensor], shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Run a fused chain on its input tensors (broadcastable to `shape`) -> its outputs."""
    if len(tensors) != len(chain.inputs):
        raise ValueError(f"chain takes {len(chain.inputs)} inputs, got {len(tensors)}")
    shape = tuple(shape)
    views = []
    for t in tensors:
        try:
            views.append(t.expand(shape) if t.dim() <= len(shape) else None)
        except RuntimeError:
            views.append(None)
        if views[-1] is None:
            raise ValueError(f"input of shape {tuple(t.shape)} does not broadcast to {shape}")
    dev = tensors[0].device
    outs = [torch.empty(shape, device=dev, dtype=_IR_TO_TORCH[d]) for _, d in chain.outputs]
    n = 1
    for s in shape:
        n *= s
    if n == 0:
        return outs
    spec = chain_spec(chain, current_target())
    R = len(shape)
    strides = [st for v in views for st in (v.stride() if R else ())]
    launch(spec, (-(-n // spec.config["BLOCK"]),), *views, *outs, n, *shape[1:], *strides)
    return outs


def op_elementwise(kind: str):
    """A single elementwise op as a one-step chain (kind -> fn(args, attrs))."""
    def run(args, attrs):
        ins = [a for a in args]
        if kind in ("add", "sub", "mul", "div") and ins[0].dtype != ins[1].dtype:
            raise TypeError(f"{kind}: dtype mismatch {ins[0].dtype} vs {ins[1].dtype}")
        shape = torch.broadcast_shapes(*(t.shape for t in ins))
        out_dt = attrs["dtype"] if kind == "cast" else ir_dtype(ins[0])
        chain = Chain(tuple((f"%a{i}", ir_dtype(t)) for i, t in enumerate(ins)),
                      (("%r", kind, tuple(f"%a{i}" for i in range(len(ins))),
                        tuple(sorted(attrs.items()))),), (("%r", out_dt),), len(shape))
        return run_chain(chain, ins, shape)
    return run
