"""canonicalize: algebraic identities and data-movement folding, each exact.

    cast(x -> x.dtype) = x                cast(cast(x, wider), t) = cast(x, t)
    reshape(x -> x.shape) = x             reshape(reshape(x)) = reshape(x)
    transpose(x, identity) = x            transpose(transpose(x, p), q) = transpose(x, p∘q)
    expand(x -> x.shape) = x              slice(x, whole dim) = x
    slice(slice(x)) = slice(x)            slice(concat(.., a, ..)) = a   (a's exact range)
    concat(x) = x                         neg(neg(x)) = x
    scale(x, 1) = x                       x + zeros_like(y) = x - zeros_like(y) = x
"""
from __future__ import annotations

from kimi_graph.ir import Graph

from .manager import PassContext, register_pass
from .rewrite import P, Pattern, PatternPass, Rewriter, V

# exact widening casts: every value of the source dtype is representable in the target
_WIDENS = {("bf16", "f32"), ("bf16", "f64"), ("f16", "f32"), ("f16", "f64"), ("f32", "f64"),
           ("i32", "i64"), ("bool", "i32"), ("bool", "i64")}


def _forward(m, rw: Rewriter, value: str) -> bool:
    """Replace the root's (single) result by `value`, if the types agree."""
    out = m.root.outputs[0]
    if rw.type(out) != rw.type(value):
        return False
    rw.replace({out: value}, erase=[m.root], keep_names=False)
    return True


def _identity(m, rw):
    return _forward(m, rw, m["x"])


def _same_type(g: Graph, m) -> bool:
    return g.types[m.root.outputs[0]] == g.types[m["x"]]


def _cast_chain(m, rw):
    x, inner = m["x"], m["inner"]
    src, mid, dst = rw.type(x).dtype, inner.attrs["dtype"], m.root.attrs["dtype"]
    if (src, mid) not in _WIDENS and src != mid:
        return False
    new = x if dst == src else rw.create1("cast", x, like=m.root.outputs[0], name="cast", dtype=dst)
    rw.replace({m.root.outputs[0]: new}, erase=[m.root])
    return True


def _reshape_chain(m, rw):
    new = rw.create1("reshape", m["x"], like=m.root.outputs[0], name="reshape",
                     shape=list(m.root.attrs["shape"]))
    rw.replace({m.root.outputs[0]: new}, erase=[m.root])
    return True


def _transpose_chain(m, rw):
    p, q = m["inner"].attrs["perm"], m.root.attrs["perm"]
    new = rw.create1("transpose", m["x"], like=m.root.outputs[0], name="transpose",
                     perm=[p[i] for i in q])
    rw.replace({m.root.outputs[0]: new}, erase=[m.root])
    return True


def _norm_dim(d: int, rank: int) -> int:
    return d % rank


def _slice_whole(g: Graph, m) -> bool:
    t = g.types[m["x"]]
    a = m.root.attrs
    return a["start"] == 0 and a["end"] == t.shape[_norm_dim(a["dim"], t.rank)]


def _slice_chain(m, rw):
    inner, outer, rank = m["inner"].attrs, m.root.attrs, rw.type(m["x"]).rank
    if _norm_dim(inner["dim"], rank) != _norm_dim(outer["dim"], rank):
        return False
    s = inner["start"] + outer["start"]
    new = rw.create1("slice", m["x"], like=m.root.outputs[0], name="slice", dim=inner["dim"],
                     start=s, end=s + outer["end"] - outer["start"])
    rw.replace({m.root.outputs[0]: new}, erase=[m.root])
    return True


def _slice_of_concat(m, rw):
    cat = m["cat"]
    rank = rw.type(cat.outputs[0]).rank
    d = _norm_dim(cat.attrs["dim"], rank)
    if _norm_dim(m.root.attrs["dim"], rank) != d:
        return False
    lo = 0
    for v in cat.inputs:
        size = rw.type(v).shape[d]
        if not isinstance(size, int):
            return False
        if (lo, lo + size) == (m.root.attrs["start"], m.root.attrs["end"]):
            return _forward(m, rw, v)
        lo += size
    return False


def _concat_one(m, rw):
    if len(m.root.inputs) != 1:
        return False
    return _forward(m, rw, m.root.inputs[0])


_ZERO = P("zeros_like", V())

PATTERNS = [
    Pattern(P("cast", V("x")), _identity, _same_type, "cast-identity"),
    Pattern(P("cast", P("cast", V("x"), name="inner")), _cast_chain, name="cast-chain"),
    Pattern(P("reshape", V("x")), _identity, _same_type, "reshape-identity"),
    Pattern(P("reshape", P("reshape", V("x"))), _reshape_chain, name="reshape-chain"),
    Pattern(P("transpose", V("x"), attrs={"perm": lambda p: list(p) == sorted(p)}), _identity,
            name="transpose-identity"),
    Pattern(P("transpose", P("transpose", V("x"), name="inner")), _transpose_chain,
            name="transpose-chain"),
    Pattern(P("expand", V("x")), _identity, _same_type, "expand-identity"),
    Pattern(P("slice", V("x")), _identity, _slice_whole, "slice-identity"),
    Pattern(P("slice", P("slice", V("x"), name="inner")), _slice_chain, name="slice-chain"),
    Pattern(P("slice", P("concat", name="cat", open=True)), _slice_of_concat, name="slice-of-concat"),
    Pattern(P("concat", open=True), _concat_one, name="concat-single"),
    Pattern(P("neg", P("neg", V("x"))), _identity, name="neg-neg"),
    Pattern(P("scale", V("x"), attrs={"factor": 1.0}), _identity, name="scale-one"),
    Pattern(P("add", V("x"), _ZERO, commutative=True), _identity, name="add-zero"),
    Pattern(P("sub", V("x"), _ZERO), _identity, name="sub-zero"),
]


@register_pass
class Canonicalize(PatternPass):
    name = "canonicalize"
    summary = "algebraic identities, cast/reshape/transpose/slice folding (exact rewrites)"

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return PATTERNS
