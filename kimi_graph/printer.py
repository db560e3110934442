"""MLIR-like text form of a Graph, and its parser: parse(print(g)) is structurally equal to g.

    graph @prefill(%input_ids: tensor<B x T x i64>) -> (%logits) {
      meta = {"mode": "prefill"}
      param @model.norm.weight : tensor<64 x f32>
      %l0.attn_norm = rmsnorm(%h, @model.layers.0.input_layernorm.weight) {eps = 1e-05} : tensor<B x T x 64 x f32>
      return %logits
    }
"""
from __future__ import annotations

import json
import re

from .ir import Graph, IRError, TensorType, gc_paused

_NAME = r"[%@][A-Za-z0-9_.\-]+"
_TYPE = re.compile(r"tensor<([^>]*)>")


def format_attrs(attrs: dict) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in attrs.items()) + "}"


def print_graph(g: Graph) -> str:
    ins = ", ".join(f"{n}: {t}" for n, t in g.inputs.items())
    lines = [f"graph @{g.name}({ins}) -> ({', '.join(g.outputs)}) {{"]
    if g.meta:
        lines.append(f"  meta = {json.dumps(g.meta, sort_keys=True)}")
    lines += [f"  param {n} : {t}" for n, t in g.params.items()]
    for op in g.ops():
        types = ", ".join(str(g.types[v]) for v in op.outputs)
        lines.append(f"  {', '.join(op.outputs)} = {op.kind}({', '.join(op.inputs)})"
                     f"{format_attrs(op.attrs)} : {types}")
    lines += [f"  return {', '.join(g.outputs)}", "}"]
    return "\n".join(lines)


def parse_type(text: str) -> TensorType:
    m = _TYPE.fullmatch(text.strip())
    if not m:
        raise IRError(f"bad type {text!r}")
    parts = [p.strip() for p in m.group(1).split(" x ")]
    dims = tuple(int(p) if p.isdigit() else p for p in parts[:-1])
    return TensorType(dims, parts[-1])


def _parse_attrs(text: str, lineno: int) -> dict:
    """`key = <json>, key = <json>` -> dict."""
    attrs, i, dec = {}, 0, json.JSONDecoder()
    while i < len(text):
        m = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*").match(text, i)
        if not m:
            raise IRError(f"line {lineno}: bad attribute near {text[i:i + 30]!r}")
        value, i = dec.raw_decode(text, m.end())
        attrs[m.group(1)] = value
        i = re.compile(r"\s*,?\s*").match(text, i).end()
    return attrs


def parse_graph(text: str) -> Graph:
    with gc_paused():
        return _parse_graph(text)


def _parse_graph(text: str) -> Graph:
    lines = [(n + 1, ln.strip()) for n, ln in enumerate(text.splitlines())]
    lines = [(n, ln) for n, ln in lines if ln and not ln.startswith("//")]
    if not lines:
        raise IRError("empty IR text")
    n0, head = lines[0]
    m = re.fullmatch(r"graph @([A-Za-z0-9_.\-]+)\((.*)\) -> \((.*)\) \{", head)
    if not m:
        raise IRError(f"line {n0}: expected 'graph @name(...) -> (...) {{', got {head!r}")
    g = Graph(m.group(1))
    for arg in filter(None, (a.strip() for a in _split_top(m.group(2)))):
        name, ty = arg.split(":", 1)
        g.add_input(name.strip(), parse_type(ty))
    outputs = [o.strip() for o in m.group(3).split(",") if o.strip()]
    op_re = re.compile(rf"((?:{_NAME})(?:\s*,\s*{_NAME})*) = ([a-z_0-9]+)\((.*?)\)(?: \{{(.*)\}})? : (.*)")
    for n, ln in lines[1:]:
        if ln == "}":
            break
        if ln.startswith("meta = "):
            g.meta = json.loads(ln[len("meta = "):])
        elif ln.startswith("param "):
            name, ty = ln[len("param "):].split(" : ", 1)
            g.add_param(name.strip(), parse_type(ty))
        elif ln.startswith("return"):
            ret = [o.strip() for o in ln[len("return"):].split(",") if o.strip()]
            if ret != outputs:
                raise IRError(f"line {n}: return {ret} differs from the header's {outputs}")
        else:
            om = op_re.fullmatch(ln)
            if not om:
                raise IRError(f"line {n}: cannot parse op {ln!r}")
            outs = [o.strip() for o in om.group(1).split(",")]
            ins = [v.strip() for v in om.group(3).split(",") if v.strip()]
            types = [parse_type(t) for t in re.findall(r"tensor<[^>]*>", om.group(5))]
            if len(types) != len(outs):
                raise IRError(f"line {n}: {len(outs)} results but {len(types)} types")
            try:
                g.add_op(om.group(2), ins, types, _parse_attrs(om.group(4) or "", n), out_names=outs)
            except IRError as e:
                raise IRError(f"line {n}: {e}") from None
    for o in outputs:
        if o not in g.types:
            raise IRError(f"graph output {o} is never defined")
    g.outputs = outputs
    return g


def _split_top(s: str) -> list[str]:
    """Split on commas outside <...>."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch == "<") - (ch == ">")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def structurally_equal(a: Graph, b: Graph) -> bool:
    """Same inputs, params, outputs, and the same ops (kind, operands, results, attrs, types)."""
    def ops(g):
        return [(o.kind, o.inputs, o.outputs, o.attrs, [g.types[v] for v in o.outputs]) for o in g.ops()]
    return (a.inputs == b.inputs and a.params == b.params and a.outputs == b.outputs
            and ops(a) == ops(b))
