"""MoE token permutation and its inverse.

Permute: a parallel stable counting sort of the M = N*top_k token copies by expert. Copies are cut
into blocks of BLOCK; `moe_count` takes each block's expert histogram, `moe_scan` turns the
histograms into each block's first slot per expert (an exclusive scan over blocks, per expert)
and the expert totals, and `moe_scatter` ranks every copy inside its block (copies of one
expert keep their order: stable), writes `order` and copies the token's row to its slot. When
the copies fit in one block (decode) only `moe_scatter` runs, one program per SUB copies, each
counting the block itself. Every launch is sized from shapes: nothing is read back to the host
(CUDA-graph capturable).

Un-permute: out[n] = acc[n] + sum_j w[n, j] y[slot of copy (n, j)], with the slots from `order`.
"""
from __future__ import annotations

import functools

import torch

from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render
from .elementwise import ir_dtype, ptr_type
from .targets import config, current_target

_PERMUTE = """
@triton.jit
def moe_count(ids_ptr, counts_ptr, M):
    # grid (blocks,): counts[b, e] = copies of block b routed to expert e
    m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + m, mask=m < M, other=E).to(tl.int32)
    e = tl.arange(0, NB)
    tl.store(counts_ptr + tl.program_id(0) * E + e, tl.histogram(ids, NB), mask=e < E)


@triton.jit
def moe_scan(counts_ptr, base_ptr, tot_ptr, nblocks):
    # grid (expert blocks,): base[b, e] = sum of counts[:b, e]; tot[e] = sum of counts[:, e]
    e = tl.program_id(0) * SCAN_E + tl.arange(0, SCAN_E)
    me = e < E
    run = tl.zeros((SCAN_E,), tl.int32)
    for b0 in range(0, nblocks, SCAN_B):
        b = b0 + tl.arange(0, SCAN_B)
        m = (b < nblocks)[:, None] & me[None, :]
        c = tl.load(counts_ptr + b[:, None] * E + e[None, :], mask=m, other=0)
        tl.store(base_ptr + b[:, None] * E + e[None, :], run[None, :] + tl.cumsum(c, 0) - c, mask=m)
        run += tl.sum(c, 0)
    tl.store(tot_ptr + e, run, mask=me)


@triton.jit
def moe_scatter(ids_ptr, base_ptr, tot_ptr, $x_arg order_ptr, off_ptr, $rows_arg M):
    # slot of copy m = first slot of its expert + copies of that expert in earlier blocks + earlier
    # copies in this block; rows[slot] = x[m // TOPK] (unless only the order is wanted). Grid
    # (blocks, column blocks); with ONE_BLOCK, (SUB-copy chunks, column blocks), each program
    # counting the whole block itself
    e = tl.arange(0, NB)
    i = tl.arange(0, SUB)
    earlier = i[None, :] < i[:, None]
    if ONE_BLOCK:
        mb = tl.arange(0, BLOCK)
        block = tl.load(ids_ptr + mb, mask=mb < M, other=E).to(tl.int32)
        tot = tl.where(e < E, tl.histogram(block, NB), 0)
        lo = tl.program_id(0) * SUB
        run = tl.cumsum(tot, 0) - tot + tl.histogram(tl.where(mb < lo, block, E), NB)
        hi = lo + SUB
    else:
        lo = tl.program_id(0) * BLOCK
        tot = tl.load(tot_ptr + e, mask=e < E, other=0)
        run = tl.cumsum(tot, 0) - tot + tl.load(base_ptr + tl.program_id(0) * E + e, mask=e < E, other=0)
        hi = tl.minimum(M, lo + BLOCK)
    if tl.program_id(0) + tl.program_id(1) == 0:
        tl.store(off_ptr + 1 + e, tl.cumsum(tot, 0).to(tl.int64), mask=e < E)
        tl.store(off_ptr + e, tl.zeros((NB,), tl.int64), mask=e == 0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = d < D
    for s in range(lo, hi, SUB):
        m = s + i
        mm = m < M
        ids = tl.load(ids_ptr + m, mask=mm, other=E).to(tl.int32)
        same = (ids[:, None] == ids[None, :]) & earlier
        slot = tl.gather(run, ids, 0) + tl.sum(same.to(tl.int32), 1)
        if tl.program_id(1) == 0:
            tl.store(order_ptr + slot, m.to(tl.int64), mask=mm)
        $copy
        run += tl.histogram(ids, NB)
"""

# a token's weighted sum of its expert rows, the one form every combine takes (bitwise alike):
# rows by slot (p = tok * TOPK + j) or sorted by expert (p = inv[tok * TOPK + j]); y read past L1
# (moe_decode_down combines rows other programs of its launch have just stored)
WEIGHTED_ROWS = """
@triton.jit
def _weighted_rows(y_ptr, inv_ptr, w_ptr, a, tok, d, md, BY_SLOT: tl.constexpr):
    # a + sum_j w[tok, j] y[p_j, d] in fp32, j = 0 .. TOPK - 1 in order
    for j in tl.static_range(TOPK):
        if BY_SLOT:
            p = (tok * TOPK + j).to(tl.int64)
        else:
            p = tl.load(inv_ptr + tok * TOPK + j)
        wj = tl.load(w_ptr + tok * TOPK + j).to(tl.float32)
        a += wj * tl.load(y_ptr + p * D + d, mask=md, other=0.0, cache_modifier=".cg").to(tl.float32)
    return a
"""

_UNPERMUTE = WEIGHTED_ROWS + """
@triton.jit
def moe_inverse(order_ptr, inv_ptr, M):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < M
    tl.store(inv_ptr + tl.load(order_ptr + p, mask=m, other=0), p.to(tl.int64), mask=m)


@triton.jit
def moe_unpermute(y_ptr, $inv_arg w_ptr, acc_ptr, out_ptr):
    # grid (tokens, D blocks): out[n] = acc[n] + sum_j w[n, j] y[p], p = inv[n * TOPK + j] (rows
    # sorted by expert), or p = n * TOPK + j itself (rows in each token's own slots: the combine)
    tok = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = d < D
    a = tl.load(acc_ptr + tok * D + d, mask=md, other=0.0).to(tl.float32)
    a = _weighted_rows(y_ptr, $inv, w_ptr, a, tok, d, md, $by_slot)
    tl.store(out_ptr + tok * D + d, a.to(DT), mask=md)
"""


@functools.lru_cache(maxsize=None)
def permute_specs(D, E, top_k, dtype, one_block, target, copy=True):
    """(count, scan, scatter) kernels; with one_block, the scatter counts its single block;
    without `copy`, it writes only the order and offsets (D and dtype unused)."""
    cfg = config("moe_permute", target)
    consts = {"D": D, "E": E, "NB": next_pow2(E + 1), "TOPK": top_k, "BLOCK": cfg["BLOCK"], "SUB": cfg["SUB"],
              "BD": min(cfg["BD"], next_pow2(D)), "SCAN_E": cfg["SCAN_E"], "SCAN_B": cfg["SCAN_B"],
              "ONE_BLOCK": bool(one_block)}
    rows = """src = (m // TOPK).to(tl.int64)
v = tl.load(x_ptr + src[:, None] * D + d[None, :], mask=mm[:, None] & md[None, :])
tl.store(rows_ptr + slot.to(tl.int64)[:, None] * D + d[None, :], v, mask=mm[:, None] & md[None, :])"""
    src = render("moe_permute", _PERMUTE, consts, x_arg="x_ptr," if copy else "",
                 rows_arg="rows_ptr," if copy else "", copy=rows if copy else "pass")
    w, p = cfg["num_warps"], ptr_type(dtype)
    mk = lambda name, sig: KernelSpec(name, name, src, sig, w, 1, consts)
    x, r = ({"x_ptr": p}, {"rows_ptr": p}) if copy else ({}, {})
    return (mk("moe_count", {"ids_ptr": "*i64", "counts_ptr": "*i32", "M": "i32"}),
            mk("moe_scan", {"counts_ptr": "*i32", "base_ptr": "*i32", "tot_ptr": "*i32", "nblocks": "i32"}),
            KernelSpec("moe_scatter" if copy else "moe_sort", "moe_scatter", src,
                       {"ids_ptr": "*i64", "base_ptr": "*i32", "tot_ptr": "*i32", **x, "order_ptr": "*i64",
                        "off_ptr": "*i64", **r, "M": "i32"}, w, 1, consts))


def _counting_sort(ids, E, x=None):
    """-> (offsets [E+1] i64, order [M] i64) and, given x, rows [M, D]: x's rows sorted by expert."""
    if ids.dtype != torch.int64 or (x is not None and ids.shape[:-1] != x.shape[:-1]):
        raise ValueError(f"ids {tuple(ids.shape)} {ids.dtype} do not fit x {None if x is None else tuple(x.shape)}")
    D, k = (x.shape[-1] if x is not None else 1), ids.shape[-1]
    dtype = ir_dtype(x) if x is not None else "f32"
    flat = ids.reshape(-1).contiguous()
    M, dev = flat.numel(), ids.device
    target = current_target()
    nblocks = -(-M // config("moe_permute", target)["BLOCK"])
    count, scan, scatter = permute_specs(D, E, k, dtype, nblocks <= 1, target, x is not None)
    order = torch.empty(M, device=dev, dtype=torch.int64)
    offsets = torch.zeros(E + 1, device=dev, dtype=torch.int64)
    rows = torch.empty(M, D, device=dev, dtype=x.dtype) if x is not None else None
    if M:
        c = scatter.config
        base = torch.empty(nblocks, E, device=dev, dtype=torch.int32)
        tot = torch.empty(E, device=dev, dtype=torch.int32)
        if nblocks > 1:
            counts = torch.empty(nblocks, E, device=dev, dtype=torch.int32)
            launch(count, (nblocks,), flat, counts, M)
            launch(scan, (-(-E // c["SCAN_E"]),), counts, base, tot, nblocks)
        chunks = nblocks if nblocks > 1 else -(-M // c["SUB"])
        if x is None:
            launch(scatter, (chunks, 1), flat, base, tot, order, offsets, M)
        else:
            launch(scatter, (chunks, -(-D // c["BD"])), flat, base, tot, x.reshape(-1, D).contiguous(), order,
                   offsets, rows, M)
    return offsets, order, rows


def moe_permute(x, ids, num_experts):
    """-> rows [M, D] (token copies sorted by expert, stable), offsets [E+1] i64, order [M] i64."""
    offsets, order, rows = _counting_sort(ids, num_experts, x)
    return rows, offsets, order


def moe_sort(ids, num_experts):
    """-> offsets [E+1] i64, order [M] i64: moe_permute without the row copies."""
    return _counting_sort(ids, num_experts)[:2]


@functools.lru_cache(maxsize=None)
def unpermute_specs(D, top_k, dtype, wdt, target, by_token=False):
    """(inverse, un-permute) kernels; `by_token`: y's rows are already in each token's slots
    (the combine; no inverse)."""
    cfg = config("moe_permute", target)
    consts = {"D": D, "TOPK": top_k, "BLOCK": cfg["BLOCK"], "BD": min(1024, next_pow2(D)), "DT": TL_DTYPES[dtype]}
    src = render("moe_unpermute", _UNPERMUTE, consts, inv_arg="" if by_token else "inv_ptr,",
                 inv="y_ptr" if by_token else "inv_ptr", by_slot=str(by_token))
    p = ptr_type(dtype)
    inv = {} if by_token else {"inv_ptr": "*i64"}
    return (KernelSpec("moe_inverse", "moe_inverse", src, {"order_ptr": "*i64", "inv_ptr": "*i64", "M": "i32"},
                       4, 1, consts),
            KernelSpec("moe_combine" if by_token else "moe_unpermute", "moe_unpermute", src,
                       {"y_ptr": p, **inv, "w_ptr": ptr_type(wdt), "acc_ptr": p, "out_ptr": p}, 4, 1, consts))


def _check_unpermute(y, weights, acc):
    k, M = weights.shape[-1], y.shape[0]
    if weights.shape[:-1] != acc.shape[:-1] or M != weights.numel() or y.shape[1:] != acc.shape[-1:]:
        raise ValueError(f"y {tuple(y.shape)}, weights {tuple(weights.shape)}, acc {tuple(acc.shape)} do not fit")
    return unpermute_specs(acc.shape[-1], k, ir_dtype(acc), ir_dtype(weights), current_target(), False)


def moe_unpermute(y, order, weights, acc):
    inv_spec, un_spec = _check_unpermute(y, weights, acc)
    if order.shape != (y.shape[0],):
        raise ValueError(f"order {tuple(order.shape)} does not fit y {tuple(y.shape)}")
    M = y.shape[0]
    inv = torch.empty(M, device=y.device, dtype=torch.int64)
    out = torch.empty_like(acc.contiguous())
    if M:
        launch(inv_spec, (-(-M // inv_spec.config["BLOCK"]),), order.contiguous(), inv, M)
        launch(un_spec, (M // weights.shape[-1], -(-acc.shape[-1] // un_spec.config["BD"])),
               y.to(acc.dtype).contiguous(), inv, weights.contiguous(), acc.contiguous(), out)
    return out


def moe_combine(slots, weights, acc):
    """out[n] = acc[n] + sum_j weights[n, j] slots[n * k + j], j in order (deterministic)."""
    _check_unpermute(slots, weights, acc)
    spec = combine_specs(acc.shape[-1], weights.shape[-1], ir_dtype(acc), ir_dtype(weights), current_target())[0]
    out = torch.empty_like(acc.contiguous())
    if slots.shape[0]:
        launch(spec, (slots.shape[0] // weights.shape[-1], -(-acc.shape[-1] // spec.config["BD"])),
               slots.to(acc.dtype).contiguous(), weights.contiguous(), acc.contiguous(), out)
    return out


def combine_specs(D, top_k, dtype, wdt, target):
    return unpermute_specs(D, top_k, dtype, wdt, target, True)[1:]


def sort_specs(E, top_k, target) -> list[KernelSpec]:
    """moe_sort's kernels (one-block and multi-block forms), for AOT."""
    return [permute_specs(1, E, top_k, "f32", True, target, False)[2],
            *permute_specs(1, E, top_k, "f32", False, target, False)]


def specs(x, ids, attrs, target) -> list[KernelSpec]:
    """Every permutation kernel one op may launch (one-block and multi-block forms), for AOT."""
    out = []
    for one in (True, False):
        out += permute_specs(x.shape[-1], attrs["num_experts"], ids.shape[-1], x.dtype, one, target)[2 if one else 0:]
    return out
