"""The node emitter the ONNX mappings write through: fresh names, constants, symbolic dims
(B, T, S and products of them as int64 tensors), parameters as initializers, and the
functions of our own domain. One emitter builds one ONNX graph or one function body."""
from __future__ import annotations

import itertools

import numpy as np
import torch
from onnx import AttributeProto, TensorProto, helper

from kimi_graph.dtypes import IR_DTYPES, TORCH_DTYPES
from kimi_graph.ir import IRError, TensorType

DOMAIN = "kimi_graph"          # our fused ops' domain (portable set: each carries a function)
MS = "com.microsoft"           # ONNX Runtime's contrib ops
ONNX_DTYPES = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
               "f64": TensorProto.DOUBLE, "i64": TensorProto.INT64, "i32": TensorProto.INT32,
               "bool": TensorProto.BOOL, "u8": TensorProto.UINT8, "f8e4m3": TensorProto.FLOAT8E4M3FN}
FLOAT = TensorProto.FLOAT


def table_registrar(table: dict):
    """A decorator factory: `@maps("kind", ...)` files the function under each op kind."""
    def maps(*kinds):
        def deco(fn):
            for k in kinds:
                table[k] = fn
            return fn
        return deco
    return maps


def tensor_proto(name: str, t: torch.Tensor, onnx_dtype: int | None = None) -> TensorProto:
    """A TensorProto holding `t`'s bytes (bf16 included: torch has it, numpy does not)."""
    t = t.detach().cpu().contiguous()
    dt = onnx_dtype if onnx_dtype is not None else ONNX_DTYPES[IR_DTYPES[t.dtype]]
    p = TensorProto(name=name, data_type=dt, dims=list(t.shape))
    p.raw_data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return p


def attr_ref(name: str, ref: str, kind: int) -> AttributeProto:
    """An attribute of a function-body node that takes the calling node's attribute `ref`."""
    a = AttributeProto(name=name, ref_attr_name=ref, type=kind)
    return a


class Emitter:
    """Collects nodes; `node()` returns the output names. `types` maps IR value names (with
    their "%"/"@" prefixes stripped) to TensorTypes where known (graph values)."""

    def __init__(self, prefix: str = "", opset: int = 23, functions: dict | None = None,
                 signatures: dict | None = None):
        self.nodes: list = []
        self.initializers: dict[str, TensorProto] = {}
        self.opset = opset                     # of the default domain, in the model and its functions
        self.functions: dict[tuple[str, str], object] = {} if functions is None else functions
        self.signatures: dict[tuple, str] = {} if signatures is None else signatures  # key -> name
        self.opsets: dict[str, int] = {}
        self._ids = itertools.count()
        self._consts: dict[tuple, str] = {}
        self._dims: dict[str, str] = {}
        self.dim_sources: dict[str, tuple[str, int]] = {}   # symbol -> (value, axis)
        self.prefix = prefix

    # -- names and nodes --------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        return f"{self.prefix}{hint}__{next(self._ids)}"

    def node(self, op: str, inputs, n_out: int = 1, *, domain: str = "", outputs=None,
             name: str | None = None, **attrs) -> list[str]:
        outs = list(outputs) if outputs is not None else [self.fresh(op.lower()) for _ in range(n_out)]
        refs = [a for a in attrs.values() if isinstance(a, AttributeProto)]
        plain = {k: v for k, v in attrs.items() if not isinstance(v, AttributeProto) and v is not None}
        n = helper.make_node(op, list(inputs), outs, name=name or outs[0] + "_node", domain=domain, **plain)
        n.attribute.extend(refs)
        self.nodes.append(n)
        if domain and domain not in self.opsets:
            self.opsets[domain] = 1
        return outs

    def __call__(self, op: str, *inputs, **attrs) -> str:
        """A single-output node."""
        return self.node(op, inputs, **attrs)[0]

    # -- constants ----------------------------------------------------------------
    def const(self, value, dtype: str | int = "i64") -> str:
        """A small constant (emitted once per value) as a Constant node."""
        dt = ONNX_DTYPES[dtype] if isinstance(dtype, str) else dtype
        arr = np.asarray(value)
        key = (arr.tobytes(), arr.shape, dt)
        if key not in self._consts:
            arr64 = np.array(value, dtype=np.float64 if dt in _FLOATS else np.int64)
            t = torch.as_tensor(arr64).to(_TORCH_OF[dt])
            name = self.fresh("const")
            self.nodes.append(helper.make_node("Constant", [], [name], name=name + "_node",
                                               value=tensor_proto(name, t, dt)))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, *values: int) -> str:
        return self.const(list(values), "i64")

    # -- symbolic dims ---------------------------------------------------------------
    def dim(self, d) -> str:
        """An int64 [1] tensor holding dim `d`: an int, a symbol bound by a graph input, or a
        product/sum expression of those ("B*T*8", "S+1")."""
        if isinstance(d, int):
            return self.ints(d)
        if d in self._dims:
            return self._dims[d]
        if d in self.dim_sources:
            v, axis = self.dim_sources[d]
            out = self("Shape", v, start=axis, end=axis + 1)
        elif any(c in d for c in "+-"):
            out, sign, cur = self.ints(0), 1, ""
            for ch in d.replace(" ", "") + "+":
                if ch in "+-":
                    if cur:
                        term = self.dim(int(cur) if cur.isdigit() else cur)
                        out = self("Add" if sign > 0 else "Sub", out, term)
                    sign, cur = (1 if ch == "+" else -1), ""
                else:
                    cur += ch
        elif "*" in d:
            parts = [self.dim(int(f) if f.isdigit() else f) for f in d.split("*")]
            out = parts[0]
            for p in parts[1:]:
                out = self("Mul", out, p)
        else:
            raise IRError(f"symbolic dim {d!r} is bound by no graph input")
        self._dims[d] = out
        return out

    def shape(self, dims) -> str:
        """An int64 shape tensor for `dims` (ints and symbols)."""
        if all(isinstance(d, int) for d in dims):
            return self.ints(*dims)
        return self("Concat", *[self.dim(d) for d in dims], axis=0)

    def reshape(self, x: str, dims) -> str:
        """Reshape to `dims`; one symbolic dim becomes -1 so no shape arithmetic is emitted."""
        sym = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if len(sym) == 1:
            return self("Reshape", x, self.ints(*[-1 if i == sym[0] else d for i, d in enumerate(dims)]))
        return self("Reshape", x, self.shape(dims))

    # -- functions of our domain ---------------------------------------------------------
    def body(self, prefix: str) -> "Emitter":
        """An emitter for a function body or subgraph of the model this one builds."""
        return Emitter(prefix, self.opset, self.functions, self.signatures)

    def add_function(self, fn) -> None:
        self.functions.setdefault((fn.domain, fn.name), fn)
        self.opsets.setdefault(fn.domain, 1)

    def function(self, base: str, key: tuple, build) -> str:
        """The name of the function of our domain for signature `key` (`base`, then `base_2`,
        ... for further signatures), built once: build(name, body emitter) -> (input names,
        output names, attribute names) with the body's nodes emitted into the body emitter."""
        if key not in self.signatures:
            n = sum(k[0] == base for k in self.signatures)
            name = self.signatures[key] = base if n == 0 else f"{base}_{n + 1}"
            body = self.body(f"{name}_")
            self.add_function(make_function(name, *build(name, body), body=body))
        self.opsets.setdefault(DOMAIN, 1)
        return self.signatures[key]


_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_TORCH_OF = {onnx_dt: TORCH_DTYPES[ir] for ir, onnx_dt in ONNX_DTYPES.items()}


def make_function(name: str, inputs, outputs, attributes=(), *, body: Emitter):
    """A FunctionProto of our domain from the nodes of `body` (default domain at its opset)."""
    imports = [helper.make_opsetid("", body.opset)] + [helper.make_opsetid(d, 1) for d in body.opsets if d]
    return helper.make_function(DOMAIN, name, list(inputs), list(outputs), body.nodes, imports,
                                attributes=list(attributes))


def value_info(name: str, ty: TensorType):
    return helper.make_tensor_value_info(name, ONNX_DTYPES[ty.dtype],
                                         [d if isinstance(d, int) else d for d in ty.shape])
