"""Reference interpreter: runs a Graph op by op with each op's torch reference implementation."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .ir import Graph, IRError, Op, eval_dim
from .ops import TORCH_DTYPES, get_op


def bind_dims(g: Graph, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Bind symbolic dims from the actual input shapes; check ranks, dtypes and static dims."""
    dims: dict[str, int] = {}
    for name, ty in g.inputs.items():
        if name not in inputs:
            raise IRError(f"missing graph input {name} ({ty})")
        t = inputs[name]
        if t.dim() != ty.rank:
            raise IRError(f"input {name}: expected rank {ty.rank} ({ty}), got shape {tuple(t.shape)}")
        if t.dtype != TORCH_DTYPES[ty.dtype]:
            raise IRError(f"input {name}: expected dtype {ty.dtype}, got {t.dtype}")
        for d, n in zip(ty.shape, t.shape):
            if isinstance(d, int):
                if d != n:
                    raise IRError(f"input {name}: expected {ty}, got shape {tuple(t.shape)}")
            elif d in dims and dims[d] != n:
                raise IRError(f"input {name}: dim {d} is {n} here but {dims[d]} elsewhere")
            else:
                dims[d] = n
    extra = set(inputs) - set(g.inputs)
    if extra:
        raise IRError(f"unknown graph inputs {sorted(extra)}; the graph takes {list(g.inputs)}")
    return dims


def initial_env(g: Graph, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The value environment before the first op (inputs and parameters) and the bound dims."""
    inputs = {(k if k.startswith("%") else "%" + k): v for k, v in inputs.items()}
    dims = bind_dims(g, inputs)
    env: dict[str, torch.Tensor] = dict(inputs)
    for name in g.params:
        try:
            env[name] = params[name[1:]]
        except KeyError:
            raise IRError(f"no weight for parameter {name}") from None
    return env, dims


def op_attrs(op: Op, dims: dict[str, int]) -> dict:
    """The op's attributes with defaults filled in and shape attributes made concrete."""
    opdef = get_op(op.kind)
    attrs = opdef.full_attrs(op.attrs)
    for a in opdef.shape_attrs:
        attrs[a] = [eval_dim(d, dims) for d in attrs[a]]
    return attrs


def run_graph(g: Graph, inputs: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
              impls: Mapping[str, Callable] | None = None) -> list[torch.Tensor]:
    """Execute `g`; `inputs` keyed by input name ("%input_ids" or "input_ids"), `params` by
    parameter name without "@". `impls` overrides op kinds: kind -> fn(args, attrs) -> list
    of results (a backend's kernels); other ops run their torch reference.
    Returns the graph outputs in order."""
    impls = impls or {}
    env, dims = initial_env(g, inputs, params)
    ops = list(g.ops())
    last_use: dict[str, int] = {}
    for i, op in enumerate(ops):
        for v in op.inputs:
            last_use[v] = i
    keep = set(g.outputs) | set(g.params)
    for i, op in enumerate(ops):
        fn = impls.get(op.kind) or get_op(op.kind).ref
        results = fn([env[v] for v in op.inputs], op_attrs(op, dims))
        for v, r in zip(op.outputs, results):
            env[v] = r
        for v in op.inputs:
            if last_use.get(v) == i and v not in keep:
                env.pop(v, None)
    return [env[v] for v in g.outputs]
