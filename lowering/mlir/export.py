"""Layer graph -> MLIR text through torch-mlir's FX importer (`torch_mlir.fx.export_and_import`).

The graph is lowered to FX with `decompose=True`: torch-mlir cannot import our custom ops,
so each one runs its reference form, free of host syncs (`decomposed_form` in
`lowering/torch/ops.py`), traced into plain torch ops; the file's header comment lists the op kinds so decomposed. Shapes are
static (the example inputs'); weights are inlined as constants (`dense_resource` blobs).
torch-mlir is an optional extra (`pip install kimi-graph[mlir]`), imported only here.
"""
from __future__ import annotations

import warnings
from typing import Mapping

import torch

from kimi_graph.ir import Graph, eval_dim
from kimi_graph.ops import TORCH_DTYPES

DIALECTS = ("torch", "linalg-on-tensors", "stablehlo")


def require_torch_mlir():
    try:
        import torch_mlir.fx  # noqa: F401
    except ImportError as e:
        raise ImportError("MLIR export needs torch-mlir: pip install 'kimi-graph[mlir]' "
                          f"(torch_mlir did not import: {e})") from None
    import torch_mlir
    return torch_mlir


def example_inputs(g: Graph, batch: int = 1, seq: int = 8, cache_len: int = 16,
                   device: str = "cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for every graph input with dims B=batch, T=seq, S=cache_len: token ids in range,
    cache positions 0, random states (their values do not change the exported program)."""
    gen = torch.Generator().manual_seed(seed)
    dims = {"B": batch, "T": seq, "S": cache_len}
    vocab = next((g.types[op.inputs[1]].shape[0] for op in g.ops() if op.kind == "embedding"), 2)
    out = {}
    for name, ty in g.inputs.items():
        shape = [eval_dim(d, dims) for d in ty.shape]
        dtype = TORCH_DTYPES[ty.dtype]
        if name == "%input_ids":
            t = torch.randint(0, vocab, shape, generator=gen)
        elif not dtype.is_floating_point:
            t = torch.zeros(shape, dtype=dtype)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        out[name] = t.to(device)
    return out


def decomposed_kinds(g: Graph) -> list[str]:
    from kimi_graph.lowering.torch.ops import CUSTOM, lowering
    return sorted({op.kind for op in g.ops() if lowering(op.kind).how == CUSTOM})


def export_mlir(g: Graph, weights: Mapping[str, torch.Tensor], dialect: str = "torch",
                inputs: Mapping[str, torch.Tensor] | None = None) -> str:
    """MLIR text of `g` in `dialect` (one of DIALECTS), traced at the shapes of `inputs`
    (default: `example_inputs(g)`), with a header comment saying what was decomposed."""
    if dialect not in DIALECTS:
        raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, got {dialect!r}")
    torch_mlir = require_torch_mlir()
    from kimi_graph.lowering.torch import lower

    inputs = dict(inputs or example_inputs(g))
    inputs = {(k if k.startswith("%") else "%" + k): v for k, v in inputs.items()}
    gm = lower(g, weights, decompose=True)
    args = tuple(inputs[n] for n in g.inputs)
    with warnings.catch_warnings():    # torch.export's pytree deprecation notes, not ours
        warnings.simplefilter("ignore", FutureWarning)
        module = torch_mlir.fx.export_and_import(gm, *args, output_type=dialect, func_name=g.name)
    shapes = ", ".join(f"{n[1:]} {list(inputs[n].shape)}" for n in g.inputs)
    kinds = decomposed_kinds(g)
    header = [
        f"// kimi-graph: graph {g.name!r} ({g.meta.get('mode', '?')}), dialect {dialect}, "
        f"torch {torch.__version__}",
        f"// static shapes: {shapes}",
        "// custom ops torch-mlir cannot import were decomposed to their reference form "
        "(kimi_graph/lowering/torch/ops.py): " + (", ".join(kinds) if kinds else "none"),
    ]
    return "\n".join(header) + "\n" + str(module)


def parse_mlir(text: str):
    """Parse MLIR text with torch-mlir's own parser, every dialect its exports use loaded:
    torch, stablehlo, and tm_tensor (torch-mlir's sort/scatter/top-k ops in linalg-on-tensors
    output), which only the linalg lowering pipeline loads: it is run once on an empty module."""
    require_torch_mlir()
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.passmanager import PassManager
    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    try:
        from torch_mlir._mlir_libs import _stablehlo
        _stablehlo.register_dialect(ctx)
    except ImportError:       # a torch-mlir built without stablehlo: its modules will not parse
        pass
    with ctx:
        PassManager.parse("builtin.module(torch-backend-to-linalg-on-tensors-backend-pipeline)").run(
            ir.Module.parse("module {}").operation)
    return ir.Module.parse(text, ctx)
