"""The rewrite driver: declarative patterns over the op graph, applied greedily to a fixed point.

A pattern is a tree rooted at one op:

    P("mul", P("rmsnorm", V("x"), V("w"), name="norm"), P("sigmoid", V("gate")),
      commutative=True)

- `P(kind, *operands, name=, attrs=, result=, one_use=, commutative=, open=)` matches an op
  of `kind` whose operands match `operands` (all of them unless `open`, which allows
  trailing ones, e.g. an optional state). `attrs` constrains attributes (a value, or a
  predicate on the value; defaults filled in). As an operand, it matches the value that is
  result `result` of such an op; `one_use` asks that value to have exactly one reader.
  `name` binds the op.
- `V(name, where=)` matches any value and binds it; `Param(name)` a parameter.
  A name bound twice must bind the same thing (the same value or op).
- `Alt(p1, p2, ...)`: the first alternative that matches (e.g. an optional cast).
- `where`: a predicate `(graph, match) -> bool` on the whole match of the root.

A `Pattern(root, rewrite, where=, name=)` pairs a root with a rewrite function
`rewrite(match, rw) -> bool` (False: declined, nothing changed) that edits through the
`Rewriter`. `apply_patterns` runs a worklist over the ops (topological order first; ops a
rewrite creates or feeds are revisited) until no pattern applies, erasing matched ops that
a rewrite left dead, as MLIR's greedy driver does.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from kimi_graph.ir import Graph, IRError, Op, TensorType
from kimi_graph.ops import get_op

from .manager import Pass, PassContext


class V:
    def __init__(self, name: str | None = None, where: Callable[[Graph, str], bool] | None = None):
        self.name, self.where = name, where


class Param(V):
    """A value that is a graph parameter."""


class Alt:
    def __init__(self, *alternatives):
        self.alternatives = alternatives


class P:
    def __init__(self, kind: str, *operands, name: str | None = None, attrs: dict | None = None,
                 result: int = 0, one_use: bool = False, commutative: bool = False, open: bool = False):
        self.kind, self.operands, self.name, self.attrs = kind, operands, name, attrs or {}
        self.result, self.one_use, self.commutative, self.open = result, one_use, commutative, open


class Match(dict):
    """name -> bound value (str) or op (Op) ("#<id>" for unnamed ops); `.root`: the root op."""
    root: Op


def _bind(m: Match, name: str | None, thing) -> Match | None:
    if name is None:
        return m
    if name in m:
        same = m[name] is thing if isinstance(thing, Op) else m[name] == thing
        return m if same else None
    m2 = Match(m)
    m2[name] = thing
    return m2


def _match_value(g: Graph, pat, value: str, m: Match) -> Iterator[Match]:
    if isinstance(pat, Alt):
        for alt in pat.alternatives:
            yield from _match_value(g, alt, value, m)
        return
    if isinstance(pat, V):
        if isinstance(pat, Param) and value not in g.params:
            return
        if pat.where is not None and not pat.where(g, value):
            return
        m2 = _bind(m, pat.name, value)
        if m2 is not None:
            yield m2
        return
    op = g.defining_op(value)
    if op is None or op.kind != pat.kind or op.outputs.index(value) != pat.result:
        return
    if pat.one_use and num_uses(g, value) != 1:
        return
    yield from _match_op(g, pat, op, m)


def _match_op(g: Graph, pat: P, op: Op, m: Match) -> Iterator[Match]:
    if op.kind != pat.kind:
        return
    n = len(pat.operands)
    if len(op.inputs) < n or (len(op.inputs) > n and not pat.open):
        return
    if pat.attrs:
        attrs = get_op(op.kind).full_attrs(op.attrs)
        for k, want in pat.attrs.items():
            have = attrs.get(k)
            if not (want(have) if callable(want) else have == want):
                return
    m = _bind(m, pat.name or f"#{op.id}", op)     # unnamed ops too: the driver erases dead ones
    if m is None:
        return
    orders = [list(range(n))]
    if pat.commutative and n == 2:
        orders.append([1, 0])
    for order in orders:
        yield from _match_operands(g, [pat.operands[i] for i in order], op.inputs[:n], m)


def _match_operands(g, pats, values, m) -> Iterator[Match]:
    if not pats:
        yield m
        return
    for m2 in _match_value(g, pats[0], values[0], m):
        yield from _match_operands(g, pats[1:], values[1:], m2)


def match(g: Graph, root: P, op: Op, where=None) -> Match | None:
    """The first match of `root` at `op` (satisfying `where`), or None."""
    for m in _match_op(g, root, op, Match()):
        m.root = op
        if where is None or where(g, m):
            return m
    return None


# -- editing ------------------------------------------------------------------------------
def scope_of(value: str) -> str:
    """The builder scope of a value name: "%l3.kda.q.2" -> "l3.kda" ("" for none)."""
    name = re.sub(r"\.\d+$", "", value.lstrip("%@"))
    return name.rsplit(".", 1)[0] if "." in name else ""


def only_user(g: Graph, value: str, kind: str) -> Op | None:
    """The op of `kind` that is the single reader of `value` (read once, not an output)."""
    users = g.users(value)
    if len(users) == 1 and users[0].kind == kind and num_uses(g, value) == 1:
        return users[0]
    return None


def num_uses(g: Graph, value: str) -> int:
    """Operand slots reading `value`, plus one per graph output that is it."""
    return sum(u.inputs.count(value) for u in g.users(value)) + g.outputs.count(value)


class Rewriter:
    """Creates ops with inferred types, replaces values and erases ops, and remembers what
    it touched so the driver can revisit it."""

    def __init__(self, g: Graph):
        self.g = g
        self.created: list[int] = []
        self.touched: set[int] = set()
        self._new_values: set[str] = set()

    def create(self, kind: str, *inputs: str, like: str | None = None, name: str | None = None,
               **attrs) -> list[str]:
        """Emit `kind(inputs){attrs}` (attributes completed with defaults, types inferred).
        Results are named in the scope of the value `like`, e.g. "%l3.kda.<name>"."""
        opdef = get_op(kind)
        opdef.check_arity(len(inputs))
        full = opdef.full_attrs(attrs)
        out_types = opdef.infer([self.g.types[v] for v in inputs], full)
        scope = scope_of(like) if like else ""
        hint = ".".join(p for p in (scope, name or kind) if p)
        names = [self.g.fresh(hint) for _ in out_types]
        op = self.g.add_op(kind, list(inputs), out_types, full, out_names=names)
        self.created.append(op.id)
        self._new_values.update(names)
        return names

    def create1(self, kind: str, *inputs: str, like: str | None = None, name: str | None = None,
                **attrs) -> str:
        return self.create(kind, *inputs, like=like, name=name, **attrs)[0]

    def type(self, value: str) -> TensorType:
        return self.g.types[value]

    def replace(self, mapping: dict[str, str], erase: list[Op] = (), keep_names: bool = True) -> None:
        """Make every reader of each old value read its new value, erase `erase` (whose
        results must then be unused) and, with keep_names, give the new values created in
        this rewrite the old names, so the printed IR keeps its names."""
        for old, new in mapping.items():
            for u in self.g.users(old):
                self.touched.add(u.id)
            self.g.replace_uses(old, new)
        for op in erase:
            self.erase(op)
        if keep_names:
            for old, new in mapping.items():
                if new in self._new_values and old not in self.g.types:
                    self.g.rename_value(new, old)
                    self._new_values.discard(new)

    def erase(self, op: Op) -> None:
        for v in op.outputs:
            if self.g.users(v) or v in self.g.outputs:
                raise IRError(f"cannot erase {op}: its result {v} is still used")
        for v in op.inputs:
            src = self.g.producer.get(v)
            if src is not None:
                self.touched.add(src)
        self.g.remove_op(op.id)


@dataclass
class Pattern:
    root: P
    rewrite: Callable[[Match, Rewriter], bool]
    where: Callable[[Graph, Match], bool] | None = None
    name: str = ""

    def __post_init__(self):
        self.name = self.name or getattr(self.rewrite, "__name__", self.root.kind)


@dataclass
class DriverResult:
    applied: dict[str, int] = field(default_factory=dict)
    erased_dead: int = 0


def _erase_dead(g: Graph, ops: list[Op], rw: Rewriter) -> int:
    """Erase the matched ops a rewrite left without readers (producers before consumers
    are revisited until none is dead)."""
    n, changed = 0, True
    pending = [o for o in ops if o.id in g.nx]
    while changed:
        changed = False
        for op in list(pending):
            if op.id in g.nx and not any(g.users(v) or v in g.outputs for v in op.outputs):
                rw.erase(op)
                pending.remove(op)
                n += 1
                changed = True
    return n


def apply_patterns(g: Graph, patterns: list[Pattern], max_rewrites: int | None = None) -> DriverResult:
    """Apply `patterns` greedily until none matches. Raises if it does not converge within
    `max_rewrites` (default: 4 x ops + 100)."""
    by_kind: dict[str, list[Pattern]] = {}
    for p in patterns:
        by_kind.setdefault(p.root.kind, []).append(p)
    work = deque(o.id for o in g.ops() if o.kind in by_kind)
    queued = set(work)
    limit = max_rewrites if max_rewrites is not None else 4 * len(g) + 100
    result = DriverResult()
    while work:
        op_id = work.popleft()
        queued.discard(op_id)
        if op_id not in g.nx:
            continue
        op = g.op(op_id)
        for pat in by_kind.get(op.kind, ()):
            m = match(g, pat.root, op, pat.where)
            if m is None:
                continue
            rw = Rewriter(g)
            if not pat.rewrite(m, rw):      # declined: it must not have changed anything
                if rw.created or rw.touched:
                    raise IRError(f"pattern {pat.name} declined after editing the graph")
                continue
            result.applied[pat.name] = result.applied.get(pat.name, 0) + 1
            if sum(result.applied.values()) > limit:
                raise IRError(f"rewrite driver did not converge after {limit} rewrites "
                              f"({result.applied})")
            matched = [x for x in m.values() if isinstance(x, Op)] + [op]
            result.erased_dead += _erase_dead(g, matched, rw)
            for i in rw.created + sorted(rw.touched):
                if i in g.nx and i not in queued and g.op(i).kind in by_kind:
                    work.append(i)
                    queued.add(i)
            break
    return result


class PatternPass(Pass):
    """A pass that applies `patterns(ctx)` greedily and counts each pattern's rewrites; ops of
    the kinds in `leftover` that remain afterwards are counted too (stat "<kind>-left")."""
    leftover: tuple[str, ...] = ()

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        raise NotImplementedError

    def run(self, g: Graph, ctx: PassContext) -> None:
        for k, v in apply_patterns(g, self.patterns(ctx)).applied.items():
            ctx.stat(k, v)
        if self.leftover:
            for op in g.ops():
                if op.kind in self.leftover:
                    ctx.stat(f"{op.kind}-left")
