"""fuse-residual-norm: rmsnorm(x + residual) -> add_rmsnorm(x, residual, weight), which
returns both the normalised value and the sum (the residual stream read further on)."""
from __future__ import annotations

from kimi_graph.ir import Graph

from .manager import PassContext, register_pass
from .rewrite import P, Pattern, PatternPass, V


def _same_types(g: Graph, m) -> bool:
    a, r, s = (g.types[v] for v in (m["x"], m["r"], m["add"].outputs[0]))
    return a == r == s


def _fuse(m, rw) -> bool:
    add, norm = m["add"], m.root
    n, s = rw.create("add_rmsnorm", m["x"], m["r"], m["w"], like=norm.outputs[0], name="norm",
                     eps=norm.attrs["eps"])
    rw.replace({norm.outputs[0]: n, add.outputs[0]: s}, erase=[norm, add])
    return True


PATTERN = Pattern(P("rmsnorm", P("add", V("x"), V("r"), name="add"), V("w")), _fuse, _same_types,
                  "add-rmsnorm")


@register_pass
class FuseResidualNorm(PatternPass):
    name = "fuse-residual-norm"
    summary = "add + rmsnorm -> add_rmsnorm (sum and norm in one op)"

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return [PATTERN]
