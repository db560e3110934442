"""absorb-mla{mode=auto|per-head|fold}: decode-time MLA attends in latent space.

Matched: causal_attention(q, concat(k_nope, expand(reshape(rope_key))), v) with k_nope / v
slices of reshape(linear(latent, W_kv_b)) -- the decompressed form, which up-projects every
cached token each step. With W_kv_b's head blocks Wk_h [N,R] and Wv_h [V,R]:

    q_lat_h = Wk_h^T q_nope_h                            (scores: q_nope.k_nope = q_lat.latent)
    o_lat   = mla_latent_attention(q_lat, q_rope, latent, rope_key, q_start?)   [B,T,H,R]
    o_h     = Wv_h o_lat_h                               (the value up-projection, once)

Each side is either applied per head (head_matmul with Wk [H,N,R] / Wv^T [H,R,V]) or folded
into its neighbouring projection: q_proj -> "<q_proj>.absorbed" [H(R+P), D] (rows per head:
Wk_h^T Wq_nope_h, then Wq_rope_h), o_proj -> "<o_proj>.absorbed" [D, HR] (blocks Wo_h Wv_h).
`mode=auto` picks, per side, the variant that reads fewer weight bytes per decode step;
the choice and both byte counts are recorded in the graph's meta ("absorb_mla"), and the
absorbed weights appear as parameters once fold-constants has run (the transforms are
parameter-only ops, in fp32 at least). Prefill graphs (T > 1) keep the decompressed form.
"""
from __future__ import annotations

from kimi_graph.ir import DTYPE_BYTES, Graph, Op

from .manager import Option, PassContext, register_pass
from .rewrite import Alt, P, Pattern, PatternPass, Rewriter, V, only_user

KV = P("reshape", P("linear", V("latent"), V("w_kv"), name="kv_b"), name="kv")
KR = P("reshape", V("rope_key"), name="kr_view")            # [B,S,P] -> [B,S,1,P]
ATTN = P("causal_attention", V("q"),
         P("concat", P("slice", KV, name="k_nope"), Alt(P("expand", KR), KR), name="k"),
         P("slice", KV, name="v"), open=True)                # (one head: no expand left)


def _last(g: Graph, v: str, d: int) -> bool:
    return d % g.types[v].rank == g.types[v].rank - 1


def _dims(g: Graph, m) -> tuple | None:
    """(H, N, P, V, R) if the match is the MLA decompressed form, else None."""
    q, lat, rk, w = (g.types[m[n]] for n in ("q", "latent", "rope_key", "w_kv"))
    if q.rank != 4 or lat.rank != 3 or rk.rank != 3 or w.rank != 2 or q.shape[1] != 1:
        return None                                  # decode only: one query per sequence
    H, R, P_ = q.shape[2], lat.shape[2], rk.shape[2]
    kn, vs = m["k_nope"].attrs, m["v"].attrs
    kv = m["kv"].outputs[0]
    if not (_last(g, kv, kn["dim"]) and _last(g, kv, vs["dim"]) and kn["start"] == 0
            and vs["start"] == kn["end"] and _last(g, m["k"].outputs[0], m["k"].attrs["dim"])
            and m["k"].inputs[0] == m["k_nope"].outputs[0]):
        return None
    N, V_ = kn["end"], vs["end"] - vs["start"]
    if not all(isinstance(d, int) for d in (H, R, P_, N, V_)) or q.shape[3] != N + P_ \
            or g.types[kv].shape[2:] != (H, N + V_) or w.shape != (H * (N + V_), R) \
            or g.types[m["kr_view"].outputs[0]].shape[2] != 1:
        return None
    return H, N, P_, V_, R


class _Weights:
    """Parameter-only transform ops over W_kv_b (and q_proj / o_proj); products in >= fp32."""

    def __init__(self, rw: Rewriter, w_kv: str, dims):
        self.rw, self.w_kv, (self.H, self.N, self.P, self.V, self.R) = rw, w_kv, dims
        self.dtype = rw.type(w_kv).dtype
        self.base = w_kv.lstrip("%@").removesuffix(".weight")
        self._blocks = None

    def _op(self, kind: str, *ins: str, name: str, **attrs) -> str:
        return self.rw.create1(kind, *ins, name=name, **attrs)

    def _up(self, v: str) -> str:
        if self.rw.type(v).dtype in ("f32", "f64"):
            return v
        return self._op("cast", v, name=v.lstrip("%@") + ".f32", dtype="f32")

    def _flat(self, v: str, shape: list, name: str) -> str:
        """reshape to `shape` named `name`, cast back to the weight dtype if computed wider."""
        if self.rw.type(v).dtype == self.dtype:
            return self._op("reshape", v, name=name, shape=shape)
        flat = self._op("reshape", v, name=name + "_f32", shape=shape)
        return self._op("cast", flat, name=name, dtype=self.dtype)

    def blocks(self) -> str:                                   # [H, N+V, R]
        if self._blocks is None:
            self._blocks = self._op("reshape", self.w_kv, name=self.base + ".heads",
                                    shape=[self.H, self.N + self.V, self.R])
        return self._blocks

    def wk(self, name: str = ".k_absorb") -> str:              # [H, N, R]
        return self._op("slice", self.blocks(), name=self.base + name, dim=1, start=0, end=self.N)

    def wv(self) -> str:                                       # [H, V, R]
        return self._op("slice", self.blocks(), name=self.base + ".v_heads", dim=1,
                        start=self.N, end=self.N + self.V)

    def wv_t(self) -> str:                                     # [H, R, V]
        return self._op("transpose", self.wv(), name=self.base + ".v_absorb", perm=[0, 2, 1])

    def q_folded(self, wq: str) -> str:                        # [H (R+P), D]
        H, N, P_, R = self.H, self.N, self.P, self.R
        D = self.rw.type(wq).shape[1]
        name = wq.lstrip("%@").removesuffix(".weight")
        wq3 = self._op("reshape", self._up(wq), name=name + ".heads", shape=[H, N + P_, D])
        nope = self._op("slice", wq3, name=name + ".nope", dim=1, start=0, end=N)
        rope = self._op("slice", wq3, name=name + ".rope", dim=1, start=N, end=N + P_)
        wk_t = self._op("transpose", self._up(self.wk(".k_heads")), name=self.base + ".k_t",
                        perm=[0, 2, 1])
        lat = self._op("matmul", wk_t, nope, name=name + ".latent")                # [H, R, D]
        both = self._op("concat", lat, rope, name=name + ".heads_absorbed", dim=1)
        return self._flat(both, [H * (R + P_), D], name + ".absorbed")

    def o_folded(self, wo: str) -> str:                        # [D, H R]
        H, V_, R = self.H, self.V, self.R
        D = self.rw.type(wo).shape[0]
        name = wo.lstrip("%@").removesuffix(".weight")
        wo3 = self._op("reshape", self._up(wo), name=name + ".heads", shape=[D, H, V_])
        wo_h = self._op("transpose", wo3, name=name + ".per_head", perm=[1, 0, 2])  # [H, D, V]
        prod = self._op("matmul", wo_h, self._up(self.wv()), name=name + ".latent")  # [H, D, R]
        back = self._op("transpose", prod, name=name + ".latent_t", perm=[1, 0, 2])   # [D, H, R]
        return self._flat(back, [D, H * R], name + ".absorbed")


def _q_projection(g: Graph, q: str) -> tuple[str, str] | None:
    """(x, Wq) when q = reshape(linear(x, @Wq)), so Wk can fold into Wq."""
    view = g.defining_op(q)
    lin = g.defining_op(view.inputs[0]) if view is not None and view.kind == "reshape" else None
    if lin is None or lin.kind != "linear" or lin.inputs[1] not in g.params:
        return None
    B, T, H, NP = g.types[q].shape                     # the reshape splits the last dim only
    if g.types[lin.outputs[0]].shape != (B, T, H * NP):
        return None
    return lin.inputs[0], lin.inputs[1]


def _o_projection(g: Graph, o: str, H: int, V_: int) -> tuple[Op, Op] | None:
    """(reshape, linear) when o [B,T,H,V] -> reshape [B,T,H V] -> linear(@Wo) only."""
    view = only_user(g, o, "reshape")
    lin = only_user(g, view.outputs[0], "linear") if view is not None else None
    if lin is None or lin.inputs[0] != view.outputs[0] or lin.inputs[1] not in g.params \
            or g.types[view.outputs[0]].shape != g.types[o].shape[:2] + (H * V_,):
        return None
    return view, lin


def _choose(mode: str, weight_bytes: dict) -> str:
    """per-head or fold: as forced by `mode`, else the one reading fewer bytes (ties: per-head)."""
    fold = weight_bytes["fold"]
    if fold is None or mode == "per-head":
        return "per-head"
    return "fold" if mode == "fold" or fold < weight_bytes["per-head"] else "per-head"


def _absorb(m, rw: Rewriter, mode: str, ctx: PassContext) -> bool:
    g, attn = rw.g, m.root
    dims = _dims(g, m)
    if dims is None:
        return False
    H, N, P_, V_, R = dims
    nb = DTYPE_BYTES[g.types[m["w_kv"]].dtype]
    W = _Weights(rw, m["w_kv"], dims)
    q, out = m["q"], attn.outputs[0]
    lead = list(g.types[q].shape[:3])
    # bytes of weights read per decode step, per side and variant
    q_src, o_dst = _q_projection(g, q), _o_projection(g, out, H, V_)
    q_bytes = {"per-head": (g.types[q_src[1]].numel() if q_src else 0) * nb + H * N * R * nb,
               "fold": H * (R + P_) * g.types[q_src[1]].shape[1] * nb if q_src else None}
    o_bytes = {"per-head": (g.types[o_dst[1].inputs[1]].numel() if o_dst else 0) * nb + H * R * V_ * nb,
               "fold": g.types[o_dst[1].inputs[1]].shape[0] * H * R * nb if o_dst else None}
    q_way, o_way = _choose(mode, q_bytes), _choose(mode, o_bytes)
    if q_way == "fold":
        x, wq = q_src
        qa = rw.create1("reshape", rw.create1("linear", x, W.q_folded(wq), like=q, name="q_absorbed"),
                        like=q, name="q_absorbed", shape=lead + [R + P_])
        q_lat = rw.create1("slice", qa, like=q, name="q_latent", dim=3, start=0, end=R)
        q_rope = rw.create1("slice", qa, like=q, name="q_rope", dim=3, start=R, end=R + P_)
    else:
        nope = rw.create1("slice", q, like=q, name="q_nope", dim=3, start=0, end=N)
        q_rope = rw.create1("slice", q, like=q, name="q_rope", dim=3, start=N, end=N + P_)
        q_lat = rw.create1("head_matmul", nope, W.wk(), like=q, name="q_latent")
    o_lat = rw.create1("mla_latent_attention", q_lat, q_rope, m["latent"], m["rope_key"],
                       *attn.inputs[3:], like=out, name="attn_latent", scale=attn.attrs["scale"])
    if o_way == "fold":
        view, lin = o_dst
        flat = rw.create1("reshape", o_lat, like=out, name="o_latent", shape=lead[:2] + [H * R])
        new = rw.create1("linear", flat, W.o_folded(lin.inputs[1]), like=lin.outputs[0], name="out")
        rw.replace({lin.outputs[0]: new}, erase=[lin, view, attn])
    else:
        rw.replace({out: rw.create1("head_matmul", o_lat, W.wv_t(), like=out, name="attn")},
                   erase=[attn])
    key = out.lstrip("%").rsplit(".", 1)[0] if "." in out else out
    g.meta["absorb_mla"] = {**g.meta.get("absorb_mla", {}), key: {
        "q": q_way, "o": o_way, "q_weight_bytes": q_bytes, "o_weight_bytes": o_bytes}}
    ctx.stat(f"q-{q_way}")
    ctx.stat(f"o-{o_way}")
    return True


@register_pass
class AbsorbMLA(PatternPass):
    name = "absorb-mla"
    summary = "decode MLA in latent space: absorbed up-projections, cache read as is"
    options = {"mode": Option(str, "auto", "per-head | fold | auto (fewer weight bytes per step)",
                              ("auto", "per-head", "fold"))}

    def patterns(self, ctx: PassContext) -> list[Pattern]:
        mode = ctx.options["mode"]
        return [Pattern(ATTN, lambda m, rw: _absorb(m, rw, mode, ctx), name="mla-absorbed")]
