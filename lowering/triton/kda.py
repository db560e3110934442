"""KDA kernels: chunkwise prefill (generated kernels) and the recurrent step (decode).

Both take packed tokens [N_tok, H, *] with cumulative sequence offsets `cu_seqlens` [N+1]
(a [B, T] batch is B sequences of T). FUSED kernels compute the gating inside:
g = -exp(A_log) * softplus(f + dt_bias), beta = sigmoid(b), q and k L2-normalised; the
unfused variant (the `kda_recurrent` op) reads g, beta and normalised q, k.

Chunk form: the op library's chunk_form (kimi_graph/ops/kda.py), chunk BT, sub-chunk BC (its
SUB), per chunk with cumulative decay G_i = exp(gc_i):
  prep:  gating, norms, gc, scale q G, beta k G, k G_L/G
  diag:  (token-parallel, one program per row and BH heads) the diagonal BC x BC blocks of
         A_kk[i,j] = beta_i sum_d k_id k_jd G_id/G_jd (j < i) and A_qk[i,j] = scale q_i.k_j G_i/G_j
         (j <= i), elementwise over K with exp(gc_i - gc_j) <= 1
  intra: the off-diagonal blocks (tensor-core products), T = (I + A_kk)^-1 once per chunk
  wu:    W = T (beta k G), U = T (beta v), one program per column block
  scan over chunks: V' = U - W S;  O = (scale q G) S + A_qk V';  S = G_L S + (k G_L/G)^T V'
The target's `diag` / `wu` modes may instead compute the diagonal blocks a sub-chunk per program
("block") or inside prep ("prep"), keep them ("levels", "intra") or W and U ("fused") inside the
intra kernel. G_i/G_j is never formed from G alone: every off-diagonal
product factors through a reference row between j and i (both factors <= 1; see
_products_source).
"""
from __future__ import annotations

import collections
import functools
import weakref
from dataclasses import dataclass

import torch

from kimi_graph.runtime.views import SlotRows

from .codegen import PTR_TYPES, TL_DTYPES, KernelSpec, dot_precision, launch, next_pow2, render
from .targets import config, current_target

_STATE_IN = """
# the (sequence, head) state tile [K, BV], fp32, zeros without an initial state; sequence s
# keeps its state at row slot[s] of the state storage (in place when s0 and sn are one);
# a padding row (slot -1) starts from zeros and stores nothing
srow = tl.load(slot_ptr + s)
soff = ((tl.maximum(srow, 0) * H + h) * K + dk[:, None]) * V + dv[None, :]
smask = (mk & (dk * 0 + srow >= 0))[:, None] & mv[None, :]
if HAS_STATE:
    S = tl.load(s0_ptr + soff, mask=smask, other=0.0)
else:
    S = tl.zeros((BK, BV), tl.float32)
"""

_GATE = """
@triton.jit
def kda_l2norm(x, AXIS: tl.constexpr):
    # x / sqrt(sum x^2 + eps) along AXIS (q and k of the fused gating)
    return x * tl.expand_dims(1.0 / tl.sqrt(tl.sum(x * x, AXIS) + EPS), AXIS)


@triton.jit
def kda_decay(x, a_log):
    # g = -exp(A_log) * softplus(x), x = f + dt_bias in fp32; softplus as torch computes it
    # (x itself above 20, a series below y = e^x < 1e-2)
    y = tl.exp(tl.minimum(x, 20.0))
    sp = tl.where(x > 20.0, x, tl.where(y < 1e-2, y * (1.0 - y * (0.5 - y * (0.3333333333 - y * 0.25))),
                                        tl.log(1.0 + y)))
    return -tl.exp(a_log) * sp
"""

_EXP = """
@triton.jit
def kda_exp(x):
    # e^x of the chunk kernels: ex2.approx.ftz of x log2(e) (FTZ_EXP: two instructions; results
    # below 2^-126 flush to zero), else tl.exp (ex2.approx with its subnormal range fix-up)
    if FTZ_EXP:
        return tl.math.exp2(x * 1.4426950408889634)
    else:
        return tl.exp(x)
"""

_CONV = """
@triton.jit
def kda_conv(x_ptr, w_ptr, s_ptr, srow, tok, pos, ch, rm, mc, xs, C: tl.constexpr, NCOL: tl.constexpr):
    # SiLU of the causal depthwise conv (CW taps, weights [C, CW]) at rows tok, positions pos of
    # their sequence, channels ch of x (rows xs apart), rounded to DT as the conv kernel stores
    # it; taps before the sequence's start read the carried state's row srow [C, CW - 1] (zeros
    # without a state or for a padding row, srow < 0)
    acc = tl.zeros((PR, NCOL), tl.float32)
    xrow = x_ptr + tok.to(tl.int64) * xs
    srp = s_ptr + tl.maximum(srow, 0) * C * (CW - 1)
    for i in tl.static_range(CW):
        back = CW - 1 - i
        wi = tl.load(w_ptr + ch * CW + i, mask=mc, other=0.0).to(tl.float32)
        if CONV_STATE and back > 0:     # a row before the window fills reads the state's column, one load
            inside = pos >= back
            base = tl.where(inside, xrow - back * xs, srp + (pos + CW - 1 - back))
            step = tl.where(inside, 1, CW - 1)
            m = rm & (inside | (pos * 0 + srow >= 0))
            xv = tl.load(base[:, None] + ch[None, :] * step[:, None], mask=m[:, None] & mc[None, :], other=0.0)
        else:
            xv = tl.load(xrow[:, None] + (ch[None, :] - back * xs), mask=(rm & (pos >= back))[:, None] & mc[None, :],
                         other=0.0)
        acc += xv.to(tl.float32) * wi[None, :]
    acc = acc / (1.0 + tl.exp(-acc))
    return acc.to(DT).to(tl.float32)
"""

_PREP = _GATE + _EXP + """

$conv_fn
@triton.jit
def kda_chunk_prep(q_ptr, k_ptr, f_ptr, b_ptr, a_ptr, dt_ptr, chunk_start, chunk_len,
                   qn_ptr, kn_ptr, gc_ptr, beta_ptr, qg_ptr, bkg_ptr, kg_ptr, gl_ptr$diag_args$conv_args):
    # one program per (chunk, head): gating, norms, cumulative decay, PR rows at a time; writes
    # q, k normalised, G, beta, scale q G, beta k G (the W solve's right side), k G_L/G; with
    # diag "prep" (PR = BC) also each sub-chunk's diagonal blocks, from the rows just stored;
    # with the conv (CW > 0) q, k, v are SiLU(conv) of the projections' rows, v stored for the rest
    c = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(chunk_start + c)
    n = tl.load(chunk_len + c)
    dk = tl.arange(0, BK)
    mk = dk < K
    cc = tl.arange(0, PR)
    $conv_setup
    if FUSED:
        dt = tl.load(dt_ptr + h * K + dk, mask=mk, other=0.0)[None, :]
        a_log = tl.load(a_ptr + h)
    $total
    carry = tl.zeros((BK,), tl.float32)
    for i0 in range(0, BT, PR):
        rm = i0 + cc < n
        tok = start + i0 + cc
        m2 = rm[:, None] & mk[None, :]
        offk = tok[:, None] * (H * K) + h * K + dk[None, :]
        $qk_in
        g = tl.load(f_ptr + offk, mask=m2, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + tok * H + h, mask=rm, other=0.0).to(tl.float32)
        if FUSED:
            q = kda_l2norm(q, 1)
            k = kda_l2norm(k, 1)
            g = kda_decay(g + dt, a_log)
            beta = tl.sigmoid(beta)
        g = tl.where(m2, g, 0.0)
        gc = tl.cumsum(g, 0) + carry[None, :]
        carry += tl.sum(g, 0)
        tl.store(qn_ptr + offk, q.to(DT), mask=m2)
        tl.store(kn_ptr + offk, k.to(DT), mask=m2)
        tl.store(gc_ptr + offk, gc, mask=m2)
        tl.store(beta_ptr + tok * H + h, beta, mask=rm)
        eg = kda_exp(gc)
        tl.store(qg_ptr + offk, (q * eg * SCALE).to(DT), mask=m2)
        tl.store(bkg_ptr + offk, (k.to(DT).to(tl.float32) * eg * beta[:, None]).to($bkg_dt), mask=m2)
        $kg_here
        $diag_here
    $v_conv
    tl.store(gl_ptr + (c * H + h) * K + dk, kda_exp(carry), mask=mk)
    $kg_after
"""

# the prep kernel's inputs: q, k as given, or ("conv") SiLU(conv) of the projections' rows (xs apart;
# the chunk's sequence and its first position from chunk_seq and cu), v's too, stored in vc
_PREP_IN = {"plain": {"conv_fn": "", "conv_args": "", "conv_setup": "", "v_conv": "",
                      "qk_in": "q = tl.load(q_ptr + offk, mask=m2, other=0.0).to(tl.float32)\n"
                               "k = tl.load(k_ptr + offk, mask=m2, other=0.0).to(tl.float32)"},
            "conv": {"conv_fn": _CONV,
                     "conv_args": ", xv_ptr, wq_ptr, wk_ptr, wv_ptr, sq_ptr, sk_ptr, sv_ptr, slq_ptr, slk_ptr, "
                                  "slv_ptr, chunk_seq, cu_ptr, vc_ptr, xs",
                     "conv_setup": """
seq = tl.load(chunk_seq + c)
p0 = start - tl.load(cu_ptr + seq)
rq = tl.load(slq_ptr + seq)
rk = tl.load(slk_ptr + seq)
rv = tl.load(slv_ptr + seq)
dvv = tl.arange(0, BVV)
mvv = dvv < V
""",
                     "qk_in": "pos = p0 + i0 + cc\n"
                              "q = kda_conv(q_ptr, wq_ptr, sq_ptr, rq, tok, pos, h * K + dk, rm, mk, xs, H * K, BK)\n"
                              "k = kda_conv(k_ptr, wk_ptr, sk_ptr, rk, tok, pos, h * K + dk, rm, mk, xs, H * K, BK)",
                     "v_conv": """
for i0 in range(0, BT, PR):     # v's rows, after q and k's (fewer registers live at once)
    rm = i0 + cc < n
    tok = start + i0 + cc
    v = kda_conv(xv_ptr, wv_ptr, sv_ptr, rv, tok, p0 + i0 + cc, h * V + dvv, rm, mvv, xs, H * V, BVV)
    tl.store(vc_ptr + tok[:, None] * (H * V) + h * V + dvv[None, :], v.to(DT), mask=rm[:, None] & mvv[None, :])
"""}}

# k G_L/G needs the chunk's total decay G_L: a second pass over the stored k and G once the
# first has summed it ("reload"), a first pass that sums the decay alone from f, so k G_L/G
# is stored with the rest ("prepass": reads f twice instead of k and G once more), or the whole
# chunk in one step ("inline": prep's rows a step are BT; G_L is known once its rows are summed),
# or none, the intra kernel storing it from the k and G rows it loads anyway ("intra")
_PREP_KG = {"intra": {"total": "", "kg_here": "", "kg_after": ""},
            "inline": {"total": "", "kg_after": "",
                       "kg_here": "tl.store(kg_ptr + offk, (k * kda_exp(tl.where(m2, carry[None, :] - gc, 0.0))).to(DT), "
                                  "mask=m2)"},
            "reload": {"total": "", "kg_here": "", "kg_after": """
tl.debug_barrier()
for i0 in range(0, BT, PR):
    rm = i0 + cc < n
    m2 = rm[:, None] & mk[None, :]
    offk = (start + i0 + cc)[:, None] * (H * K) + h * K + dk[None, :]
    k = tl.load(kn_ptr + offk, mask=m2, other=0.0).to(tl.float32)
    gc = tl.load(gc_ptr + offk, mask=m2, other=0.0)
    tl.store(kg_ptr + offk, (k * kda_exp(tl.where(m2, carry[None, :] - gc, 0.0))).to(DT), mask=m2)
"""}, "prepass": {"total": """
total = tl.zeros((BK,), tl.float32)
for i0 in range(0, BT, PR):
    m2 = (i0 + cc < n)[:, None] & mk[None, :]
    g = tl.load(f_ptr + (start + i0 + cc)[:, None] * (H * K) + h * K + dk[None, :], mask=m2, other=0.0)
    g = g.to(tl.float32)
    if FUSED:
        g = kda_decay(g + dt, a_log)
    total += tl.sum(tl.where(m2, g, 0.0), 0)
""", "kg_here": "tl.store(kg_ptr + offk, (k * kda_exp(tl.where(m2, total[None, :] - gc, 0.0))).to(DT), mask=m2)",
    "kg_after": ""}}

_DIAG = _EXP + """

@triton.jit
def kda_chunk_diag(qn_ptr, kn_ptr, gc_ptr, beta_ptr, chunk_start, chunk_len, aqk_ptr, akd_ptr):
    # one program per (row of a chunk, BH heads), token-parallel: the row's part of the diagonal
    # BC x BC blocks, elementwise over K (no tensor cores): A_qk[i, j] = scale q_i.k_j G_i/G_j and
    # A_kk[i, j] = beta_i k_i.k_j G_i/G_j for the columns j <= i of its sub-chunk (exp of a masked
    # difference: the factor is <= 1); A_qk into its columns of aqk, A_kk into akd [N_tok, H, BC].
    # Columns by a loop over j <= i, or unrolled over all BC (loads issued together; j > i reads
    # row i and is dropped)
    pid = tl.program_id(0)
    c = pid // BT
    r = pid % BT
    if r >= tl.load(chunk_len + c):
        return
    start = tl.load(chunk_start + c)
    tok = start + r
    j0 = start + (r // BC) * BC
    hh = tl.program_id(1) * BH + tl.arange(0, BH)
    mh = hh < H
    dk = tl.arange(0, BK)
    m2 = mh[:, None] & (dk < K)[None, :]
    off = hh[:, None] * K + dk[None, :]
    qi = tl.load(qn_ptr + tok * (H * K) + off, mask=m2, other=0.0).to(tl.float32)
    ki = tl.load(kn_ptr + tok * (H * K) + off, mask=m2, other=0.0).to(tl.float32)
    gi = tl.load(gc_ptr + tok * (H * K) + off, mask=m2, other=0.0)
    cols = tl.arange(0, BC)
    bi = tl.load(beta_ptr + tok * H + hh, mask=mh, other=0.0)
    arow = aqk_ptr + tok * (H * BT) + hh * BT + (j0 - start)
    krow = akd_ptr + tok * (H * BC) + hh * BC
    $columns
"""

# the diagonal kernel's column body: each column's sums into a [BH, BC] tile, stored once
# ("row"), or each column stored as it is summed, the columns right of the diagonal zeroed
# first ("column": no tile to gather the sums into)
_DIAG_STORE = {"row": """
aq = tl.zeros((BH, BC), tl.float32)
ak = tl.zeros((BH, BC), tl.float32)
$loop
    kj = tl.load(kn_ptr + j * (H * K) + off, mask=m2, other=0.0).to(tl.float32)
    kgj = kj * kda_exp(gi - tl.load(gc_ptr + j * (H * K) + off, mask=m2, other=0.0))
    at = (cols[None, :] == jj) & (cols[None, :] <= tok - j0)
    aq = tl.where(at, tl.sum(qi * kgj, 1)[:, None], aq)
    ak = tl.where(at & (cols[None, :] < tok - j0), tl.sum(ki * kgj, 1)[:, None], ak)
tl.store(arow[:, None] + cols[None, :], (aq * SCALE).to(DT), mask=mh[:, None])
tl.store(krow[:, None] + cols[None, :], ak * bi[:, None], mask=mh[:, None])
""", "column": """
past = mh[:, None] & (cols[None, :] > tok - j0)
tl.store(arow[:, None] + cols[None, :], tl.zeros((BH, BC), DT), mask=past)
tl.store(krow[:, None] + cols[None, :], tl.zeros((BH, BC), tl.float32), mask=past)
ki = ki * bi[:, None]
$loop
    kj = tl.load(kn_ptr + j * (H * K) + off, mask=m2, other=0.0).to(tl.float32)
    kgj = kj * kda_exp(gi - tl.load(gc_ptr + j * (H * K) + off, mask=m2, other=0.0))
    jv = hh * 0 + jj
    mj = mh & (jv <= tok - j0)
    tl.store(arow + jj, (tl.sum(qi * kgj, 1) * SCALE).to(DT), mask=mj)
    tl.store(krow + jj, tl.where(jv < tok - j0, tl.sum(ki * kgj, 1), 0.0), mask=mj)
"""}

_DIAG_BLOCK = _EXP + """

@triton.jit
def kda_chunk_diag_block(qn_ptr, kn_ptr, gc_ptr, beta_ptr, chunk_start, chunk_len, aqk_ptr, akd_ptr):
    # one program per (sub-chunk, head): its diagonal BC x BC blocks (_diag_block_source)
    pid = tl.program_id(0)
    c = pid // NC
    i0 = (pid % NC) * BC
    n = tl.load(chunk_len + c)
    if i0 >= n:
        return
    h = tl.program_id(1)
    start = tl.load(chunk_start + c)
    s0 = start + i0
    nb = n - i0
    dk = tl.arange(0, BK)
    mk = dk < K
    $block
"""


def _diag_block_source(BC: int) -> str:
    """The diagonal BC x BC blocks of A_qk and A_kk of one sub-chunk (rows s0 .., nb of them
    real; chunk from `start`; head h) as kda_chunk_diag computes them, a column at a time over
    all rows of a [rows, K] register tile: exp of the masked difference G_i - G_j (-inf above
    the diagonal), so each row's entry is a sum over K; the columns gathered into a [rows, BC]
    tile, stored once. The later half's columns take the later half's rows alone (rows above
    are zeros): 3/4 of the exponentials of the whole square. Reads q, k, G, beta as stored
    (rows and the column rows, loaded into every row, hit the cache)."""
    half = BC // 2
    L = ["cb = tl.arange(0, BC)[None, :]"]
    for r0, cols, keep in ((0, range(0, half), f"(cb < {half}) | (rb < {half})[:, None]"),
                           (half, range(half, BC), f"cb >= {half}")):
        L += [f"rb = {r0} + tl.arange(0, {BC - r0})", "mb = rb < nb", "mb2 = mb[:, None] & mk[None, :]",
              "ob = (s0 + rb)[:, None] * (H * K) + h * K + dk[None, :]",
              "qb = tl.load(qn_ptr + ob, mask=mb2, other=0.0).to(tl.float32)",
              "kb = tl.load(kn_ptr + ob, mask=mb2, other=0.0).to(tl.float32)",
              "gb = tl.load(gc_ptr + ob, mask=mb2, other=0.0)",
              f"aq = tl.zeros(({BC - r0}, BC), tl.float32)", f"ak = tl.zeros(({BC - r0}, BC), tl.float32)",
              f"for j in tl.static_range({cols.start}, {cols.stop}):",
              "    mj = mb2 & (rb >= j)[:, None]",       # row j's K values, loaded into every row (cache hits)
              "    oj = ob + (j - rb)[:, None] * (H * K)",
              "    kj = tl.load(kn_ptr + oj, mask=mj, other=0.0).to(tl.float32)",
              "    kgj = kj * kda_exp(tl.where(mj, gb - tl.load(gc_ptr + oj, mask=mj, other=0.0), float('-inf')))",
              "    aq = tl.where(cb == j, tl.sum(qb * kgj, 1)[:, None], aq)",
              "    ak = tl.where(cb == j, tl.sum(kb * kgj, 1)[:, None], ak)",
              "bb = tl.load(beta_ptr + (s0 + rb) * H + h, mask=mb, other=0.0)",
              f"mo = mb[:, None] & ({keep})",
              "oo = (s0 + rb)[:, None] * H + h",
              "tl.store(aqk_ptr + oo * BT + (s0 - start) + cb, (aq * SCALE).to(DT), mask=mo)",
              "tl.store(akd_ptr + oo * BC + cb, tl.where(rb[:, None] > cb, ak * bb[:, None], 0.0), mask=mo)"]
    return "\n".join(L)


def _diag_rows_source(BC: int) -> str:
    """The same blocks row by row, without an exponential per pair: for row i, P[j] = G_i/G_j
    (j <= i) is P of row i-1 times row i's own decay exp(G_i - G_{i-1}) <= 1, the entry of column
    i set to 1; so BC*K exponentials a sub-chunk instead of 3/4 BC*BC*K. Columns in two halves
    (the earlier half's P from row 0, the later's from row BC/2), each row's sums stored as they
    come (zeros right of the diagonal, and on it for A_kk)."""
    half = BC // 2
    L = [f"ra = tl.arange(0, {half})"]
    for c, c0 in (("a", 0), ("b", half)):
        L += [f"o{c} = (s0 + {c0} + ra)[:, None] * (H * K) + h * K + dk[None, :]",
              f"k{c} = tl.load(kn_ptr + o{c}, mask=({c0} + ra < nb)[:, None] & mk[None, :], other=0.0).to(tl.float32)",
              f"P{c} = tl.zeros(({half}, BK), tl.float32)"]
    L.append("gp = tl.load(gc_ptr + s0 * (H * K) + h * K + dk, mask=mk & (dk * 0 < nb), other=0.0)")
    for i in range(BC):
        cs = ("a",) if i < half else ("a", "b")
        L += [f"mi = mk & (dk * 0 + {i} < nb)", f"oi = (s0 + {i}) * (H * K) + h * K + dk",
              "gi = tl.load(gc_ptr + oi, mask=mi, other=0.0)",
              "qi = tl.load(qn_ptr + oi, mask=mi, other=0.0).to(tl.float32)",
              "ki = tl.load(kn_ptr + oi, mask=mi, other=0.0).to(tl.float32)",
              "d = kda_exp(tl.where(mi, gi - gp, 0.0))", "gp = tl.where(mi, gi, gp)",
              f"bi = tl.load(beta_ptr + (s0 + {i}) * H + h + ra * 0, mask=ra * 0 + {i} < nb, other=0.0)",
              f"orow = ((s0 + {i}) * H + h)"]
        for c in cs:
            c0 = 0 if c == "a" else half
            L += [f"P{c} = P{c} * d[None, :]"]
            if c0 <= i < c0 + half:
                L.append(f"P{c} = tl.where((ra == {i - c0})[:, None], 1.0, P{c})")
            L += [f"t = k{c} * P{c}", f"mo = (ra * 0 + {i} < nb)",
                  f"tl.store(aqk_ptr + orow * BT + (s0 - start) + {c0} + ra, (tl.sum(t * qi[None, :], 1) * SCALE).to(DT), mask=mo)",
                  f"tl.store(akd_ptr + orow * BC + {c0} + ra, tl.where({c0} + ra < {i}, tl.sum(t * ki[None, :], 1) * bi, 0.0), "
                  "mask=mo)"]
        if i < half:        # the later half's columns of an earlier row: zeros
            L += [f"tl.store(aqk_ptr + orow * BT + (s0 - start) + {half} + ra, tl.zeros(({half},), DT), mask=ra * 0 + {i} < nb)",
                  f"tl.store(akd_ptr + orow * BC + {half} + ra, tl.zeros(({half},), tl.float32), mask=ra * 0 + {i} < nb)"]
    return "\n".join(L)


_DIAG_FORMS = {"columns": _diag_block_source, "rows": _diag_rows_source}


_INTRA = _EXP + """

@triton.jit
def kda_chunk_intra(qn_ptr, kn_ptr, gc_ptr, beta_ptr, bkg_ptr, v_ptr, akd_ptr, chunk_start, chunk_len,
                    aqk_ptr, w_ptr, u_ptr, t_ptr, kg_ptr):
    # one program per (chunk, head): A_kk and A_qk by BC x BC blocks in KH-wide slices of K (the
    # diagonal blocks here or from kda_chunk_diag), T = (I + A_kk)^-1 once; then W = T (beta k G)
    # and U = T (beta v) by BW-wide column blocks, or T stored for kda_chunk_wu
    c = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(chunk_start + c)
    n = tl.load(chunk_len + c)
    cc = tl.arange(0, BC)
    dkh = tl.arange(0, KH)
    dw = tl.arange(0, BW)
    $body
"""

_WU = """
@triton.jit
def kda_chunk_wu(t_ptr, bkg_ptr, v_ptr, beta_ptr, chunk_start, chunk_len, w_ptr, u_ptr):
    # one program per (chunk, head, BW-wide column block of W, then of U): W = T (beta k G),
    # U = T (beta v), one BT x BT by BT x BW product with T = (I + A_kk)^-1 from kda_chunk_intra
    c = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2)
    start = tl.load(chunk_start + c)
    n = tl.load(chunk_len + c)
    r = tl.arange(0, BT)
    rm = r < n
    tok = start + r
    t = tl.load(t_ptr + tok[:, None] * (H * BT) + h * BT + r[None, :], mask=rm[:, None], other=0.0)
    if p < NW:
        col = p * BW + tl.arange(0, BW)
        m2 = rm[:, None] & (col < K)[None, :]
        off = tok[:, None] * (H * K) + h * K + col[None, :]
        x = tl.load(bkg_ptr + off, mask=m2, other=0.0).to(tl.float32)
        tl.store(w_ptr + off, tl.dot(t, x, input_precision=PREC).to(DT), mask=m2)
    else:
        col = (p - NW) * BW + tl.arange(0, BW)
        m2 = rm[:, None] & (col < V)[None, :]
        off = tok[:, None] * (H * V) + h * V + col[None, :]
        x = tl.load(v_ptr + off, mask=m2, other=0.0).to(tl.float32)
        x = x * tl.load(beta_ptr + tok * H + h, mask=rm, other=0.0)[:, None]
        tl.store(u_ptr + off, tl.dot(t, x, input_precision=PREC).to(DT), mask=m2)
"""

_SCAN = """
@triton.jit
def kda_chunk_scan(qg_ptr, kg_ptr, w_ptr, u_ptr, aqk_ptr, gl_ptr, o_ptr, s0_ptr, sn_ptr, slot_ptr,
                   cu_ptr, chunk0_ptr, c_lo, c_hi):
    # one program per (sequence, head, V block): the state stays in registers across chunks,
    # as NS tiles of KS rows of K (independent products a step); the sequence's chunks among
    # the chunk table's [c_lo, c_hi) (a segment: the state continues from sn past its first
    # chunk; a sequence without chunks stores its state in the first segment)
    s = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    tok0 = tl.load(cu_ptr + s)
    L = tl.load(cu_ptr + s + 1) - tok0
    c0 = tl.load(chunk0_ptr + s)
    nch = tl.cdiv(L, BT)
    lo = tl.maximum(c_lo - c0, 0)
    hi = tl.minimum(c_hi - c0, nch)
    if (lo >= hi) & ((nch > 0) | (c_lo > 0)):
        return
    r = tl.arange(0, BT)
    dv = iv * BV + tl.arange(0, BV)
    mv = dv < V
    srow = tl.load(slot_ptr + s)
    $state_in
    for ci in range(lo, hi):
        tok = tok0 + ci * BT + r
        rm = ci * BT + r < L
        offv = tok[:, None] * (H * V) + h * V + dv[None, :]
        mv2 = rm[:, None] & mv[None, :]
        u = tl.load(u_ptr + offv, mask=mv2, other=0.0).to(tl.float32)
        aqk = tl.load(aqk_ptr + tok[:, None] * (H * BT) + h * BT + r[None, :], mask=rm[:, None], other=0.0)
        $step
        tl.store(o_ptr + offv, o.to(DT), mask=mv2)
    $state_out
"""


def _scan_blocks(NS: int) -> dict:
    """The scan's state as NS tiles S0.. of KS rows of K (dk0.. their rows): the (sequence, head)
    state in and out (zeros without an initial state; sequence s keeps its state at row slot[s]
    of the state storage, in place when s0 and sn are one; a padding row, slot -1, starts from
    zeros and stores nothing), and one chunk's step: V' = U - W S, O = (scale q G) S + A_qk V',
    S = G_L S + (k G_L/G)^T V'."""
    ins, step, outs = [], [], []
    for i in range(NS):
        ins += [f"dk{i} = {i} * KS + tl.arange(0, KS)", f"mk{i} = dk{i} < K",
                f"soff{i} = ((tl.maximum(srow, 0) * H + h) * K + dk{i}[:, None]) * V + dv[None, :]",
                f"smask{i} = (mk{i} & (dk{i} * 0 + srow >= 0))[:, None] & mv[None, :]",
                "if HAS_STATE:", f"    S{i} = tl.load(s0_ptr + soff{i}, mask=smask{i}, other=0.0)",
                "else:", f"    S{i} = tl.zeros((KS, BV), tl.float32)",
                "if lo > 0:", f"    S{i} = tl.load(sn_ptr + soff{i}, mask=smask{i}, other=0.0)"]
        step += [f"m2 = rm[:, None] & mk{i}[None, :]", f"offk = tok[:, None] * (H * K) + h * K + dk{i}[None, :]",
                 f"w{i} = tl.load(w_ptr + offk, mask=m2, other=0.0)",
                 f"qg{i} = tl.load(qg_ptr + offk, mask=m2, other=0.0)",
                 f"kgt{i} = tl.load(kg_ptr + tok[None, :] * (H * K) + h * K + dk{i}[:, None], "
                 f"mask=rm[None, :] & mk{i}[:, None], other=0.0)",
                 f"gl{i} = tl.load(gl_ptr + ((c0 + ci) * H + h) * K + dk{i}, mask=mk{i}, other=1.0)",
                 f"sd{i} = S{i}.to(DT)"]
        outs.append(f"tl.store(sn_ptr + soff{i}, S{i}, mask=smask{i})")
    ws = " + ".join(f"tl.dot(w{i}, sd{i}, input_precision=PREC)" for i in range(NS))
    qs = " + ".join(f"tl.dot(qg{i}, sd{i}, input_precision=PREC)" for i in range(NS))
    step += [f"vn = u - ({ws})", "vd = vn.to(DT)", f"o = {qs} + tl.dot(aqk, vd, input_precision=PREC)"]
    step += [f"S{i} = S{i} * gl{i}[:, None] + tl.dot(kgt{i}, vd, input_precision=PREC)" for i in range(NS)]
    return {"state_in": "\n".join(ins), "step": "\n".join(step), "state_out": "\n".join(outs)}


_STEP = _GATE + """

@triton.jit
def kda_recurrent_step(q_ptr, k_ptr, v_ptr, f_ptr, b_ptr, a_ptr, dt_ptr, o_ptr, s0_ptr, sn_ptr, slot_ptr,
                       cu_ptr):
    # one program per (sequence, head, V block); token by token, state in registers
    s = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    tok0 = tl.load(cu_ptr + s)
    L = tl.load(cu_ptr + s + 1) - tok0
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < K
    mv = dv < V
    $state_in
    if FUSED:
        dt = tl.load(dt_ptr + h * K + dk, mask=mk, other=0.0)
        a_log = tl.load(a_ptr + h)
    for t in range(0, L):
        tok = tok0 + t
        offk = tok * (H * K) + h * K + dk
        q = tl.load(q_ptr + offk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + tok * (H * V) + h * V + dv, mask=mv, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + tok * H + h).to(tl.float32)
        g = tl.load(f_ptr + offk, mask=mk, other=0.0).to(tl.float32)
        if FUSED:
            q = kda_l2norm(q, 0)
            k = kda_l2norm(k, 0)
            g = kda_decay(g + dt, a_log)
            bb = tl.sigmoid(bb)
        S = S * tl.exp(g)[:, None]
        err = v - tl.sum(k[:, None] * S, 0)
        S = S + k[:, None] * (bb * err)[None, :]
        o = tl.sum((q * SCALE)[:, None] * S, 0)
        tl.store(o_ptr + tok * (H * V) + h * V + dv, o.to(DT), mask=mv)
    tl.store(sn_ptr + soff, S, mask=smask)
"""


def _products_source(NC: int, BC: int, KH: int, NKH: int, levels: bool, diag_here, kg_here: bool) -> list[str]:
    """A_kk and A_qk of the chunk as register blocks A{I}_{J} / Q{I}_{J} (J < I) and D{I} / E{I}
    (diagonal, strictly lower / lower), accumulated over NKH slices of K. Every decay ratio
    G_i/G_j (j < i) factors through a reference row r with j <= r < i, so both factors are
    <= 1 (no overflow however strong the decay) and each product is a tl.dot:
    - block (I, J < I): r = the row before sub-chunk I;
    - inside the diagonal block (`levels`), level by level (s = BC/2, .., 1): rows in the later
      half of a 2s-row group against the earlier half, r = the earlier half's last row.
    Without `levels` the diagonal blocks come from kda_chunk_diag (A_kk's in akd, times beta;
    A_qk's already in aqk), or with `diag_here` (a _DIAG_FORMS source) from kda_chunk_diag_block's
    code run here first (its stores read back after a barrier). `kg_here`: k G_L/G stored from
    the rows loaded here (prep_kg "intra")."""
    L = ["dk = tl.arange(0, BK)", "mk = dk < K"] if diag_here else []
    for I in range(NC):
        L += [f"rI = {I * BC} + cc", "mI = rI < n"]
        if diag_here:
            L += [f"s0 = start + {I * BC}", f"nb = n - {I * BC}", diag_here(BC), "tl.debug_barrier()"]
        if levels:
            L += [f"D{I} = tl.zeros((BC, BC), tl.float32)", f"E{I} = tl.zeros((BC, BC), tl.float32)"]
        else:
            L.append(f"D{I} = tl.load(akd_ptr + (start + rI)[:, None] * (H * BC) + h * BC + cc[None, :], "
                     "mask=mI[:, None], other=0.0)")
        L += [f"A{I}_{J} = tl.zeros((BC, BC), tl.float32)\nQ{I}_{J} = tl.zeros((BC, BC), tl.float32)"
              for J in range(I)]
        for kh in range(NKH if levels or I or kg_here else 0):
            L += [f"col = {kh * KH} + dkh", "mc = col < K", "m2 = mI[:, None] & mc[None, :]",
                  "oI = (start + rI)[:, None] * (H * K) + h * K + col[None, :]",
                  "kI = tl.load(kn_ptr + oI, mask=m2, other=0.0).to(tl.float32)",
                  "gI = tl.load(gc_ptr + oI, mask=m2, other=0.0)"]
            if levels or I:
                L.append("qI = tl.load(qn_ptr + oI, mask=m2, other=0.0).to(tl.float32)")
            if kg_here:     # k G_L/G, G_L from the chunk's last row
                L += ["gL = tl.load(gc_ptr + (start + n - 1) * (H * K) + h * K + col, mask=mc & (col * 0 < n), other=0.0)",
                      "tl.store(kg_ptr + oI, (kI * kda_exp(tl.where(m2, gL[None, :] - gI, 0.0))).to(DT), mask=m2)"]
            if levels:
                L += ["E_ = tl.where(cc[:, None] == cc[None, :], tl.sum(qI * kI, 1)[:, None], 0.0)", f"E{I} += E_"]
            if I:
                L += [f"mR1 = mc & (col * 0 + {I * BC - 1} < n)",     # the reference row exists (else no row of I does)
                      f"gR = tl.load(gc_ptr + (start + {I * BC - 1}) * (H * K) + h * K + col, mask=mR1, other=0.0)",
                      "eI = kda_exp(tl.where(m2, gI - gR[None, :], 0.0))",
                      "ka = kI * eI", "qa = qI * eI"]
                for J in range(I):
                    L += [f"rJ = {J * BC} + cc", "mJ2 = (rJ < n)[:, None] & mc[None, :]",
                          "oJ = (start + rJ)[:, None] * (H * K) + h * K + col[None, :]",
                          "kJ = tl.load(kn_ptr + oJ, mask=mJ2, other=0.0).to(tl.float32)",
                          "gJ = tl.load(gc_ptr + oJ, mask=mJ2, other=0.0)",
                          "kb = tl.trans(kJ * kda_exp(tl.where(mJ2 & mR1[None, :], gR[None, :] - gJ, 0.0)))",
                          f"A{I}_{J} += tl.dot(ka, kb, input_precision=PREC)",
                          f"Q{I}_{J} += tl.dot(qa, kb, input_precision=PREC)"]
            s = BC // 2
            while s and levels:
                L += [f"ref = (cc // {2 * s}) * {2 * s} + {s - 1}",     # the group's earlier half's last row
                      f"late = (cc // {s}) % 2 == 1",
                      f"mR = m2 & ({I * BC} + ref < n)[:, None]",
                      f"gR2 = tl.load(gc_ptr + (start + {I * BC} + ref)[:, None] * (H * K) + h * K + col[None, :], "
                      "mask=mR, other=0.0)",
                      "eI = kda_exp(tl.where(mR & late[:, None], gI - gR2, 0.0))",
                      "ka = tl.where(late[:, None], kI * eI, 0.0)",
                      "qa = tl.where(late[:, None], qI * eI, 0.0)",
                      "kb = tl.trans(tl.where(late[:, None], 0.0, kI * kda_exp(tl.where(mR & (late == 0)[:, None], gR2 - gI, 0.0))))",
                      f"grp = (cc // {2 * s})[:, None] == (cc // {2 * s})[None, :]",
                      f"D{I} += tl.where(grp, tl.dot(ka, kb, input_precision=PREC), 0.0)",
                      f"E{I} += tl.where(grp, tl.dot(qa, kb, input_precision=PREC), 0.0)"]
                s //= 2
        L += [f"bI = tl.load(beta_ptr + (start + rI) * H + h, mask=mI, other=0.0)",
              "arow = (start + rI)[:, None] * (H * BT) + h * BT + cc[None, :]"]
        for J in range(NC):
            if J == I and not levels:
                continue
            blk = f"Q{I}_{J}" if J < I else f"E{I}" if J == I else "tl.zeros((BC, BC), tl.float32)"
            L.append(f"tl.store(aqk_ptr + arow + {J * BC}, ({blk} * SCALE).to(DT), mask=mI[:, None])")
        L += [f"A{I}_{J} = A{I}_{J} * bI[:, None]" for J in range(I)]
        if levels:
            L.append(f"D{I} = D{I} * bI[:, None]")
    return L


def _inverse_source(NC: int, BC: int) -> list[str]:
    """T = (I + A)^-1 by blocks: T{J}_{J} = (I + D{J})^-1 of the strictly lower diagonal block
    as log2(BC) factors (I - N)(I + N^2)(I + N^4).. (exact fp32 products: N^BC = 0, no serial
    loop), T{J}_{I} = -T{J}_{J} sum_{I<=M<J} A{J}_{M} T{M}_{I}."""
    L = ["eye = tl.where(cc[:, None] == cc[None, :], 1.0, 0.0)"]
    for J in range(NC):
        L += [f"N = D{J}", f"T{J}_{J} = eye - N"]
        for _ in range(1, BC.bit_length() - 1):
            L += ["N = tl.dot(N, N, input_precision='ieee')",
                  f"T{J}_{J} = tl.dot(T{J}_{J}, eye + N, input_precision='ieee')"]
        for I in range(J - 1, -1, -1):        # from the nearest block outwards
            terms = " + ".join(f"tl.dot(A{J}_{M}, T{M}_{I}, input_precision=PREC)" for M in range(I, J))
            L.append(f"T{J}_{I} = -tl.dot(T{J}_{J}, {terms}, input_precision=PREC)")
    return L


def _wu_source(NC: int, BC: int, BW: int, n_w: int, n_u: int) -> list[str]:
    """W = T (beta k G) over n_w column blocks of K, U = T (beta v) over n_u blocks of V: each
    row block I of the right side loaded once, into every row block J >= I."""
    L = []
    for p in range(n_w + n_u):
        is_w = p < n_w
        X, D, out = ("K", "bkg_ptr", "w_ptr") if is_w else ("V", "v_ptr", "u_ptr")
        L += [f"col = {(p if is_w else p - n_w) * BW} + dw", f"mc = col < {X}"]
        L += [f"acc{J} = tl.zeros((BC, BW), tl.float32)" for J in range(NC)]
        for I in range(NC):
            L += [f"rI = start + {I * BC} + cc", f"mX = ({I * BC} + cc < n)[:, None] & mc[None, :]",
                  f"x = tl.load({D} + rI[:, None] * (H * {X}) + h * {X} + col[None, :], mask=mX, other=0.0)"
                  ".to(tl.float32)"]
            if not is_w:
                L.append(f"x = x * tl.load(beta_ptr + rI * H + h, mask={I * BC} + cc < n, other=0.0)[:, None]")
            L += [f"acc{J} += tl.dot(T{J}_{I}, x, input_precision=PREC)" for J in range(I, NC)]
        for J in range(NC):
            L += [f"rJ = {J * BC} + cc",
                  f"tl.store({out} + (start + rJ)[:, None] * (H * {X}) + h * {X} + col[None, :], acc{J}.to(DT), "
                  f"mask=(rJ < n)[:, None] & mc[None, :])"]
    return L


def _t_store_source(NC: int, BC: int) -> list[str]:
    """T by rows into t_ptr [N_tok, H, BT] (fp32; zeros right of the diagonal block) for kda_chunk_wu."""
    L = []
    for J in range(NC):
        L += [f"rJ = {J * BC} + cc", "trow = (start + rJ)[:, None] * (H * BT) + h * BT + cc[None, :]"]
        for I in range(NC):
            blk = f"T{J}_{I}" if I <= J else "tl.zeros((BC, BC), tl.float32)"
            L.append(f"tl.store(t_ptr + trow + {I * BC}, {blk}, mask=(rJ < n)[:, None])")
    return L


def _intra_source(NC: int, BC: int, KH: int, NKH: int, BW: int, n_w: int, n_u: int, levels: bool,
                  wu_split: bool, diag_here, kg_here: bool) -> str:
    return "\n".join(_products_source(NC, BC, KH, NKH, levels, diag_here, kg_here) + _inverse_source(NC, BC)
                     + (_t_store_source(NC, BC) if wu_split else _wu_source(NC, BC, BW, n_w, n_u)))


def _sig(names, dtype, fp32=()):
    """AOT argument types: pointers of the activation dtype, fp32 for the names in `fp32`."""
    return {n: ("*fp32" if n in fp32 else PTR_TYPES[dtype]) for n in names}


def _consts(H, K, V, dtype, fused, scale, eps, **extra):
    return {"H": H, "K": K, "V": V, "BK": max(16, next_pow2(K)), "FUSED": bool(fused),
            "SCALE": float(scale), "EPS": float(eps), "DT": TL_DTYPES[dtype], **extra}


CHUNK_SIZES = (16, 32, 64, 128)    # chunk lengths the kernels run: powers of two, whole sub-chunks


def check_chunk_size(chunk: int) -> None:
    if chunk not in CHUNK_SIZES:
        raise ValueError(f"the triton KDA kernels run chunks of {', '.join(map(str, CHUNK_SIZES))} tokens, "
                         f"not {chunk} (chunk-kda{{chunk-size=N}})")


# diagonal blocks: kda_chunk_diag (token-parallel), kda_chunk_diag_block (a program per sub-chunk
# and head), inside the prep kernel (each sub-chunk once stored), inside the intra kernel by
# reference rows ("levels") or as kda_chunk_diag_block computes them ("intra")
DIAG_MODES = ("token", "block", "prep", "levels", "intra")
WU_MODES = ("split", "fused")       # W and U: kda_chunk_wu from a stored T, or inside the intra kernel
_DIAG_COLUMNS = ("for j in range(j0, tok + 1):\n    jj = j - j0",                   # a loop over j <= i
                 "for jj in tl.static_range(BC):\n    j = tl.minimum(j0 + jj, tok)")   # unrolled


@functools.lru_cache(maxsize=None)
def chunk_specs(H, K, V, dtype, fused, scale, eps, has_state, target=None, chunk=None, conv_w=0,
                conv_state=False) -> list[KernelSpec]:
    """The chunk-prefill kernels for one head geometry and dtype: prep, [diag], intra, [wu],
    scan (the target's `diag` and `wu` modes); chunks of `chunk` tokens (the op's chunk size)
    where the target follows the op (`op_chunk`), else the target's tile; `conv_w` > 0: prep
    runs q, k and v's causal conv (that many taps, SiLU; `conv_state`: from carried states)."""
    cfg = config("kda_chunk", target)
    if chunk:
        check_chunk_size(chunk)
    for key, known in (("diag", DIAG_MODES), ("wu", WU_MODES), ("diag_store", tuple(_DIAG_STORE)),
                       ("prep_kg", tuple(_PREP_KG)), ("diag_form", tuple(_DIAG_FORMS))):
        if cfg[key] not in known:
            raise ValueError(f"kda_chunk: {key} must be one of {known}, got {cfg[key]!r}")
    BT, BC, BV = chunk if chunk and cfg["op_chunk"] else cfg["BT"], cfg["BC"], min(cfg["BV"], max(16, next_pow2(V)))
    BK = max(16, next_pow2(K))
    KH, BW = min(cfg["KH"], BK), min(cfg["BW"], max(16, next_pow2(max(K, V))))
    KS = min(cfg["scan_ks"], BK)
    diag, wu_split = cfg["diag"], cfg["wu"] == "split"
    levels = diag == "levels"
    if diag == "prep" and cfg["prep_kg"] == "inline":
        raise ValueError("kda_chunk: diag 'prep' takes BC rows a step, prep_kg 'inline' the whole chunk")
    BH = min(cfg["BH"], next_pow2(H))
    PR = BC if diag == "prep" else BT if cfg["prep_kg"] == "inline" else min(cfg["prep_rows"], BT)
    NC = BT // BC
    consts = _consts(H, K, V, dtype, fused, scale, eps, BT=BT, BC=BC, NC=NC, BV=BV, KH=KH, BW=BW, BH=BH,
                     PR=PR, KS=KS, SEG=int(cfg["scan_seg"]),
                     SEG_MIN=int(cfg["scan_seg_min"]), NW=_cdiv(K, BW), HAS_STATE=bool(has_state), PREC=dot_precision(dtype),
                     FTZ_EXP=bool(cfg["ftz_exp"]), CW=int(conv_w), CONV_STATE=bool(conv_state),
                     BVV=max(16, next_pow2(V)))
    gate_f32 = () if fused else ("f_ptr", "b_ptr")        # unfused: g and beta come in fp32
    bkg_f32 = ("bkg_ptr",) if cfg["bkg_fp32"] else ()       # beta k G in fp32, else the activation dtype
    f32 = bkg_f32 + gate_f32 + ("gc_ptr", "beta_ptr", "gl_ptr", "a_ptr", "dt_ptr", "s0_ptr", "sn_ptr", "akd_ptr",
           "t_ptr")
    i32 = ("chunk_start", "chunk_len", "cu_ptr", "chunk0_ptr", "chunk_seq")
    i64 = ("slot_ptr", "slq_ptr", "slk_ptr", "slv_ptr")

    def spec(name, template, args, warps, stages=1, entry=None, kconsts=consts, **blocks):
        sig = {a: ("*i32" if a in i32 else "*fp32" if a in f32 else "*i64" if a in i64
                   else "i32" if a in ("c_lo", "c_hi", "xs") else PTR_TYPES[dtype]) for a in args}
        entry = entry or name
        return KernelSpec(name, entry, render(entry, template, kconsts, **blocks), sig, warps, stages, kconsts)

    in_prep, diag_block = diag == "prep", _DIAG_FORMS[cfg["diag_form"]]
    out = [spec("kda_chunk_prep", _PREP, ["q_ptr", "k_ptr", "f_ptr", "b_ptr", "a_ptr", "dt_ptr", "chunk_start",
                                          "chunk_len", "qn_ptr", "kn_ptr", "gc_ptr", "beta_ptr", "qg_ptr",
                                          "bkg_ptr", "kg_ptr", "gl_ptr"] + ["aqk_ptr", "akd_ptr"] * in_prep
                + (_PREP_IN["conv"]["conv_args"][2:].split(", ") if conv_w else []),
                cfg["prep_warps"], bkg_dt="tl.float32" if bkg_f32 else "DT", **_PREP_KG[cfg["prep_kg"]],
                **_PREP_IN["conv" if conv_w else "plain"],
                diag_args=", aqk_ptr, akd_ptr" if in_prep else "",
                diag_here="tl.debug_barrier()\ns0 = start + i0\nnb = n - i0\n" + diag_block(BC)
                if in_prep else "")]
    diag_args = ["qn_ptr", "kn_ptr", "gc_ptr", "beta_ptr", "chunk_start", "chunk_len", "aqk_ptr", "akd_ptr"]
    if diag == "token":
        columns = _DIAG_STORE[cfg["diag_store"]].replace("$loop", _DIAG_COLUMNS[bool(cfg["diag_unroll"])])
        out.append(spec("kda_chunk_diag", _DIAG, diag_args, cfg["diag_warps"], columns=columns))
    elif diag == "block":
        out.append(spec("kda_chunk_diag_block", _DIAG_BLOCK, diag_args, cfg["diag_warps"],
                        block=diag_block(BC)))
    out.append(spec("kda_chunk_intra", _INTRA, ["qn_ptr", "kn_ptr", "gc_ptr", "beta_ptr", "bkg_ptr", "v_ptr",
                                                "akd_ptr", "chunk_start", "chunk_len", "aqk_ptr", "w_ptr",
                                                "u_ptr", "t_ptr", "kg_ptr"], cfg["intra_warps"], cfg["intra_stages"],
                    body=_intra_source(NC, BC, KH, BK // KH, BW, _cdiv(K, BW), _cdiv(V, BW), levels, wu_split,
                                      diag == "intra" and diag_block, cfg["prep_kg"] == "intra")))
    if wu_split:
        out.append(spec("kda_chunk_wu", _WU, ["t_ptr", "bkg_ptr", "v_ptr", "beta_ptr", "chunk_start", "chunk_len",
                                              "w_ptr", "u_ptr"], cfg["wu_warps"], cfg["wu_stages"]))
    scan_args = ["qg_ptr", "kg_ptr", "w_ptr", "u_ptr", "aqk_ptr", "gl_ptr", "o_ptr", "s0_ptr", "sn_ptr",
                 "slot_ptr", "cu_ptr", "chunk0_ptr", "c_lo", "c_hi"]
    out.append(spec("kda_chunk_scan", _SCAN, scan_args, cfg["num_warps"], cfg["num_stages"], **_scan_blocks(BK // KS)))
    if cfg["BV_seg"] or cfg["stages_seg"]:     # the scan of segmented launches (long prompts, beside the others)
        segc = {**consts, "BV": min(cfg["BV_seg"] or BV, max(16, next_pow2(V)))}
        out.append(spec("kda_chunk_scan_seg", _SCAN, scan_args, cfg["warps_seg"] or cfg["num_warps"],
                        cfg["stages_seg"] or cfg["num_stages"], entry="kda_chunk_scan", kconsts=segc,
                        **_scan_blocks(BK // KS)))
    if cfg["scan_many"]:        # the scan of launches with many programs (packed sequences): its own tiles
        many = {**consts, "BV": min(cfg["BV_many"], max(16, next_pow2(V))), "MANY": int(cfg["scan_many"])}
        out.append(spec("kda_chunk_scan_many", _SCAN, scan_args, cfg["warps_many"], cfg["num_stages"],
                        entry="kda_chunk_scan", kconsts=many, **_scan_blocks(BK // KS)))
    return out


@functools.lru_cache(maxsize=None)
def step_spec(H, K, V, dtype, fused, scale, eps, has_state, target=None) -> KernelSpec:
    cfg = config("kda_recurrent", target)
    BV = min(cfg["BV"], max(16, next_pow2(V)))
    consts = _consts(H, K, V, dtype, fused, scale, eps, BV=BV, HAS_STATE=bool(has_state))
    names = ["q_ptr", "k_ptr", "v_ptr", "f_ptr", "b_ptr", "a_ptr", "dt_ptr", "o_ptr", "s0_ptr", "sn_ptr",
             "slot_ptr", "cu_ptr"]
    sig = _sig(names, dtype, ("a_ptr", "dt_ptr", "s0_ptr", "sn_ptr") + (() if fused else ("f_ptr", "b_ptr")))
    sig["cu_ptr"], sig["slot_ptr"] = "*i32", "*i64"
    src = render("kda_recurrent_step", _STEP, consts, state_in=_STATE_IN)
    return KernelSpec("kda_recurrent_step", "kda_recurrent_step", src, sig, cfg["num_warps"], cfg["num_stages"],
                      consts)


# -- launchers ---------------------------------------------------------------------------

def _ir_dtype(t: torch.Tensor) -> str:
    try:
        return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[t.dtype]
    except KeyError:
        raise TypeError(f"triton KDA kernels take f32/bf16/f16 tensors, got {t.dtype}") from None


def _packed(q, k, v, f, b, cu_seqlens):
    """Flatten [B,T,H,*] to packed tokens; uniform cu_seqlens when none is given."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [B,T,H,*]")
    B, T, H, K = q.shape
    if cu_seqlens is None:
        cu = _uniform_offsets(B, T, q.device)
    else:
        if B != 1:
            raise ValueError("packed sequences (cu_seqlens) need B == 1")
        cu = _kept(("offsets", T, str(q.device)), cu_seqlens, lambda: _checked_offsets(cu_seqlens, T, q.device))
    flat = [t.reshape(B * T, *t.shape[2:]).contiguous() for t in (q, k, v, f, b)]
    return flat, cu, H, K, v.shape[-1]


def _checked_offsets(cu_seqlens, T, device):
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    if cu[0] != 0 or cu[-1] != T or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu.tolist()}")
    return cu


_KEPT: collections.OrderedDict = collections.OrderedDict()
_KEPT_MAX = 64


def _kept(key, given, make):
    """make(), computed once per key and per `given` tensor while it lives unchanged (None: per
    key alone); the last _KEPT_MAX results are kept. So the offsets a batch's cu_seqlens give,
    checked once (a host sync), and their chunk tables serve every layer of a forward pass."""
    if given is not None:
        key = key + (id(given), given._version)
    hit = _KEPT.get(key)
    if hit is not None and (given is None or hit[0]() is given):
        _KEPT.move_to_end(key)
        return hit[1]
    value = make()
    _KEPT[key] = (None if given is None else weakref.ref(given), value)
    while len(_KEPT) > _KEPT_MAX:
        _KEPT.popitem(last=False)
    return value


def _uniform_offsets(B: int, T: int, device) -> torch.Tensor:
    """cu_seqlens of B sequences of T tokens, kept (read only), so a step launches no kernel
    to make them."""
    return _kept(("uniform", B, T, str(device)), None,
                 lambda: torch.arange(0, (B + 1) * T, T, device=device, dtype=torch.int32))


def _gate_params(A_log, dt_bias, H, K, device):
    if A_log is None:   # unfused: no gating parameters
        z = torch.zeros(1, device=device, dtype=torch.float32)
        return z, z
    if A_log.numel() != H or dt_bias.numel() != H * K:
        raise ValueError(f"A_log {tuple(A_log.shape)} / dt_bias {tuple(dt_bias.shape)} do not fit {H}x{K}")
    return A_log.reshape(H).float().contiguous(), dt_bias.reshape(H * K).float().contiguous()


def _inputs(q, k, v, f, b, A_log, dt_bias, cu_seqlens, fused):
    """Packed token tensors (g, beta in fp32 when unfused), offsets, dims and gate parameters."""
    (q2, k2, v2, f2, b2), cu, H, K, V = _packed(q, k, v, f, b, cu_seqlens)
    if not fused:
        f2, b2 = f2.float(), b2.float()
    a, dt = _gate_params(A_log if fused else None, dt_bias, H, K, q.device)
    return (q2, k2, v2, f2, b2), cu, H, K, V, a, dt


def _states(state, N, H, K, V, device):
    """(initial state storage, new state storage, slot index, the op's state result): an
    in-place view (SlotRows) is read and written where it lives and returned as the result."""
    if state is not None and (tuple(state.shape) != (N, H, K, V) or state.dtype != torch.float32):
        raise ValueError(f"state must be fp32 [{N},{H},{K},{V}], got {state.dtype} {tuple(state.shape)}")
    if isinstance(state, SlotRows):
        if not state.storage.is_contiguous():
            raise ValueError("an in-place KDA state needs contiguous storage")
        return state.storage, state.storage, state.slots, state
    s0 = torch.zeros(1, device=device, dtype=torch.float32) if state is None else state.contiguous()
    sn = torch.empty(N, H, K, V, device=device, dtype=torch.float32)
    return s0, sn, torch.arange(N, device=device), sn


def kda_chunk(q, k, v, f, b, A_log, dt_bias, scale, *, eps=1e-6, state=None, cu_seqlens=None,
              fused=True, chunk=None):
    """Chunkwise KDA prefill. fused: f, b are the raw f_b / b_proj outputs; else f is g (log decay
    [B,T,H,K]) and b is beta [B,T,H], with q, k already normalised. -> (o [B,T,H,V], state [N,H,K,V])."""
    (q2, k2, v2, f2, b2), cu, H, K, V, a, dt = _inputs(q, k, v, f, b, A_log, dt_bias, cu_seqlens, fused)
    o, result = _chunks(q2, k2, v2, f2, b2, a, dt, cu, cu_seqlens, q.shape[:2], (H, K, V), _ir_dtype(q), fused,
                        scale, eps, state, chunk)
    return o.view(q.shape[0], q.shape[1], H, V), result


def kda_chunk_conv(xs, weights, conv_states, f, b, A_log, dt_bias, scale, heads, *, eps=1e-6, state=None,
                   chunk=None):
    """kda_chunk (fused gating) of q, k, v = SiLU(causal_conv1d(x, w, conv state)) of the
    projections xs = (x_q, x_k, x_v) [B, T, H*K] (H*V for v; last-dim slices of one wider tensor
    are read in place), the convs run inside the prep kernel: the projections are read once and
    only v's conv output is stored. weights [C, 1, W]; conv_states [B, C, W-1] or None (zeros;
    `SlotRows` views are updated in place). -> (o [B,T,H,V], state, [new conv state of q, k, v])."""
    from . import conv
    B, T, _ = xs[0].shape
    H = heads
    K, V = xs[0].shape[2] // H, xs[2].shape[2] // H
    if xs[1].shape != xs[0].shape or xs[2].shape[:2] != (B, T) or H * K != xs[0].shape[2] or H * V != xs[2].shape[2]:
        raise ValueError(f"conv inputs {[tuple(x.shape) for x in xs]} do not split into {H} heads")
    ops = [conv._operands(x, w, st, "silu", with_y=False) for x, w, st in zip(xs, weights, conv_states)]
    (xq, wq, sq, slq, _, _), _, stride, key = ops[0]
    (xk, wk, sk, slk, _, _), (xv, wv, sv, slv, _, _) = ops[1][0], ops[2][0]
    if any(op[2] != stride for op in ops) or len({op[3][1] for op in ops}) != 1:
        raise ValueError("the q, k, v projections must be rows of one stride, their convs of one width")
    f2 = f.reshape(B * T, H, K).contiguous()
    b2 = b.reshape(B * T, H).contiguous()
    a, dt = _gate_params(A_log, dt_bias, H, K, f.device)
    cu = _uniform_offsets(B, T, f.device)
    W, has_cs = key[1], key[4]
    o, result = _chunks(xq, xk, None, f2, b2, a, dt, cu, None, (B, T), (H, K, V), _ir_dtype(xq), True, scale, eps,
                        state, chunk, conv=(W, has_cs, (xv, wq, wk, wv, sq, sk, sv, slq, slk, slv), stride))
    conv.write_states([op[0] for op in ops], [op[3] for op in ops], B, T, stride)
    return o.view(B, T, H, V), result, [op[1] for op in ops]


def _chunks(q2, k2, v2, f2, b2, a, dt, cu, cu_seqlens, BT_shape, dims, dtype, fused, scale, eps, state, chunk,
            conv=None):
    """The chunk kernels over packed tokens; `conv` (width, carried states?, prep's conv operands,
    row stride): q2, k2 are the projections and v is their conv's output, stored by prep."""
    H, K, V = dims
    dev = f2.device
    N = cu.numel() - 1
    specs = {sp.name: sp for sp in chunk_specs(H, K, V, dtype, fused, scale, eps, state is not None,
                                               current_target(), chunk, *(conv[:2] if conv else ()))}
    prep, intra, scan = specs["kda_chunk_prep"], specs["kda_chunk_intra"], specs["kda_chunk_scan"]
    diag, wu = specs.get("kda_chunk_diag") or specs.get("kda_chunk_diag_block"), specs.get("kda_chunk_wu")
    BT, BC = prep.config["BT"], prep.config["BC"]
    NT = f2.shape[0]
    cstart, clen, chunk0, NCH, cseq = chunk_tables(cu, cu_seqlens, BT_shape[0], BT_shape[1], BT)
    e = dict(device=dev, dtype=q2.dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    qn, kn, qg, kg, w = (torch.empty(NT, H, K, **e) for _ in range(5))
    u = torch.empty(NT, H, V, **e)
    conv_args = ()
    if conv:
        v2 = torch.empty(NT, H, V, **e)         # v's conv output, from prep
        conv_args = (*conv[2], cseq, cu, v2, conv[3])
    gc = torch.empty(NT, H, K, **f32)
    bkg = torch.empty(NT, H, K, **(f32 if prep.signature["bkg_ptr"] == "*fp32" else e))
    beta = torch.empty(NT, H, **f32)
    aqk = torch.empty(NT, H, BT, **e)
    akd = torch.empty(NT, H, BC, **f32)      # diagonal blocks of A_kk (unread with diag "levels")
    tinv = torch.empty(NT, H, BT, **f32) if wu else beta          # (I + A_kk)^-1 by rows (kda_chunk_wu)
    gl = torch.empty(max(NCH, 1), H, K, **f32)
    o = torch.empty(NT, H, V, **e)
    s0, sn, slot, result = _states(state, N, H, K, V, dev)
    many = specs.get("kda_chunk_scan_many")
    if many and N * H * _cdiv(V, scan.config["BV"]) >= many.config["MANY"]:
        scan = many
    seg = scan.config["SEG"]
    if NCH <= seg or NCH < scan.config["SEG_MIN"] * N:      # one segment: the table whole
        seg = 0
    if seg and scan.name == "kda_chunk_scan" and "kda_chunk_scan_seg" in specs:
        scan = specs["kda_chunk_scan_seg"]
    side = _side_stream(dev) if seg and dev.type == "cuda" else None
    for c_a in range(0, max(NCH, 1), seg or max(NCH, 1)):     # segments of the chunk table
        c_b = min(c_a + seg, NCH) if seg else NCH
        n, cs, cl, glv = c_b - c_a, cstart[c_a:], clen[c_a:], gl[c_a:]
        if n:
            launch(prep, (n, H), q2, k2, f2, b2, a, dt, cs, cl, qn, kn, gc, beta, qg, bkg, kg, glv,
                   *((aqk, akd) if "akd_ptr" in prep.signature else ()),
                   *(conv_args[:10] + (cseq[c_a:],) + conv_args[11:] if conv else ()))
            if diag:    # token-parallel: a program per row and BH heads; by blocks: per sub-chunk and head
                grid = (n * BT, _cdiv(H, diag.config["BH"])) if diag.name == "kda_chunk_diag" else (n * BT // BC, H)
                launch(diag, grid, qn, kn, gc, beta, cs, cl, aqk, akd)
            launch(intra, (n, H), qn, kn, gc, beta, bkg, v2, akd, cs, cl, aqk, w, u, tinv, kg)
            if wu:
                launch(wu, (n, H, _cdiv(K, wu.config["BW"]) + _cdiv(V, wu.config["BW"])), tinv, bkg, v2, beta,
                       cs, cl, w, u)
        with _on(side):     # the scan of this segment beside the next segment's kernels
            launch(scan, (N, H, _cdiv(V, scan.config["BV"])), qg, kg, w, u, aqk, gl, o, s0, sn, slot, cu, chunk0,
                   c_a, c_b if c_b < NCH else 2 ** 31 - 1)
    if side is not None:
        torch.cuda.current_stream(dev).wait_stream(side)
    return o, result


_SIDE: dict = {}


def _side_stream(dev):
    """A high-priority stream per device for the segmented scan."""
    if dev not in _SIDE:
        _SIDE[dev] = torch.cuda.Stream(dev, priority=-1)
    return _SIDE[dev]


class _on:
    """Run the enclosed launches on `side` after the current stream's work so far (None: on
    the current stream)."""
    def __init__(self, side):
        self.side, self.ctx = side, None

    def __enter__(self):
        if self.side is not None:
            self.side.wait_stream(torch.cuda.current_stream(self.side.device))
            self.ctx = torch.cuda.stream(self.side)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def chunk_tables(cu: torch.Tensor, given: torch.Tensor | None, B: int, T: int, BT: int):
    """(chunk start token, chunk length, first chunk of each sequence, chunk count, each chunk's
    sequence) for the sequences `cu` delimits, built on the device without waiting for it: for packed sequences
    the count is the bound T_total // BT + N (chunks past the real ones have length 0 and do
    nothing). Kept per uniform (B, T) and per `given` cu_seqlens tensor (see _kept)."""
    def make():
        N, NT = cu.numel() - 1, B * T
        nch_max = min(NT, NT // BT + N) if given is not None else B * _cdiv(T, BT)
        lens = cu[1:] - cu[:-1]
        nch = (lens + BT - 1) // BT
        last = torch.cumsum(nch, 0)
        chunk0 = (last - nch).to(torch.int32)
        c = torch.arange(nch_max, device=cu.device, dtype=last.dtype)
        seq = torch.searchsorted(last, c, right=True)
        sc = seq.clamp(max=N - 1)
        idx = c - chunk0[sc]
        cstart = (cu[sc] + idx * BT).to(torch.int32)
        clen = torch.where(seq < N, (lens[sc] - idx * BT).clamp(max=BT), 0).to(torch.int32)
        return cstart, clen, chunk0, nch_max, sc.to(torch.int32)
    return _kept(("chunks", B, T, BT, str(cu.device)), given, make)


def kda_step(q, k, v, f, b, A_log, dt_bias, scale, *, eps=1e-6, state=None, cu_seqlens=None,
             fused=True, inplace=False):
    """Token-by-token KDA (decode). `inplace`: the new state is written into `state` (a
    `SlotRows` view always is)."""
    dtype, dev = _ir_dtype(q), q.device
    (q2, k2, v2, f2, b2), cu, H, K, V, a, dt = _inputs(q, k, v, f, b, A_log, dt_bias, cu_seqlens, fused)
    N = cu.numel() - 1
    spec = step_spec(H, K, V, dtype, fused, scale, eps, state is not None, current_target())
    s0, sn, slot, result = _states(state, N, H, K, V, dev)
    if inplace and not isinstance(state, SlotRows):
        if state is None or not state.is_contiguous():
            raise ValueError("inplace needs a contiguous fp32 state")
        sn = result = s0
    o = torch.empty(q2.shape[0], H, V, device=dev, dtype=q.dtype)
    launch(spec, (N, H, _cdiv(V, spec.config["BV"])), q2, k2, v2, f2, b2, a, dt, o, s0, sn, slot, cu)
    return o.view(q.shape[0], q.shape[1], H, V), result


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- op implementations (kind -> fn(args, attrs) -> results) ----------------------------

def _run(T: int, attrs: dict):
    """The step kernel for one token, else the chunk launcher in the op's chunk size (the
    target's tile where the op leaves the choice, chunk_size 0 or none, or the target does not
    follow the op: `op_chunk`)."""
    if T == 1:
        return kda_step
    return functools.partial(kda_chunk, chunk=attrs.get("chunk_size") or None)


def op_kda_fused(args, attrs):
    q, k, v, f, b, A, dt = args[:7]
    st = args[7] if len(args) > 7 else None
    B, T, H, K = q.shape
    return list(_run(T, attrs)(q, k, v, f.view(B, T, H, K), b, A, dt, attrs["scale"], eps=attrs["l2norm_eps"],
                               state=st))


def op_kda_recurrent(args, attrs):
    q, k, v, g, beta = args[:5]
    st = args[5] if len(args) > 5 else None
    return list(_run(q.shape[1], attrs)(q, k, v, g, beta, None, None, attrs["scale"], state=st, fused=False))


def specs_for(kind, ins, outs, attrs, target):
    """The kernels one KDA op needs (for AOT): the step kernel, plus the chunk kernels (prep,
    [diag], intra, [wu], scan) when T != 1."""
    q, v = ins[0], ins[2]
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    fused = kind != "kda_recurrent"
    has_state = len(ins) > (7 if fused else 5)
    eps = attrs.get("l2norm_eps", 1e-6)
    out = [step_spec(H, K, V, q.dtype, fused, attrs["scale"], eps, has_state, target)]
    if q.shape[1] != 1:
        out += chunk_specs(H, K, V, q.dtype, fused, attrs["scale"], eps, has_state, target,
                           attrs.get("chunk_size") or None)
    return out


# -- the q/k/v convs inside prefill's first kernel ---------------------------------------------

@dataclass
class ConvKDA:
    """KDA's q, k, v convs (a backend `Convs` group, SiLU) whose outputs feed, through one reshape
    each and nothing else, a kda_fused_chunk op as q, k, v: at prefill (T > 1, the target's
    `conv_in_prep`) one kda_chunk_conv, the convs inside the prep kernel (the projections read
    once, only v's conv output stored), the new conv states written after it; else the conv
    group, then the op."""
    convs: object             # the Convs group
    ops: list                 # the reshapes, then the KDA op
    inputs: list[str]         # the projections' value, each conv's weight (and state), the KDA op's f.. state
    outputs: list[str]        # each conv's new state (when it has one), the KDA op's outputs

    def run(self, values: list) -> list:
        convs, op = self.convs.ops, self.ops[-1]
        x, i = values[0], 1
        ws, states = [], []
        for c in convs:
            ws.append(values[i])
            states.append(values[i + 1] if len(c.inputs) > 2 else None)
            i += len(c.inputs) - 1
        rest = values[i:]
        xs = [x.narrow(-1, sl.attrs["start"], sl.attrs["end"] - sl.attrs["start"]) for sl in self.convs.slices]
        B, T, _ = xs[0].shape
        H = self.ops[0].attrs["shape"][2]
        attrs = get_kda_attrs(op)
        kept = [len(c.outputs) > 1 for c in convs]
        if T > 1 and config("kda_chunk")["conv_in_prep"]:
            f, b, A, dt = rest[:4]
            o, st, conv_states = kda_chunk_conv(xs, ws, states, f, b, A, dt, attrs["scale"], H,
                                                eps=attrs["l2norm_eps"], state=rest[4] if len(rest) > 4 else None,
                                                chunk=attrs.get("chunk_size") or None)
            return [cs for cs, k in zip(conv_states, kept) if k] + [o, st]
        from . import conv
        outs = conv.causal_conv1d_group(xs, ws, states, "silu")
        qkv = [y.view(B, T, H, -1) for y, _ in outs]
        return [cs for (_, cs), k in zip(outs, kept) if k] + op_kda_fused(qkv + list(rest), attrs)

    def specs(self, g, target: str) -> list[KernelSpec]:
        """The conv group's kernels, the KDA op's and the fused prep's chunk kernels."""
        from kimi_graph.ops import get_op

        from . import conv
        c, op = self.convs.ops[0], self.ops[-1]
        ins = [g.types[v] for v in op.inputs]
        attrs = get_kda_attrs(op)
        out = conv.specs_for(c.kind, [g.types[v] for v in c.inputs], [], get_op(c.kind).full_attrs(c.attrs), target,
                             group=len(self.convs.ops))
        out += specs_for(op.kind, ins, [], attrs, target)
        q, v = ins[0], ins[2]
        if q.shape[1] != 1 and config("kda_chunk", target)["conv_in_prep"]:
            out += chunk_specs(q.shape[2], q.shape[3], v.shape[3], q.dtype, True, attrs["scale"], attrs["l2norm_eps"],
                               len(ins) > 7, target, attrs.get("chunk_size") or None,
                               g.types[c.inputs[1]].shape[2], len(c.inputs) > 2)
        return out


def get_kda_attrs(op) -> dict:
    from kimi_graph.ops import get_op
    return get_op(op.kind).full_attrs(op.attrs)


def conv_kdas(g, convs: dict, covered) -> dict:
    """KDA op id -> its ConvKDA step, for each conv group (first conv's id -> Convs) of three
    SiLU convs feeding one kda_fused_chunk op as q, k, v through one reshape each."""
    def sole(v):
        users = g.users(v)
        return users[0] if v not in g.outputs and len(users) == 1 else None

    out = {}
    for group in convs.values():
        if len(group.ops) != 3 or any(c.attrs.get("activation") != "silu" for c in group.ops):
            continue
        reshapes = [sole(c.outputs[0]) for c in group.ops]
        if any(r is None or r.kind != "reshape" for r in reshapes):
            continue
        kdas = [sole(r.outputs[0]) for r in reshapes]
        op = kdas[0]
        if op is None or op.kind != "kda_fused_chunk" or not covered(g, op) or any(o is not op for o in kdas) \
                or [r.outputs[0] for r in reshapes] != op.inputs[:3]:
            continue
        ins = [group.slices[0].inputs[0]] + [v for c in group.ops for v in c.inputs[1:]] + op.inputs[3:]
        outs = [v for c in group.ops for v in c.outputs[1:]] + op.outputs
        out[op.id] = ConvKDA(group, reshapes + [op], ins, outs)
    return out
