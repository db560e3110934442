"""A readable SVG picture of a graph (or of one decoder layer), in pure Python.

Layered layout: each op sits one row below its deepest operand (longest path), rows are
ordered by a few barycentre sweeps to untangle edges, and edges are drawn as curves from
producer to consumer. Boxes are coloured by op family and show the op kind, its result
name and type; hovering shows the op in full (operands, attributes, parameters). Values
coming from outside the picture (graph inputs, other layers) are drawn as ovals.
"""
from __future__ import annotations

import re
from html import escape

from .ir import Graph, Op
from .ops import get_op
from .printer import format_attrs

COLOURS = {"kda": "#d9c8f0", "attention": "#c8dcf5", "moe": "#fbd9b0", "norm": "#cdebc8",
           "linear": "#e2e6ea", "elementwise": "#f4f1d0", "movement": "#f7f7f7",
           "collective": "#f5c6cb"}   # by OpDef.family
CHAR_W, ROW_H, BOX_H, GAP = 6.6, 74, 40, 18


def layer_of(value: str) -> int | None:
    """Decoder layer of a value from its builder scope ("%l3.kda.q" -> 3)."""
    m = re.match(r"%l(\d+)\.", value)
    return int(m.group(1)) if m else None


def _colour(kind: str) -> str:
    return COLOURS[get_op(kind).family]


def _short_type(g: Graph, v: str) -> str:
    t = g.types[v]
    return "×".join(str(d) for d in t.shape) + " " + t.dtype


def _strip(name: str, prefix: str) -> str:
    name = name.lstrip("%")
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def render_svg(g: Graph, layer: int | None = None, title: str = "") -> str:
    """The SVG text for `g`, or for decoder layer `layer` only."""
    if layer is not None:
        ops = [o for o in g.ops() if layer_of(o.outputs[0]) == layer]
        if not ops:
            known = sorted({n for o in g.ops() for n in [layer_of(o.outputs[0])] if n is not None})
            raise ValueError(f"graph has no ops in layer {layer}; layers: {known}")
    else:
        ops = list(g.ops())
    prefix = f"l{layer}." if layer is not None else ""
    inside = {v for o in ops for v in o.outputs}
    # nodes: ("op", Op) or ("ext", value); edges between node keys
    nodes: dict[str, tuple] = {}
    edges: list[tuple[str, str]] = []
    for o in ops:
        key = f"op{o.id}"
        nodes[key] = ("op", o)
        for v in dict.fromkeys(o.inputs):
            if v.startswith("@"):
                continue
            if v in inside:
                src = f"op{g.producer[v]}"
            else:
                src = "ext" + v
                nodes.setdefault(src, ("ext", v))
            edges.append((src, key))
    edges = list(dict.fromkeys(edges))      # one arrow per producer -> consumer pair
    outs = [v for v in g.outputs if v in inside]
    for v in outs:
        nodes["out" + v] = ("out", v)
        edges.append((f"op{g.producer[v]}", "out" + v))
    # ranks by longest path (nodes are in topological order: ext first, then ops)
    order = [k for k in nodes if k.startswith("ext")] + [f"op{o.id}" for o in ops] + \
        [k for k in nodes if k.startswith("out")]
    preds: dict[str, list[str]] = {k: [] for k in nodes}
    for a, b in edges:
        preds[b].append(a)
    rank = {}
    for k in order:
        rank[k] = 1 + max((rank[p] for p in preds[k]), default=-1)
    for k in order:                          # pull ext inputs down next to their first reader
        if k.startswith("ext"):
            readers = [b for a, b in edges if a == k]
            rank[k] = max(0, min(rank[r] for r in readers) - 1)
    rows: dict[int, list[str]] = {}
    for k in order:
        rows.setdefault(rank[k], []).append(k)
    labels = {k: _label(g, nodes[k], prefix) for k in nodes}
    width = {k: max(len(s) for s in labels[k]) * CHAR_W + 16 for k in nodes}
    # barycentre sweeps: order each row by the mean x of its predecessors
    x = _place(rows, width)
    for _ in range(4):
        for r in sorted(rows):
            rows[r].sort(key=lambda k: (sum(x[p] for p in preds[k]) / len(preds[k]))
                         if preds[k] else x[k])
        x = _place(rows, width)
    total_w = max(sum(width[k] + GAP for k in row) for row in rows.values()) + 40
    total_h = (max(rows) + 1) * ROW_H + 70
    y = {k: 50 + rank[k] * ROW_H for k in nodes}
    head = title or f"graph @{g.name}" + (f", layer {layer}" if layer is not None else "")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w:.0f}" height="{total_h:.0f}" '
             f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" font-family="monospace" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="20" y="26" font-size="15" font-weight="bold">{escape(head)}</text>',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
             'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#667"/></marker></defs>',
             '<g fill="none" stroke="#8890a0" stroke-width="1.1">']
    for a, b in edges:
        x0, y0, x1, y1 = x[a], y[a] + BOX_H, x[b], y[b]
        my = (y0 + y1) / 2
        parts.append(f'<path d="M{x0:.1f},{y0:.1f} C{x0:.1f},{my:.1f} {x1:.1f},{my:.1f} '
                     f'{x1:.1f},{y1:.1f}" marker-end="url(#arrow)"/>')
    parts.append("</g>")
    for k, node in nodes.items():
        parts.append(_box(g, node, labels[k], x[k], y[k], width[k]))
    parts.append("</svg>")
    return "\n".join(parts)


def _place(rows: dict[int, list[str]], width: dict[str, float]) -> dict[str, float]:
    """Centre x of each node: rows packed left to right, centred on a common axis."""
    widest = max(sum(width[k] + GAP for k in row) for row in rows.values())
    x = {}
    for row in rows.values():
        cur = 20 + (widest - sum(width[k] + GAP for k in row)) / 2
        for k in row:
            x[k] = cur + width[k] / 2
            cur += width[k] + GAP
    return x


def _label(g: Graph, node: tuple, prefix: str) -> list[str]:
    kind, thing = node
    if kind == "op":
        op: Op = thing
        extra = ""
        if op.kind == "kda_fused_chunk":
            extra = f" chunk={op.attrs.get('chunk_size')}"
        elif op.kind == "causal_conv1d" and op.attrs.get("activation", "none") != "none":
            extra = f" +{op.attrs['activation']}"
        return [op.kind + extra, f"{_strip(op.outputs[0], prefix)} : {_short_type(g, op.outputs[0])}"]
    return [("output " if kind == "out" else "") + thing.lstrip("%"), _short_type(g, thing)]


def _box(g: Graph, node: tuple, label: list[str], cx: float, top: float, w: float) -> str:
    kind, thing = node
    left = cx - w / 2
    if kind == "op":
        op: Op = thing
        tip = (f"{', '.join(op.outputs)} = {op.kind}({', '.join(op.inputs)})"
               f"{format_attrs(op.attrs)} : {', '.join(str(g.types[v]) for v in op.outputs)}")
        shape = (f'<rect x="{left:.1f}" y="{top:.1f}" width="{w:.1f}" height="{BOX_H}" rx="6" '
                 f'fill="{_colour(op.kind)}" stroke="#556"/>')
    else:
        tip = f"{thing} : {g.types[thing]}"
        shape = (f'<ellipse cx="{cx:.1f}" cy="{top + BOX_H / 2:.1f}" rx="{w / 2:.1f}" '
                 f'ry="{BOX_H / 2}" fill="white" stroke="#889" stroke-dasharray="4 2"/>')
    return (f'<g><title>{escape(tip)}</title>{shape}'
            f'<text x="{cx:.1f}" y="{top + 16:.1f}" text-anchor="middle" font-weight="bold">'
            f'{escape(label[0])}</text>'
            f'<text x="{cx:.1f}" y="{top + 31:.1f}" text-anchor="middle" fill="#333">'
            f'{escape(label[1])}</text></g>')
