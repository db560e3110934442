"""MLA kernels: latent-space attention over the cache (split along the context, merged by
log-sum-exp; per-sequence lengths from q_start; paged caches read through their page table),
the cache write (new rows at each sequence's position, in place in the engine's storage),
and causal flash attention for prefill (qk dim split into power-of-two dot pieces:
192 = 128 + 64; v dim 128).

Visibility (both): query t of sequence b sits at q_start[b] + t (default S - T) and sees keys
j <= that position. Softmax statistics in fp32.
"""
from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass

import torch

from kimi_graph.ops import get_op
from kimi_graph.runtime.views import PagedRows

from .codegen import dot_precision, TL_DTYPES, KernelSpec, dot_pieces, launch, next_pow2, render, row_view, use_descriptor_scratch
from .elementwise import ir_dtype, ptr_type
from .targets import TARGETS, config, current_target

_LATENT = """
@triton.jit
def mla_latent_split(ql_ptr, qr_ptr, c_ptr, kr_ptr, qs_ptr, slot_ptr, tab_ptr, op_ptr, lse_ptr, T, S, PS, MAXP,
                     sql, sqr):
    # grid (B, row blocks, splits); rows are (t, h) pairs; keys shared by all heads. Key j of
    # sequence b is cache row tab[slot[b], j // PS] * PS + j % PS. The splits share the keys
    # the sequence's queries see (its length, read here: the grid does not depend on it).
    b = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    sp = tl.program_id(2)
    nsp = tl.num_programs(2)
    q0 = tl.load(qs_ptr + b)
    slot = tl.load(slot_ptr + b)
    end = tl.where(slot >= 0, tl.minimum(S, q0 + T), 0)       # a padding row (slot -1) sees nothing
    split_len = tl.maximum(SPLIT_MIN, tl.cdiv(tl.cdiv(end, nsp), BS) * BS)
    lo = sp * split_len
    if lo < end:
        mr = rows < T * H
        pos = q0 + rows // H
        dr = tl.arange(0, BR)
        dp = tl.arange(0, BP)
        mR = dr < R
        mP = dp < P
        qrow = b * T * H + rows
        ql = tl.load(ql_ptr + qrow[:, None] * sql + dr[None, :], mask=mr[:, None] & mR[None, :], other=0.0)
        qr = tl.load(qr_ptr + qrow[:, None] * sqr + dp[None, :], mask=mr[:, None] & mP[None, :], other=0.0)
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, BR), tl.float32)
        hi = tl.minimum(lo + split_len, end)
        tab = tab_ptr + slot * MAXP
        for j0 in range(lo, hi, BS):
            j = j0 + tl.arange(0, BS)
            mj = j < hi
            if PAGE_BLOCKS:     # the block lies in one page: one page read, contiguous rows
                row = tl.load(tab + j0 // PS).to(tl.int64) * PS + j0 % PS + tl.arange(0, BS)
            else:
                row = tl.load(tab + j // PS, mask=mj, other=0).to(tl.int64) * PS + j % PS
            c = tl.load(c_ptr + row[:, None] * R + dr[None, :], mask=mj[:, None] & mR[None, :], other=0.0)
            kr = tl.load(kr_ptr + row[:, None] * P + dp[None, :], mask=mj[:, None] & mP[None, :], other=0.0)
            s = tl.dot(ql, tl.trans(c), input_precision=PREC) + tl.dot(qr, tl.trans(kr), input_precision=PREC)
            $online_softmax
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PREC)
            m_i = m_new
        out = (b * T * H + rows) * nsp + sp
        tl.store(op_ptr + out[:, None] * R + dr[None, :], acc / tl.where(l_i > 0, l_i, 1.0)[:, None],
                 mask=mr[:, None] & mR[None, :])
        tl.store(lse_ptr + out, tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf")), mask=mr)


@triton.jit
def mla_latent_merge(op_ptr, lse_ptr, qs_ptr, slot_ptr, o_ptr, T, S, nsp):
    # grid ((b, t, h) rows, column blocks): merge the splits that held keys by their log2-sum-exp,
    # MS a step, over BRM of the R columns
    row = tl.program_id(0)
    b = row // (T * H)
    end = tl.where(tl.load(slot_ptr + b) >= 0, tl.minimum(S, tl.load(qs_ptr + b) + T), 0)
    used = tl.cdiv(end, tl.maximum(SPLIT_MIN, tl.cdiv(tl.cdiv(end, nsp), BS) * BS))
    dr = tl.program_id(1) * BRM + tl.arange(0, BRM)
    mR = dr < R
    if MS == 1:                         # one split a step
        m = tl.full((), float("-inf"), tl.float32)
        for s in range(0, used):
            m = tl.maximum(m, tl.load(lse_ptr + row * nsp + s))
        m = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros((BRM,), tl.float32)
        tot = tl.zeros((), tl.float32)
        for s in range(0, used):
            w = tl.exp2(tl.load(lse_ptr + row * nsp + s) - m)
            acc += w * tl.load(op_ptr + (row * nsp + s) * R + dr, mask=mR, other=0.0)
            tot += w
    else:                               # MS splits a step, their loads issued together
        sc = tl.arange(0, MS)
        mv = tl.full((MS,), float("-inf"), tl.float32)
        for s0 in range(0, used, MS):
            mv = tl.maximum(mv, tl.load(lse_ptr + row * nsp + s0 + sc, mask=s0 + sc < used, other=float("-inf")))
        m = tl.max(mv, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        acc2 = tl.zeros((MS, BRM), tl.float32)
        tot2 = tl.zeros((MS,), tl.float32)
        for s0 in range(0, used, MS):
            ms = s0 + sc < used
            w = tl.exp2(tl.load(lse_ptr + row * nsp + s0 + sc, mask=ms, other=float("-inf")) - m)
            acc2 += w[:, None] * tl.load(op_ptr + (row * nsp + s0 + sc)[:, None] * R + dr[None, :],
                                         mask=ms[:, None] & mR[None, :], other=0.0)
            tot2 += w
        acc = tl.sum(acc2, 0)
        tot = tl.sum(tot2, 0)
    tl.store(o_ptr + row * R + dr, (acc / tl.where(tot > 0, tot, 1.0)).to(DT), mask=mR)
"""

_CACHE_ROW = """
@triton.jit
def _cache_row(qs_ptr, slot_ptr, tab_ptr, T, PS, MAXP):
    # this program's new row i = (b, t), its slot, and its cache row at position p = qs[b] + t:
    # tab[slot[b], p // PS] * PS + p % PS
    i = tl.program_id(0)
    b = i // T
    p = tl.load(qs_ptr + b) + i % T
    slot = tl.load(slot_ptr + b)
    return i, slot, tl.load(tab_ptr + tl.maximum(slot, 0) * MAXP + p // PS).to(tl.int64) * PS + p % PS
"""

_CACHE_WRITE = _CACHE_ROW + """
@triton.jit
def cache_write_rows(new_ptr, qs_ptr, slot_ptr, tab_ptr, c_ptr, T, PS, MAXP, ns):
    # one program per new row (b, t), ns apart, to its cache row; padding rows (slot -1) write nothing
    i, slot, row = _cache_row(qs_ptr, slot_ptr, tab_ptr, T, PS, MAXP)
    dc = tl.arange(0, BC)
    v = tl.load(new_ptr + i.to(tl.int64) * ns + dc, mask=dc < C)
    tl.store(c_ptr + row * C + dc, v, mask=(dc < C) & (dc * 0 + slot >= 0))
"""

_CACHE_ROWS = _CACHE_ROW + """
@triton.jit
def cache_write_norm_pair(a_ptr, nw_ptr, b_ptr, qs_ptr, slot_ptr, tab_ptr, ca_ptr, cb_ptr, T, PS, MAXP, sa, sb):
    # one program per new row (b, t): rmsnorm(a row) * nw (CA columns, as rmsnorm_rows rounds it)
    # and the b row (CB columns) to its row of two caches that share their slots and page table;
    # padding rows (slot -1) write nothing
    i, slot, row = _cache_row(qs_ptr, slot_ptr, tab_ptr, T, PS, MAXP)
    da = tl.arange(0, BA)
    ma = da < CA
    xf = tl.load(a_ptr + i.to(tl.int64) * sa + da, mask=ma, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / CA + EPS)
    w = tl.load(nw_ptr + da, mask=ma, other=0.0).to(tl.float32)
    tl.store(ca_ptr + row * CA + da, ((xf * rstd).to(DT).to(tl.float32) * w).to(DT), mask=ma & (da * 0 + slot >= 0))
    db = tl.arange(0, BB)
    mb = db < CB
    vb = tl.load(b_ptr + i.to(tl.int64) * sb + db, mask=mb)
    tl.store(cb_ptr + row * CB + db, vb, mask=mb & (db * 0 + slot >= 0))
"""

_ONLINE_SOFTMAX = """
# causal mask by position, then the online softmax update (log2 domain): p, alpha, l_i
s = s * SCALE_LOG2E
s = tl.where(mj[None, :] & (j[None, :] <= pos[:, None]), s, float("-inf"))
m_new = tl.maximum(m_i, tl.max(s, 1))
m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
p = tl.exp2(s - m_safe[:, None])
alpha = tl.exp2(m_i - m_safe)
l_i = l_i * alpha + tl.sum(p, 1)
"""

_FLASH = """
@triton.jit
def causal_attention_fwd(q_ptr, k_ptr, v_ptr, qs_ptr, o_ptr, T, S,
                         sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh$rope_params$state_params):
    # grid (B * H, T blocks); HEAVY_FIRST: the last (longest) query block of every head runs first
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    tb = tl.program_id(1)
    if HEAVY_FIRST:
        tb = tl.num_programs(1) - 1 - tb
    t0 = tb * BM
    t = t0 + tl.arange(0, BM)
    mt = t < T
    qpos = $qpos        # positions (and key offsets) fit in int32
    pos = qpos + t
    dv = tl.arange(0, BDV)
    qb = q_ptr + b.to(tl.int64) * sqb + h * sqh + t[:, None] * sqt
    kb = k_ptr + b.to(tl.int64) * skb + h * skh
    vb = v_ptr + b.to(tl.int64) * svb + h * svh
    $rope_base
    $load_q
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BDV), tl.float32)
    $load_state
    hi = tl.minimum(S, qpos + tl.minimum(t0 + BM, T))       # past the block's last valid position
    $key_loops
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    $store
"""

# state form: the queries' attention over other key blocks (o normalised, fp32 [B, T, H, DV];
# lse, log2 units of the scaled scores, [B, T, H]) merged with this block's (keys at positions
# koff + j) after its loop, as flash-decoding merges splits (a merge read in the epilogue keeps
# the base kernel's shared memory; loading the state as the loop's start costs a layout copy).
# Rows start at m = -1e30, not -inf: a row that sees no key of the block stays finite.
_LOAD_STATE = """
m_i = tl.full((BM,), -1e30, tl.float32)
"""

_STORE_STATE = """
sr = (b.to(tl.int64) * T + t) * H + h
lse_b = tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf"))
lse0 = tl.load(lse_ptr + sr, mask=mt, other=float("-inf"))
mx = tl.maximum(lse0, lse_b)
mx = tl.where(mx == float("-inf"), 0.0, mx)
w0 = tl.exp2(lse0 - mx)
wb = tl.exp2(lse_b - mx)
tot = w0 + wb
o0 = tl.load(so_ptr + sr[:, None] * DV + dv[None, :], mask=$store_mask, other=0.0)
o = (o0 * w0[:, None] + o * wb[:, None]) / tl.where(tot > 0, tot, 1.0)[:, None]
tl.store(so_ptr + sr[:, None] * DV + dv[None, :], o, mask=$store_mask)
tl.store(lse_ptr + sr, tl.where(tot > 0, mx + tl.log2(tot), float("-inf")), mask=mt)
"""


def key_pieces(D: int, rope: int = 0) -> list[tuple[int, int, int, int]]:
    """The qk dot pieces (offset, width, end, rope_at): power-of-two pieces of [0, D), `end`
    masking a last partial piece. `rope` > 0: the keys' last `rope` columns come from a separate
    [B, S, rope] tensor shared by every head (MLA's rope key): pieces of [0, D - rope) from k,
    then pieces of [D - rope, D) read at column offset - rope_at of the rope key."""
    n = D - rope
    pieces = [(o, w, n, 0) for o, w in dot_pieces(n)]
    return pieces + [(n + o, w, D, n) for o, w in dot_pieces(rope)] if rope else pieces


def _flash_scores(pieces, D: int, tma: bool, at: str, out: str, bounded: bool, widest_last: bool = False) -> list[str]:
    """Scores `out` of the query block against the key block at row `at`, over the qk dot pieces
    (`widest_last`: the widest piece's product last, the one left running when the scores are
    issued ahead). `bounded`: keys past S masked (rows past S read as zeros through descriptors)."""
    lines = [] if tma else [f"j = {at} + tl.arange(0, BN)"] + (["mj = j < S"] if bounded else [])
    for i, (off, w, end, rope_at) in enumerate(pieces):
        m = (["mj[:, None]"] if bounded else []) + ([f"(d{i} < {end})[None, :]"] if off + w > end else [])
        mask = f", mask={' & '.join(m)}, other=0.0" if m else ""
        row = f"krb + j[:, None] * skrs + (d{i} - {rope_at})[None, :]" if rope_at else f"kb + j[:, None] * sks + d{i}[None, :]"
        lines.append(f"k{i} = kd{i}.load([{at}, 0])" if tma else f"k{i} = tl.load({row}{mask})")
    order = list(range(len(pieces)))[::-1 if widest_last else 1]
    lines.append(f"{out} = tl.dot(q{order[0]}, tl.trans(k{order[0]}), input_precision=PREC)")
    lines += [f"{out} = tl.dot(q{i}, tl.trans(k{i}), {out}, input_precision=PREC)" for i in order[1:]]
    return lines


def _flash_update(DV: int, masked: bool, fold: bool, lazy: float, tma: bool, at: str, j_set: bool = False) -> list[str]:
    """The online softmax of scores `s` of the key block at row `at` (log2 domain, the scale in q
    when `fold`, else one FMA on the scores), then p v into acc. `masked`: keys past S and past
    each query's position masked (the diagonal blocks). `lazy` > 0: acc and l_i are rescaled only
    when a row's maximum grew by more than `lazy` (log2 units), so p <= 2**lazy between rescales.
    `j_set`: j and mj already index the block (its scores were just computed)."""
    bdv = max(16, next_pow2(DV))
    lines = [] if j_set or (tma and not masked) else [f"j = {at} + tl.arange(0, BN)"] + (["mj = j < S"] if masked else [])
    if masked:
        lines.append('s = tl.where(mj[None, :] & (j[None, :] <= pos[:, None]), s, float("-inf"))')
    scaled, row_max = ("s", "tl.max(s, 1)") if fold else ("s * SCALE_LOG2E", "tl.max(s, 1) * SCALE_LOG2E")
    lines.append(f"m_new = tl.maximum(m_i, {row_max})")
    if lazy:
        lines += [f"if tl.max(m_new - m_i, 0) > {float(lazy)!r}:   # a row's maximum grew: rescale",
                  "    alpha = tl.exp2(m_i - m_new)",
                  "    acc = acc * alpha[:, None]",
                  "    l_i = l_i * alpha",
                  "    m_i = m_new"]
        ref = "m_i"
    else:
        ref = "m_new"
        if masked:      # a row that sees no key yet (only with q_start < 0) keeps m -inf
            lines.append('m_new = tl.where(m_new == float("-inf"), 0.0, m_new)')
        lines += ["alpha = tl.exp2(m_i - m_new)", "acc = acc * alpha[:, None]"]
    lines.append(f"p = tl.exp2({scaled} - {ref}[:, None])")
    lines.append("l_i = l_i * alpha + tl.sum(p, 1)" if not lazy else "l_i = l_i + tl.sum(p, 1)")
    vmask = (["mj[:, None]"] if masked else []) + ([f"(dv < {DV})[None, :]"] if bdv != DV else [])
    vm = f", mask={' & '.join(vmask)}, other=0.0" if vmask else ""
    lines.append(f"v = vd.load([{at}, 0])" if tma else f"v = tl.load(vb + j[:, None] * svs + dv[None, :]{vm})")
    lines.append("acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)")
    if not lazy:
        lines.append("m_i = m_new")
    return lines


def _key_loops(pieces, D: int, DV: int, cfg: dict, tma: bool) -> str:
    """The key loops of a query block: with `split`, the blocks every query of the block sees
    (keys below its first position) without masks, then the diagonal blocks masked; else one
    masked loop over all its keys. `overlap` (with split): the mask-free loop computes the next
    block's scores before this block's softmax, so the tensor cores have work while it runs."""
    fold, lazy = cfg.get("fold_scale", False), cfg.get("lazy_rescale", 0)
    step = lambda masked, at="j0": (_flash_scores(pieces, D, tma, at, "s", masked)
                                    + _flash_update(DV, masked, fold, lazy, tma, at, j_set=not tma))
    body = lambda lines: textwrap.indent("\n".join(lines), "    ")
    masked = f"for j0 in range(0, hi, BN):\n{body(step(True))}"
    if not cfg.get("split", True):
        return masked
    lo = "lo = tl.maximum(tl.minimum(qpos + t0, S), 0) // BN * BN    # keys every query of the block sees"
    masked = masked.replace("range(0, hi, BN)", "range(lo, hi, BN)")
    if not cfg.get("overlap", False):
        return f"{lo}\nfor j0 in range(0, lo, BN):\n{body(step(False))}\n{masked}"
    # the first block's scores ahead of the loop (bounded: unused when lo is 0, and S may be < BN);
    # the next block's products chain through one accumulator, so only the last (the widest) is
    # still running when the softmax starts (Triton 3.6 waits for the others on sm_90)
    return "\n".join([lo, *_flash_scores(pieces, D, tma, "0", "s", True),
                      "for j0 in range(0, lo - BN, BN):",
                      body(_flash_scores(pieces, D, tma, "j0 + BN", "s_next", False, True)
                           + _flash_update(DV, False, fold, lazy, tma, "j0") + ["s = s_next"]),
                      "if lo > 0:",
                      body(_flash_update(DV, False, fold, lazy, tma, "lo - BN")), masked])


LOG2E = 1.4426950408889634



@functools.lru_cache(maxsize=None)
def latent_specs(H: int, R: int, P: int, dtype: str, scale: float, rows: int, target: str,
                 page_size: int = 0, pages: int = 0, tokens: int = 1 << 30):
    """The split and merge kernels. PAGE_BLOCKS when no key block straddles a page (one page
    per slot, or pages and splits in whole blocks): each block then reads its page once and its
    rows as one contiguous tile (H200, B=32 at 32k: per-key row gathers ran at 28% of copy).
    page_size 0: not known yet (ahead-of-time builds), taken as whole blocks. Up to
    `small_tokens` query tokens (B x T) take the BM_small row tile."""
    cfg = config("mla_decode", target)
    small = tokens <= cfg.get("small_tokens", 0)
    bm = cfg.get("BM_small", 64) if small else cfg.get("BM", 64)
    cols = (cfg.get("merge_cols_small", 0) if small else 0) or cfg.get("merge_cols", 0)
    BM = max(16, min(next_pow2(rows), bm))
    BS = cfg["BS"]
    page_blocks = pages == 1 or (page_size % BS == 0 and cfg["split_min"] % BS == 0)
    consts = {"H": H, "R": R, "P": P, "BR": max(16, next_pow2(R)), "BP": max(16, next_pow2(P)),
              "BM": BM, "BS": BS, "SCALE_LOG2E": float(scale) * LOG2E, "PAGE_BLOCKS": page_blocks,
              "DT": TL_DTYPES[dtype], "PREC": dot_precision(dtype), "SPLIT_MIN": cfg["split_min"],
              "MS": cfg.get("merge_splits", 1)}
    consts["BRM"] = min(consts["BR"], max(16, next_pow2(cols or R)))
    src = render("mla_latent_attention", _LATENT, consts, online_softmax=_ONLINE_SOFTMAX)
    p = ptr_type(dtype)
    split = KernelSpec("mla_latent_split", "mla_latent_split", src,
                       {"ql_ptr": p, "qr_ptr": p, "c_ptr": p, "kr_ptr": p, "qs_ptr": "*i64", "slot_ptr": "*i64",
                        "tab_ptr": "*i32", "op_ptr": "*fp32", "lse_ptr": "*fp32", "T": "i32", "S": "i32",
                        "PS": "i32", "MAXP": "i32", "sql": "i32", "sqr": "i32"},
                       cfg["num_warps"], cfg["num_stages"], consts)
    merge = KernelSpec("mla_latent_merge", "mla_latent_merge", src,
                       {"op_ptr": "*fp32", "lse_ptr": "*fp32", "qs_ptr": "*i64", "slot_ptr": "*i64", "o_ptr": p, "T": "i32",
                        "S": "i32", "nsp": "i32"}, 4, 1, consts)
    return split, merge


@functools.lru_cache(maxsize=None)
def cache_write_spec(C: int, dtype: str, target: str) -> KernelSpec:
    src = render("cache_write", _CACHE_WRITE, {"C": C, "BC": next_pow2(C)})
    p = ptr_type(dtype)
    return KernelSpec("cache_write_rows", "cache_write_rows", src,
                      {"new_ptr": p, "qs_ptr": "*i64", "slot_ptr": "*i64", "tab_ptr": "*i32", "c_ptr": p,
                       "T": "i32", "PS": "i32", "MAXP": "i32", "ns": "i32"}, 1, 1, {"C": C})


@functools.lru_cache(maxsize=None)
def cache_rows_spec(CA: int, CB: int, dtype: str, eps: float, target: str) -> KernelSpec:
    consts = {"CA": CA, "CB": CB, "BA": next_pow2(CA), "BB": next_pow2(CB), "EPS": float(eps), "DT": TL_DTYPES[dtype]}
    p = ptr_type(dtype)
    return KernelSpec("cache_write_norm_pair", "cache_write_norm_pair",
                      render("cache_write_norm_pair", _CACHE_ROWS, consts),
                      {"a_ptr": p, "nw_ptr": p, "b_ptr": p, "qs_ptr": "*i64", "slot_ptr": "*i64", "tab_ptr": "*i32",
                       "ca_ptr": p, "cb_ptr": p, "T": "i32", "PS": "i32", "MAXP": "i32", "sa": "i32", "sb": "i32"},
                      4, 1, consts)


@dataclass
class CacheRows:
    """An rmsnorm whose output only a cache_write reads, and the next cache_write of the same
    positions (MLA's normalised latent and its shared key slice): one step at the second write's
    place, one launch (cache_write_norm_pair) when both caches are paged views of one page table,
    else the norm, then each write."""
    ops: list                 # [rmsnorm, its cache_write, the other cache_write]
    inputs: list[str]         # the norm's x and weight, the two caches, the second's rows, the positions
    outputs: list[str]        # the two caches

    def fused_specs(self, g, target: str) -> list[KernelSpec]:
        a, b = (g.types[op.inputs[1]] for op in self.ops[1:])
        return [cache_rows_spec(a.shape[-1], b.shape[-1], a.dtype, float(self.ops[0].attrs["eps"]), target)]


def cache_rows(g, order: list, covered) -> dict[int, CacheRows]:
    """second cache_write's op id -> its step (see CacheRows)."""
    out, pending = {}, None
    index = {op.id: i for i, op in enumerate(order)}
    for op in order:
        if op.kind != "cache_write" or not covered(g, op):
            continue
        norm = g.defining_op(op.inputs[1])
        if norm is not None and norm.kind == "rmsnorm" and covered(g, norm) and op.inputs[1] not in g.outputs \
                and [u.id for u in g.users(op.inputs[1])] == [op.id]:
            pending = (norm, op)
            continue
        if pending is not None and pending[1].inputs[2] == op.inputs[2] \
                and g.types[pending[1].inputs[1]].shape[:-1] == g.types[op.inputs[1]].shape[:-1] \
                and all(index.get(u.id, -1) > index[op.id] for u in g.users(pending[1].outputs[0])):
            norm, first = pending
            out[op.id] = CacheRows([norm, first, op], [norm.inputs[0], norm.inputs[1], first.inputs[0],
                                                       op.inputs[0], op.inputs[1], op.inputs[2]],
                                   list(first.outputs) + list(op.outputs))
        pending = None
    return out


def run_cache_rows(item: CacheRows, args: list) -> list:
    """A CacheRows step's outputs (the two caches) from its inputs."""
    from .norm import rmsnorm
    x, nw, ca, cb, nb, pos = args
    eps = item.ops[0].attrs["eps"]
    if not (isinstance(ca, PagedRows) and isinstance(cb, PagedRows) and ca.slots is cb.slots
            and ca.table is cb.table and ca.page_size == cb.page_size and x.dim() == 3 and nb.shape[:2] == x.shape[:2]
            and x.dtype == nb.dtype == ca.dtype == cb.dtype):
        return [cache_write(ca, rmsnorm(x, nw, eps), pos), cache_write(cb, nb, pos)]
    B, T, CA = x.shape
    spec = cache_rows_spec(CA, nb.shape[2], ir_dtype(x), float(eps), current_target())
    if B * T:
        (xa, sa), (xb, sb) = row_view(x), row_view(nb)
        launch(spec, (B * T,), xa, nw.to(x.dtype).contiguous(), xb, pos.contiguous(), ca.slots, ca.table, ca.storage,
               cb.storage, T, ca.page_size, ca.table.shape[1], sa, sb)
    return [ca, cb]


@dataclass
class SplitKeyAttention:
    """causal_attention whose keys are concat(k, expand(reshape(rope_key))) read by it alone
    (MLA's decompressed prefill form): one flash launch reading k and the shared rope key
    [B, S, P] apart, with no concatenated [B, S, H, D] key copy."""
    ops: list                 # [reshape, expand?, concat, causal_attention]
    inputs: list[str]         # q, k, rope_key [B, S, P], v, q_start?
    outputs: list[str]

    def fused_specs(self, g, target: str) -> list[KernelSpec]:
        q, v, kr = (g.types[x] for x in (self.inputs[0], self.inputs[3], self.inputs[2]))
        return [flash_spec(q.shape[2], q.shape[3], v.shape[3], q.dtype, float(self.ops[-1].attrs["scale"]),
                           target, False, kr.shape[2])]


def split_key_attentions(g, order: list, covered) -> dict[int, SplitKeyAttention]:
    """attention op id -> its SplitKeyAttention step, where the pattern holds."""
    def sole(v, op):           # v read by op alone, and not a graph output
        return v not in g.outputs and [u.id for u in g.users(v)] == [op.id]

    out = {}
    for op in order:
        cat = g.defining_op(op.inputs[1]) if op.kind == "causal_attention" and covered(g, op) else None
        if cat is None or cat.kind != "concat" or len(cat.inputs) != 2 or not sole(cat.outputs[0], op) \
                or cat.attrs["dim"] % 4 != 3:
            continue
        chain, user = [cat], cat
        src = g.defining_op(cat.inputs[1])
        if src is not None and src.kind == "expand" and sole(src.outputs[0], user):
            chain, user, src = [src] + chain, src, g.defining_op(src.inputs[0])
        if src is None or src.kind != "reshape" or not sole(src.outputs[0], user):
            continue
        kr, k = g.types[src.inputs[0]], g.types[cat.inputs[0]]
        if kr.rank != 3 or k.rank != 4 or g.types[src.outputs[0]].shape != kr.shape[:2] + (1, kr.shape[2]) \
                or kr.shape[:2] != k.shape[:2]:
            continue
        out[op.id] = SplitKeyAttention([src] + chain + [op], [op.inputs[0], cat.inputs[0], src.inputs[0],
                                                              *op.inputs[2:]], list(op.outputs))
    return out


def run_split_key_attention(item: SplitKeyAttention, args: list) -> list:
    q, k, kr, v, *q_start = args
    if not config("attention", current_target()).get("rope_apart", True):       # the graph's own form
        B, S, H, _ = k.shape
        k, kr = torch.cat([k, kr.to(k.dtype)[:, :, None].expand(B, S, H, kr.shape[2])], -1), None
    return [causal_attention(q, k, v, q_start[0] if q_start else None, scale=item.ops[-1].attrs["scale"],
                             rope_key=kr)]


@dataclass
class PrefixAttention:
    """A SplitKeyAttention whose k and v are the two slices of reshape(linear(latent, W)) read
    by it alone (MLA's prefill over its cache: keys and values decompressed from every cached
    latent row): one step that decompresses `key_block` rows at a time and merges each block's
    flash attention into a running (o, lse) state, so memory is bounded by the block, not the
    context (prefix_attention). Up to key_block rows it is the SplitKeyAttention as it was."""
    ops: list                 # [linear, reshape, slice k, slice v, *SplitKeyAttention.ops]
    inputs: list[str]         # q, latent [B, S, R], W [H (N + V), R], rope_key [B, S, P], q_start?
    outputs: list[str]

    def fused_specs(self, g, target: str) -> list[KernelSpec]:
        q, kr = g.types[self.inputs[0]], g.types[self.inputs[3]]
        args = (q.shape[2], q.shape[3], self.ops[3].attrs["end"] - self.ops[3].attrs["start"], q.dtype,
                float(self.ops[-1].attrs["scale"]), target, False, kr.shape[2])
        return [flash_spec(*args), flash_spec(*args, state=True)]


def prefix_attentions(g, steps: dict, folded=frozenset()) -> dict[int, PrefixAttention]:
    """attention op id -> its PrefixAttention step, for the SplitKeyAttention `steps` whose k and
    v are the pattern's slices (and whose linear no other step has taken: ids in `folded`)."""
    def sole(v, ids):          # v read by the ops `ids` alone, and not a graph output
        return v not in g.outputs and sorted(u.id for u in g.users(v)) == sorted(ids)

    out = {}
    for key, sk in steps.items():
        att, cat = sk.ops[-1], sk.ops[-2]
        ks, vs = g.defining_op(sk.inputs[1]), g.defining_op(sk.inputs[3])
        if ks is None or vs is None or ks.kind != "slice" or vs.kind != "slice" or ks.inputs[0] != vs.inputs[0]:
            continue
        kv = g.defining_op(ks.inputs[0])
        lin = g.defining_op(kv.inputs[0]) if kv is not None and kv.kind == "reshape" else None
        if lin is None or lin.kind != "linear" or lin.id in folded or lin.inputs[1] not in g.params \
                or not sole(lin.outputs[0], [kv.id]) \
                or not sole(kv.outputs[0], [ks.id, vs.id]) or not sole(ks.outputs[0], [cat.id]) \
                or not sole(vs.outputs[0], [att.id]):
            continue
        t, lat = g.types[kv.outputs[0]], g.types[lin.inputs[0]]
        N = ks.attrs["end"]
        if lat.rank != 3 or t.rank != 4 or ks.attrs["dim"] % 4 != 3 or vs.attrs["dim"] % 4 != 3 \
                or ks.attrs["start"] != 0 or vs.attrs["start"] != N or vs.attrs["end"] != t.shape[3] \
                or t.shape[:2] != lat.shape[:2]:
            continue
        out[key] = PrefixAttention([lin, kv, ks, vs, *sk.ops], [sk.inputs[0], lin.inputs[0], lin.inputs[1],
                                                                sk.inputs[2], *sk.inputs[4:]], list(sk.outputs))
    return out


def run_prefix_attention(item: PrefixAttention, args: list) -> list:
    q, latent, w, kr, *q_start = args
    return [prefix_attention(q, latent, w, kr, q_start[0] if q_start else None,
                             nope=item.ops[2].attrs["end"], scale=item.ops[-1].attrs["scale"])]


def _cache_rows(cache, start: int, n: int) -> torch.Tensor:
    """Rows [start, start + n) of a [B, S, C] cache (dense, or a PagedRows view gathered)."""
    if not isinstance(cache, PagedRows):
        return cache[:, start:start + n]
    if start == 0 and n == cache.window:
        return cache.dense()
    B = cache.slots.shape[0]
    pos = torch.arange(start, start + n, device=cache.device).expand(B, n)
    return cache.storage.flatten(0, 1)[cache.rows(pos)]


def prefix_attention(q, latent, w_kv, rope_key, q_start=None, *, nope: int, scale: float,
                     key_block: int | None = None):
    """MLA's prefill attention over a cache -> [B, T, H, V]: queries q [B, T, H, N + P] (query t
    of sequence b at q_start[b] + t, default S - T), keys k_h ‖ rope_key and values v_h, where
    k_h ‖ v_h = latent W_kv_h^T [N + V] per head is decompressed from the latent rows [B, S, R]
    (dense or paged views) `key_block` rows at a time (default: the "attention" config's
    key_block). Each block's flash attention merges into a running (o, lse) state, so memory
    stays O(T + key_block) at any S; up to key_block rows, one block and one plain launch."""
    B, T, H, D = q.shape
    S, P = latent.shape[1], rope_key.shape[2]
    if w_kv.shape[0] % H or w_kv.shape[1] != latent.shape[2] or D != nope + P or rope_key.shape[:2] != (B, S):
        raise ValueError(f"q {tuple(q.shape)}, latent {tuple(latent.shape)}, W {tuple(w_kv.shape)}, rope_key "
                         f"{tuple(rope_key.shape)} do not fit MLA with {nope} nope dims")
    cfg = config("attention", current_target())
    block = key_block or cfg.get("key_block", 16384)
    DV = w_kv.shape[0] // H - nope
    state = None if S <= block else (torch.zeros(B, T, H, DV, device=q.device, dtype=torch.float32),
                                     torch.full((B, T, H), float("-inf"), device=q.device, dtype=torch.float32))
    qs = _q_start(q_start, B, T, S, q.device)
    for k0 in range(0, S, block):
        n = min(block, S - k0)
        lat = _cache_rows(latent, k0, n)
        kv = torch.nn.functional.linear(lat, w_kv.to(lat.dtype)).view(B, n, H, nope + DV)
        k, kr = kv[..., :nope], _cache_rows(rope_key, k0, n)
        if not cfg.get("rope_apart", True):         # the graph's own form: the keys concatenated
            k, kr = torch.cat([k, kr.to(k.dtype)[:, :, None].expand(B, n, H, P)], -1), None
        o = causal_attention(q, k, kv[..., nope:], qs, scale=scale, rope_key=kr, state=state, key_offset=k0)
    return o if state is None else o.to(q.dtype)


def _paged(cache, B: int):
    """(flat storage, slot index, page table, page size, capacity) of a cache: a PagedRows view
    as it lives, or a dense [B, S, C] tensor as B slots of one S-row page."""
    if isinstance(cache, PagedRows):
        return cache.storage, cache.slots, cache.table, cache.page_size, cache.capacity
    S = cache.shape[1]
    idx = torch.arange(B, device=cache.device)
    return cache.contiguous(), idx, idx.to(torch.int32).view(-1, 1), S, S


def cache_write(cache, new, pos):
    """The cache_write op: a PagedRows view gets rows new [B,T,C] at positions pos[b] + t in
    place (and is returned); a dense cache is copied first (the op's functional form)."""
    if not isinstance(cache, PagedRows):
        return get_op("cache_write").ref([cache, new, pos], {})[0]
    B, T, C = new.shape
    if new.dtype != cache.dtype:
        raise ValueError(f"cache_write: rows {new.dtype} into a {cache.dtype} cache")
    spec = cache_write_spec(C, ir_dtype(new), current_target())
    if B * T:
        rows, ns = row_view(new)
        launch(spec, (B * T,), rows, pos.contiguous(), cache.slots, cache.table, cache.storage,
               T, cache.page_size, cache.table.shape[1], ns)
    return cache


def _q_start(q_start, B, T, S, device):
    if q_start is None:
        return torch.full((B,), S - T, dtype=torch.int64, device=device)
    if q_start.shape != (B,):
        raise ValueError(f"q_start must be [{B}], got {tuple(q_start.shape)}")
    return q_start.to(device=device, dtype=torch.int64).contiguous()


def _rows_of(q: torch.Tensor) -> torch.Tensor:
    """q [B,T,H,D] as is when its (b, t, h) rows are evenly strided with unit-stride D (e.g.
    the q_lat / q_rope slices of one projection), else a contiguous copy."""
    B, T, H, D = q.shape
    s = q.stride(2)
    if q.stride(3) == 1 and (T == 1 or q.stride(1) == H * s) and (B == 1 or q.stride(0) == T * H * s):
        return q
    return q.contiguous()


def split_count(cap: int, programs_per_split: int, cfg: dict) -> int:
    """Splits of a capacity of `cap` keys: about split_keys keys each (a program streams its keys
    at a bounded rate, and each split writes a partial output the merge reads back), at least
    min_splits while each keeps split_min keys, and at most enough programs to fill the GPU
    (H200, B=1, 32 heads: 32k in 66 splits 43 us vs 79 us in 264; 1k needs >= 16 splits)."""
    most_programs = max(1, cfg.get("programs", 264) // max(1, programs_per_split))
    fewest = min(cfg.get("min_splits", 16), -(-cap // cfg["split_min"]))
    return max(1, min(most_programs, max(fewest, -(-cap // cfg.get("split_keys", 512)))))


def mla_latent_attention(q_lat, q_rope, latent, rope_key, q_start=None, *, scale, splits=None):
    """softmax((q_lat.latent + q_rope.rope_key) * scale) latent over visible keys -> [B,T,H,R].
    The caches are dense [B,S,*] or PagedRows views, read through their page table. The
    split count depends on the capacity, not the length, so one launch fits every length."""
    B, T, H, R = q_lat.shape
    S, P = latent.shape[1], rope_key.shape[2]
    if q_rope.shape[:3] != (B, T, H) or tuple(latent.shape) != (B, S, R) or tuple(rope_key.shape) != (B, S, P):
        raise ValueError(f"q_lat {tuple(q_lat.shape)}, q_rope {tuple(q_rope.shape)}, latent "
                         f"{tuple(latent.shape)}, rope_key {tuple(rope_key.shape)} do not fit")
    dt = q_lat.dtype
    qs = _q_start(q_start, B, T, S, q_lat.device)
    c_rows, slots, table, PS, cap = _paged(latent, B)
    kr_rows, *_ = _paged(rope_key, B)
    target = current_target()
    split, merge = latent_specs(H, R, P, ir_dtype(q_lat), float(scale), T * H, target,
                                PS, table.shape[1], B * T)
    if kr_rows.dtype != dt or c_rows.dtype != dt:
        raise ValueError(f"latent {c_rows.dtype} / rope_key {kr_rows.dtype} caches must be {dt}")
    nrb = -(-T * H // split.config["BM"])
    if splits is None:
        splits = split_count(cap, B * nrb, config("mla_decode", target))
    op = torch.empty(B * T * H, splits, R, device=q_lat.device, dtype=torch.float32)
    lse = torch.empty(B * T * H, splits, device=q_lat.device, dtype=torch.float32)
    o = torch.empty(B, T, H, R, device=q_lat.device, dtype=dt)
    ql, qr = _rows_of(q_lat), _rows_of(q_rope.to(dt))
    launch(split, (B, nrb, splits), ql, qr, c_rows, kr_rows, qs, slots, table, op, lse, T, S, PS,
           table.shape[1], ql.stride(2), qr.stride(2))
    launch(merge, (B * T * H, -(-R // merge.config["BRM"])), op, lse, qs, slots, o, T, S, splits)
    return o


@functools.lru_cache(maxsize=None)
def flash_spec(H: int, D: int, DV: int, dtype: str, scale: float, target: str, aligned: bool = False,
               rope: int = 0, state: bool = False) -> KernelSpec:
    """The prefill attention kernel on `target`'s "attention" config: tiles BM x BN, warps,
    stages; split (mask-free blocks below the diagonal), order ("heavy_first": the longest query
    blocks first; "forward"), fold_scale (scale * log2 e folded into q once, in q's dtype),
    lazy_rescale (log2 growth of a row's maximum before acc is rescaled; 0: every block), maxnreg
    (registers a thread at most; 0: the compiler's choice), tma
    (q, k, v tiles through tensor descriptors: TMA on sm_90+; taken only when `aligned`, i.e.
    the tensors meet tma_aligned). `rope` > 0: the keys' last `rope` columns come from a
    separate rope key shared by every head (see key_pieces; no tensor descriptors then).
    `state`: the form that merges into a running (o, lse) state over earlier key blocks, its
    keys at positions koff + j (see _LOAD_STATE; causal_attention's `state`)."""
    cfg = config("attention", target)
    if cfg.get("order", "heavy_first") not in ("heavy_first", "forward"):
        raise ValueError(f"attention order {cfg['order']!r}: 'heavy_first' or 'forward'")
    tma = bool(cfg.get("tma", False)) and aligned and not rope and (TARGETS[target]["arch"] or 90) >= 90    # sm_90+, interpreter
    pieces = key_pieces(D, rope)
    load_q = []
    if tma:         # one descriptor per (b, h) and dot piece: [rows, the piece's columns up to D]
        load_q += [f"kd{i} = tl.make_tensor_descriptor(kb{f' + {off}' if off else ''}, shape=[S, {D - off}], strides=[sks, 1], "
                   f"block_shape=[BN, {w}])" for i, (off, w, _, _) in enumerate(pieces)]
        load_q.append(f"vd = tl.make_tensor_descriptor(vb, shape=[S, {DV}], strides=[svs, 1], block_shape=[BN, BDV])")
    for i, (off, w, end, _) in enumerate(pieces):
        mask = "mt[:, None]" + (f" & (d{i} < {end})[None, :]" if off + w > end else "")
        if tma:
            load_q.append(f"q{i} = tl.make_tensor_descriptor(q_ptr + b.to(tl.int64) * sqb + h * sqh{f' + {off}' if off else ''}, "
                          f"shape=[T, {D - off}], strides=[sqt, 1], block_shape=[BM, {w}]).load([t0, 0])")
        else:
            load_q.append(f"d{i} = {off} + tl.arange(0, {w})")
            load_q.append(f"q{i} = tl.load(qb + d{i}[None, :], mask={mask}, other=0.0)")
        if cfg.get("fold_scale", False):
            load_q.append(f"q{i} = (q{i} * SCALE_LOG2E).to(q{i}.dtype)")
    BDV = max(16, next_pow2(DV))
    consts = {"H": H, "DV": DV, "BDV": BDV, "BM": cfg["BM"], "BN": cfg["BN"],
              "SCALE_LOG2E": float(scale) * LOG2E, "DT": TL_DTYPES[dtype], "PREC": dot_precision(dtype),
              "HEAVY_FIRST": cfg.get("order", "heavy_first") == "heavy_first"}
    if cfg.get("maxnreg"):      # in the source, so the cap is part of the kernel's hash
        consts["MAXNREG"] = int(cfg["maxnreg"])
    store_mask = "mt[:, None]" + (f" & (dv < {DV})[None, :]" if BDV != DV else "")
    store = "tl.store(o_ptr + b.to(tl.int64) * sob + h * soh + t[:, None] * sot + dv[None, :], o.to(DT), mask=$store_mask)"
    src = render("causal_attention", _FLASH, consts, load_q="\n".join(load_q),
                 key_loops=_key_loops(pieces, D, DV, cfg, tma),
                 rope_params=", kr_ptr, skrb, skrs" if rope else "",
                 rope_base="krb = kr_ptr + b.to(tl.int64) * skrb" if rope else "",
                 state_params=", so_ptr, lse_ptr, koff" if state else "",
                 qpos="(tl.load(qs_ptr + b) - koff).to(tl.int32)" if state else "tl.load(qs_ptr + b).to(tl.int32)",
                 load_state=_LOAD_STATE.replace("$store_mask", store_mask) if state else "",
                 store=(_STORE_STATE if state else store).replace("$store_mask", store_mask))
    p = ptr_type(dtype)
    sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "qs_ptr": "*i64", "o_ptr": p, "T": "i32", "S": "i32"}
    sig.update({n: "i32" for n in ("sqb", "sqt", "sqh", "skb", "sks", "skh", "svb", "svs", "svh",
                                   "sob", "sot", "soh")})
    if rope:
        sig.update({"kr_ptr": p, "skrb": "i32", "skrs": "i32"})
    if state:
        sig.update({"so_ptr": "*fp32", "lse_ptr": "*fp32", "koff": "i32"})
    return KernelSpec("causal_attention_fwd", "causal_attention_fwd", src, sig, cfg["num_warps"],
                      cfg["num_stages"], {**consts, "pieces": pieces, "tma": tma, "maxnreg": cfg.get("maxnreg", 0)})


def tma_aligned(D: int, *ts: torch.Tensor) -> bool:
    """Whether tensor descriptors can read q, k, v [B, *, H, d] per (b, h) and dot piece: 16-byte
    aligned bases and piece offsets, row, head and batch strides in multiples of 16 bytes."""
    return all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:3])
               for t in ts) and all(off * ts[0].element_size() % 16 == 0 for off, _ in dot_pieces(D))


def causal_attention(q, k, v, q_start=None, *, scale, rope_key=None, state=None, key_offset: int = 0):
    """q [B,T,H,D], k [B,S,H,D], v [B,S,H,Dv] (any strides with a unit last dim) -> [B,T,H,Dv].
    With `rope_key` [B,S,P]: k is [B,S,H,D-P] and each head's keys are k ‖ rope_key (MLA's
    prefill keys without their concatenated copy).
    `state` (o [B,T,H,Dv] fp32, lse [B,T,H] fp32 contiguous): these queries' attention over other
    keys so far (lse -inf: none yet), merged in place with this call's keys, which sit at
    positions key_offset + j (query t of sequence b still at q_start[b] + t); returns o, fp32.
    Key blocks merged in any order give the attention over all of them (flash-decoding's merge)."""
    B, T, H, D = q.shape
    S, DV = k.shape[1], v.shape[3]
    P = 0 if rope_key is None else rope_key.shape[2]
    if k.shape != (B, S, H, D - P) or v.shape[:3] != (B, S, H) or (P and rope_key.shape != (B, S, P)):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
                         + (f", rope_key {tuple(rope_key.shape)}" if P else "") + " do not fit")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k.to(q.dtype), v.to(q.dtype)))
    target = current_target()
    if state is not None and (state[0].shape != (B, T, H, DV) or state[1].shape != (B, T, H)
                              or any(x.dtype != torch.float32 or not x.is_contiguous() for x in state)):
        raise ValueError(f"state must be contiguous fp32 o [{B}, {T}, {H}, {DV}] and lse [{B}, {T}, {H}]")
    spec = flash_spec(H, D, DV, ir_dtype(q), float(scale), target,
                      not P and config("attention", target).get("tma", False) and tma_aligned(D, q, k, v), P,
                      state is not None)
    if spec.config["tma"]:
        use_descriptor_scratch()
    o = torch.empty(B, T, H, DV, device=q.device, dtype=q.dtype) if state is None else state[0]
    qs = _q_start(q_start, B, T, S, q.device)
    strides = [st for t in (q, k, v, o) for st in (t.stride(0), t.stride(1), t.stride(2))]
    if P:
        kr = rope_key.to(q.dtype)
        kr = kr if kr.stride(-1) == 1 else kr.contiguous()
        strides += [kr, kr.stride(0), kr.stride(1)]
    if state is not None:
        strides += [state[0], state[1], key_offset]
    launch(spec, (B * H, -(-T // spec.config["BM"])), q, k, v, qs, o, T, S, *strides)
    return o


def op_mla_latent_attention(args, attrs):
    return [mla_latent_attention(*args[:4], args[4] if len(args) > 4 else None, scale=attrs["scale"])]


def op_causal_attention(args, attrs):
    return [causal_attention(*args[:3], args[3] if len(args) > 3 else None, scale=attrs["scale"])]


def op_cache_write(args, attrs):
    return [cache_write(*args)]


def specs_for(kind, ins, outs, attrs, target):
    if kind == "cache_write":
        return [cache_write_spec(ins[1].shape[2], ins[1].dtype, target)]
    if kind == "causal_attention":
        q, v = ins[0], ins[2]
        # the graph's q, k, v are 16-byte aligned (a projection's reshape, a concat, a slice at 128)
        return [flash_spec(q.shape[2], q.shape[3], v.shape[3], q.dtype, float(attrs["scale"]), target, True)]
    ql, qr = ins[0], ins[1]
    T, H = ql.shape[1], ql.shape[2]
    rows = T * H if isinstance(T, int) else 1 << 20
    return list(latent_specs(H, ql.shape[3], qr.shape[3], ql.dtype, float(attrs["scale"]), rows, target))
