"""fuse-kda-gating: KDA's gating folds into fused ops (signatures in kimi_graph/ops/kda.py, norm.py).

- kda_recurrent(l2norm(q), l2norm(k), v, g, sigmoid(b)) whose decay is the chain
  g = reshape(softplus(f + dt_bias)) * -exp(A_log)  (optional casts to the accumulation
  dtype in front of the add and the sigmoid)
      -> kda_fused_recurrent(q, k, v, f, b, A_log, dt_bias, state?){scale, l2norm_eps}
- rmsnorm(x, w) * sigmoid(gate) -> gated_rmsnorm(x, w, gate)
- silu(causal_conv1d(x, w, state?){activation="none"}) -> causal_conv1d{activation="silu"}
  (when the silu is the conv output's only reader)
Each rewrite is exact: the fused ops compute the same expressions in the same order.
"""
from __future__ import annotations

from kimi_graph.ir import Graph
from kimi_graph.dtypes import FLOAT_DTYPES, acc_dtype

from .manager import PassContext, register_pass
from .rewrite import Alt, P, Pattern, PatternPass, V


def _maybe_cast(name: str):
    return Alt(P("cast", V(name), name=name + "_cast"), V(name))


DECAY = P("mul",
          P("reshape", P("softplus", P("add", _maybe_cast("f"), V("dt_bias"), name="add",
                                       commutative=True))),
          P("neg", P("exp", V("A_log"))), commutative=True)

KDA = P("kda_recurrent", P("l2norm", V("q"), name="qn"), P("l2norm", V("k"), name="kn"), V("v"),
        DECAY, P("sigmoid", _maybe_cast("b"), name="beta"), open=True)


def _kda_where(g: Graph, m) -> bool:
    acc = acc_dtype(g.types[m["v"]].dtype)
    f, dt = g.types[m["f"]], g.types[m["dt_bias"]]
    floats = all(g.types[m[n]].dtype in FLOAT_DTYPES for n in ("f", "b"))
    return (floats and m["qn"].attrs["eps"] == m["kn"].attrs["eps"]
            and g.types[m["add"].outputs[0]].dtype == acc       # gate computed in acc
            and g.types[m["beta"].outputs[0]].dtype == acc      # sigmoid(b) in acc
            and f.rank == 3 and dt.rank == 1)


def _fuse_kda(m, rw) -> bool:
    op = m.root
    ins = [m["q"], m["k"], m["v"], m["f"], m["b"], m["A_log"], m["dt_bias"]] + op.inputs[5:]
    outs = rw.create("kda_fused_recurrent", *ins, like=op.outputs[0], name="kda",
                     scale=op.attrs["scale"], l2norm_eps=m["qn"].attrs["eps"])
    rw.replace(dict(zip(op.outputs, outs)), erase=[op])
    return True


def _gated_where(g: Graph, m) -> bool:
    x = g.types[m["x"]]
    return g.types[m["gate"]] == x and g.types[m.root.outputs[0]] == x


def _fuse_gated_norm(m, rw) -> bool:
    out = rw.create1("gated_rmsnorm", m["x"], m["w"], m["gate"], like=m.root.outputs[0],
                     name="gated_norm", eps=m["norm"].attrs["eps"])
    rw.replace({m.root.outputs[0]: out}, erase=[m.root])
    return True


def _fuse_conv_silu(m, rw) -> bool:
    conv = m["conv"]
    outs = rw.create("causal_conv1d", *conv.inputs, like=m.root.outputs[0], name="conv",
                     activation="silu")
    rw.replace({m.root.outputs[0]: outs[0], conv.outputs[1]: outs[1]}, erase=[m.root, conv])
    return True


PATTERNS = [
    Pattern(KDA, _fuse_kda, _kda_where, "kda-gating"),
    Pattern(P("mul", P("rmsnorm", V("x"), V("w"), name="norm"), P("sigmoid", V("gate")),
              commutative=True), _fuse_gated_norm, _gated_where, "gated-rmsnorm"),
    Pattern(P("silu", P("causal_conv1d", name="conv", open=True, one_use=True,
                        attrs={"activation": "none"})), _fuse_conv_silu, name="conv-silu"),
]


@register_pass
class FuseKDAGating(PatternPass):
    name = "fuse-kda-gating"
    summary = "KDA decay/beta/L2-norm into kda_fused_recurrent; gated RMSNorm; conv+SiLU"
    leftover = ("kda_recurrent",)

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        return PATTERNS
