"""The MoE router and sort as they were before the split router and the parallel counting sort
(commit 4d7eaef, lowering/triton/moe.py), kept here only so bench/moe_dispatch.py can time old
against new in one run: the router as one program per 16 tokens over all experts and the whole
of D (fp32 dot), ungrouped; the sort as one program counting and ranking every token copy."""
from __future__ import annotations

import functools

import torch

from kimi_graph.lowering.triton.codegen import KernelSpec, launch, next_pow2, render
from kimi_graph.lowering.triton.elementwise import ir_dtype, ptr_type

_ROUTE = """
@triton.jit
def moe_route_before(x_ptr, w_ptr, bias_ptr, ids_ptr, wts_ptr, N):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    mr = rows < N
    e = tl.arange(0, BE)
    me = e < E
    dk = tl.arange(0, BK)
    acc = tl.zeros((BN, BE), tl.float32)
    for k0 in range(0, D, BK):
        mk = k0 + dk < D
        x = tl.load(x_ptr + rows[:, None] * D + k0 + dk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + e[None, :] * D + k0 + dk[:, None], mask=me[None, :] & mk[:, None], other=0.0)
        acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    scores = 1.0 / (1.0 + tl.exp(-acc))
    choice = scores + tl.load(bias_ptr + e, mask=me, other=0.0).to(tl.float32)[None, :]
    picked = tl.where(me[None, :], choice, float("-inf"))
    tot = tl.zeros((BN,), tl.float32)
    for j in tl.static_range(TOPK):
        best = tl.max(picked, 1)
        idx = tl.min(tl.where(picked == best[:, None], e[None, :], BE), 1)
        hit = e[None, :] == idx[:, None]
        wj = tl.sum(tl.where(hit, choice, 0.0), 1)
        picked = tl.where(hit, float("-inf"), picked)
        tl.store(ids_ptr + rows * TOPK + j, idx.to(tl.int64), mask=mr)
        tl.store(wts_ptr + rows * TOPK + j, wj, mask=mr)
        tot += wj
    inv = SCALING / (tot + 1e-20)
    for j in tl.static_range(TOPK):
        wj = tl.load(wts_ptr + rows * TOPK + j, mask=mr, other=0.0)
        tl.store(wts_ptr + rows * TOPK + j, wj * inv, mask=mr)
"""

_SORT = """
@triton.jit
def moe_sort_before(ids_ptr, order_ptr, off_ptr, M):
    e = tl.arange(0, BE)
    m0 = tl.arange(0, BLOCK)
    counts = tl.zeros((BE,), tl.int32)
    for s in range(0, M, BLOCK):
        mm = s + m0 < M
        ids = tl.load(ids_ptr + s + m0, mask=mm, other=BE).to(tl.int32)
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), 0)
    ends = tl.cumsum(counts, 0)
    starts = ends - counts
    tl.store(off_ptr + 1 + e, ends.to(tl.int64), mask=e < E)
    tl.store(off_ptr + e, starts.to(tl.int64), mask=e == 0)
    before = (m0[None, :] < m0[:, None]).to(tl.int32)
    run = starts
    for s in range(0, M, BLOCK):
        mm = s + m0 < M
        ids = tl.load(ids_ptr + s + m0, mask=mm, other=BE).to(tl.int32)
        hot = (ids[:, None] == e[None, :]).to(tl.int32)
        base = tl.sum(hot * run[None, :], 1)
        same = (ids[:, None] == ids[None, :]).to(tl.int32) * before
        pos = base + tl.sum(same, 1)
        tl.store(order_ptr + pos, (s + m0).to(tl.int64), mask=mm)
        run += tl.sum(hot, 0)


@triton.jit
def moe_gather_rows_before(x_ptr, order_ptr, rows_ptr):
    p = tl.program_id(0)
    src = tl.load(order_ptr + p) // TOPK
    d = tl.arange(0, BD)
    for d0 in range(0, D, BD):
        m = d0 + d < D
        tl.store(rows_ptr + p * D + d0 + d, tl.load(x_ptr + src * D + d0 + d, mask=m), mask=m)
"""


@functools.lru_cache(maxsize=None)
def _route_spec(D, E, top_k, scaling, xdt, wdt):
    consts = {"D": D, "E": E, "BE": max(16, next_pow2(E)), "BN": 16, "BK": 64, "TOPK": top_k,
              "SCALING": float(scaling)}
    sig = {"x_ptr": ptr_type(xdt), "w_ptr": ptr_type(wdt), "bias_ptr": "*fp32", "ids_ptr": "*i64",
           "wts_ptr": "*fp32", "N": "i32"}
    return KernelSpec("moe_route_before", "moe_route_before", render("moe_route_before", _ROUTE, consts), sig, 4, 2,
                      consts)


def route(x, w, bias, top_k, scaling):
    """Ungrouped, official weights, renormalised: the published model's routing."""
    N = x.shape[0]
    spec = _route_spec(x.shape[1], w.shape[0], top_k, scaling, ir_dtype(x), ir_dtype(w))
    ids = torch.empty(N, top_k, device=x.device, dtype=torch.int64)
    wts = torch.empty(N, top_k, device=x.device, dtype=torch.float32)
    launch(spec, (-(-N // 16),), x, w, bias, ids, wts, N)
    return ids, wts


@functools.lru_cache(maxsize=None)
def _permute_specs(D, E, top_k, dtype):
    consts = {"D": D, "E": E, "BE": max(16, next_pow2(E)), "TOPK": top_k, "BLOCK": 256, "BD": min(1024, next_pow2(D))}
    src = render("moe_permute_before", _SORT, consts)
    return (KernelSpec("moe_sort_before", "moe_sort_before", src,
                       {"ids_ptr": "*i64", "order_ptr": "*i64", "off_ptr": "*i64", "M": "i32"}, 4, 1, consts),
            KernelSpec("moe_gather_rows_before", "moe_gather_rows_before", src,
                       {"x_ptr": ptr_type(dtype), "order_ptr": "*i64", "rows_ptr": ptr_type(dtype)}, 4, 1, consts))


def permute(x, ids, E):
    D, k = x.shape[-1], ids.shape[-1]
    flat = ids.reshape(-1)
    M = flat.numel()
    sort, gather = _permute_specs(D, E, k, ir_dtype(x))
    order = torch.empty(M, device=x.device, dtype=torch.int64)
    offsets = torch.zeros(E + 1, device=x.device, dtype=torch.int64)
    rows = torch.empty(M, D, device=x.device, dtype=x.dtype)
    launch(sort, (1,), flat, order, offsets, M)
    launch(gather, (M,), x, order, rows)
    return rows, offsets, order
