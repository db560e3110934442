"""The prefill flash-attention kernel as it was before the loop split (commit 306b59a,
lowering/triton/mla.py), kept only so bench/attention.py can time old against new in one run:
one loop over all of a query block's keys, every block masked by position (a `where` per score),
the scale multiplied into the scores, the PV product added to acc, query blocks in forward
order, int64 positions, k tiles loaded as [D piece, BN]. Its tiles are the sm_90 ones of that
commit (BEFORE)."""
from __future__ import annotations

import functools

from kimi_graph.lowering.triton import mla
from kimi_graph.lowering.triton.codegen import TL_DTYPES, KernelSpec, dot_pieces, dot_precision, launch, next_pow2, render
from kimi_graph.lowering.triton.elementwise import ir_dtype, ptr_type
from kimi_graph.lowering.triton.targets import current_target

BEFORE = {"BM": 128, "BN": 64, "num_warps": 8, "num_stages": 3}     # sm_90 at 306b59a

_FLASH = """
@triton.jit
def causal_attention_fwd(q_ptr, k_ptr, v_ptr, qs_ptr, o_ptr, T, S,
                         sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh):
    # grid (B * H, T blocks); online softmax over key blocks up to the block's last position
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    t = tl.program_id(1) * BM + tl.arange(0, BM)
    mt = t < T
    pos = tl.load(qs_ptr + b) + t
    dv = tl.arange(0, BDV)
    mdv = dv < DV
    qb = q_ptr + b * sqb + h * sqh + t[:, None] * sqt
    kb = k_ptr + b * skb + h * skh
    $load_q
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BDV), tl.float32)
    hi = tl.minimum(S, tl.max(tl.where(mt, pos, 0), 0) + 1)
    for j0 in range(0, hi, BN):
        j = j0 + tl.arange(0, BN)
        mj = j < hi
        $scores
        $online_softmax
        v = tl.load(v_ptr + b * svb + h * svh + j[:, None] * svs + dv[None, :], mask=mj[:, None] & mdv[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * sob + h * soh + t[:, None] * sot + dv[None, :], o.to(DT), mask=mt[:, None] & mdv[None, :])
"""


@functools.lru_cache(maxsize=None)
def flash_spec(H: int, D: int, DV: int, dtype: str, scale: float, target: str) -> KernelSpec:
    cfg = BEFORE
    pieces = dot_pieces(D)
    load_q, scores = [], []
    for i, (off, w) in enumerate(pieces):
        load_q.append(f"d{i} = {off} + tl.arange(0, {w})")
        load_q.append(f"q{i} = tl.load(qb + d{i}[None, :], mask=mt[:, None] & (d{i} < {D})[None, :], other=0.0)")
        scores.append(f"k{i} = tl.load(kb + j[None, :] * sks + d{i}[:, None], "
                      f"mask=mj[None, :] & (d{i} < {D})[:, None], other=0.0)")
    scores.append("s = " + " + ".join(f"tl.dot(q{i}, k{i}, input_precision=PREC)" for i in range(len(pieces))))
    consts = {"H": H, "DV": DV, "BDV": max(16, next_pow2(DV)), "BM": cfg["BM"], "BN": cfg["BN"],
              "SCALE_LOG2E": float(scale) * mla.LOG2E, "DT": TL_DTYPES[dtype], "PREC": dot_precision(dtype)}
    src = render("causal_attention_before", _FLASH, consts, load_q="\n".join(load_q), scores="\n".join(scores),
                 online_softmax=mla._ONLINE_SOFTMAX)
    p = ptr_type(dtype)
    sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "qs_ptr": "*i64", "o_ptr": p, "T": "i32", "S": "i32"}
    sig.update({n: "i32" for n in ("sqb", "sqt", "sqh", "skb", "sks", "skh", "svb", "svs", "svh",
                                   "sob", "sot", "soh")})
    return KernelSpec("causal_attention_before", "causal_attention_fwd", src, sig, cfg["num_warps"],
                      cfg["num_stages"], consts)


def causal_attention(q, k, v, q_start=None, *, scale):
    """q [B,T,H,D], k [B,S,H,D], v [B,S,H,Dv] (unit last dims) -> [B,T,H,Dv], the previous kernel."""
    import torch
    B, T, H, D = q.shape
    S, DV = k.shape[1], v.shape[3]
    spec = flash_spec(H, D, DV, ir_dtype(q), float(scale), current_target())
    o = torch.empty(B, T, H, DV, device=q.device, dtype=q.dtype)
    qs = mla._q_start(q_start, B, T, S, q.device)
    strides = [st for t in (q, k, v, o) for st in (t.stride(0), t.stride(1), t.stride(2))]
    launch(spec, (B * H, -(-T // spec.config["BM"])), q, k, v, qs, o, T, S, *strides)
    return o
