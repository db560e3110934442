"""The MoE router in two kernels: the router logits x W^T split over (token, expert, K) blocks
into fp32 partial sums, so a few tokens still spread over the whole GPU; then the selection
per token (sum of the partials in a fixed order, sigmoid, + bias for selection, grouped top-k,
renormalise, scale), entirely in registers. Up to `fused_max` tokens (decode) take one launch:
the same logits programs, each taking a ticket from a counter once its partials are stored; the
last to arrive does the selection (same order, bitwise the same result) and resets the counter
(codegen.tickets), so a CUDA graph replays it as captured.

Ties: among exactly equal scores the lowest expert (and group) index wins. Groups may have any
size the config allows (6 experts in 2 groups, 3 in 3): the selection pads each group to a power
of two, so the padded [groups, experts-per-group] layout reshapes exactly."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kimi_graph.ops import get_op

from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render, tickets
from .elementwise import ir_dtype, ptr_type
from .targets import config, current_target

_LOGITS = """
@triton.jit
def _logits_block(x_ptr, w_ptr, part_ptr, N, KCH, r_ptr, nw_ptr, s_ptr, xn_ptr):
    # program (token block, expert block, K split): part[s, n, e] = sum over split s of x[n, k] w[e, k].
    # NORM (one token block: RF rows): x is add_rmsnorm(x, r) * nw, computed here as rmsnorm_rows
    # does (x + r in the data dtype, rstd over the whole row first, the normalised row rounded,
    # times nw, rounded); the
    # programs of expert block 0 store their K slice of x + r (s) and of the normalised x (xn)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    mr = rows < N
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    me = e < E
    k_lo = tl.program_id(2) * KCH
    k_hi = tl.minimum(k_lo + KCH, D)
    dk = tl.arange(0, BK)
    if PREFETCH:                        # the first weight tile in flight before the norm's reads
        mkn = k_lo + dk < k_hi
        wn = tl.load(w_ptr + e[None, :] * D + k_lo + dk[:, None], mask=me[None, :] & mkn[:, None], other=0.0)
    if NORM:                            # one token block of RF rows: their whole rows at once
        rf = tl.arange(0, RF)
        kn = tl.arange(0, DP)
        mn = (rf < N)[:, None] & (kn < D)[None, :]
        xs = tl.load(x_ptr + rf[:, None] * D + kn[None, :], mask=mn, other=0.0) \
            + tl.load(r_ptr + rf[:, None] * D + kn[None, :], mask=mn, other=0.0)
        xf = xs.to(tl.float32)
        rs = 1.0 / tl.sqrt(tl.sum(xf * xf, 1) / D + EPS)
        rstd = tl.sum(tl.where(rows[:, None] == rf[None, :], rs[None, :], 0.0), 1)     # per row of the tile
    acc = tl.zeros((BN, BE), tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        mk = k0 + dk < k_hi
        xo = rows[:, None] * D + k0 + dk[None, :]
        mx = mr[:, None] & mk[None, :]
        x = tl.load(x_ptr + xo, mask=mx, other=0.0)
        if NORM:
            x = x + tl.load(r_ptr + xo, mask=mx, other=0.0)
            if tl.program_id(1) == 0:
                tl.store(s_ptr + xo, x, mask=mx)
            nw = tl.load(nw_ptr + k0 + dk, mask=mk, other=0.0).to(tl.float32)
            x = ((x.to(tl.float32) * rstd[:, None]).to(DT).to(tl.float32) * nw[None, :]).to(DT)
            if tl.program_id(1) == 0:
                tl.store(xn_ptr + xo, x, mask=mx)
        if PREFETCH:                    # this tile, the next one's loads issued before its product
            w = wn
            mkn = k0 + BK + dk < k_hi
            wn = tl.load(w_ptr + e[None, :] * D + k0 + BK + dk[:, None], mask=me[None, :] & mkn[:, None], other=0.0)
        else:
            w = tl.load(w_ptr + e[None, :] * D + k0 + dk[:, None], mask=me[None, :] & mk[:, None], other=0.0)
        acc += tl.dot(x.to(CT), w.to(CT), input_precision="ieee")
    out = part_ptr + tl.program_id(2).to(tl.int64) * N * E + rows[:, None] * E + e[None, :]
    tl.store(out, acc, mask=mr[:, None] & me[None, :])
"""

_LOGITS_KERNEL = """
@triton.jit
def moe_router_logits(x_ptr, w_ptr, part_ptr, N, KCH):
    # grid (token blocks, expert blocks, K splits)
    _logits_block(x_ptr, w_ptr, part_ptr, N, KCH, x_ptr, x_ptr, x_ptr, x_ptr)
"""

_SLOTS = """
@triton.jit
def _slots():
    # experts laid out [NGP groups, EGP slots]: each slot's expert, whether it is one, its slot
    f = tl.arange(0, BEP)
    slot = f % EGP
    e = (f // EGP) * EG + slot
    return e, (slot < EG) & (e < E), slot


@triton.jit
def _ranked(acc, e, me, slot, bias_ptr, R: tl.constexpr):
    # from logits acc [R, BEP]: expert ids for comparisons (padding slots E: never match), the
    # scores the selection ranks (sigmoid + bias, groups applied; padding -inf), the weights' source
    ek = tl.where(me, e, E)
    scores = 1.0 / (1.0 + tl.exp(-acc))
    choice = scores + tl.load(bias_ptr + e, mask=me, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(me[None, :], choice, float("-inf"))
    $groups
    picked = tl.where(me[None, :], picked, float("-inf"))
    return ek, picked, $weights_from
"""

_SELECT_ARGMAX = """
@triton.jit
def _select_rows(acc, e, me, slot, bias_ptr, ids_ptr, wts_ptr, rows, mr, R: tl.constexpr):
    # the R tokens `rows` (mr: real ones) from their logits acc [R, BEP] (padding slots masked)
    ek, picked, src = _ranked(acc, e, me, slot, bias_ptr, R)
    tot = tl.zeros((R,), tl.float32)
    for j in tl.static_range(TOPK):
        best = tl.max(picked, 1)
        idx = tl.min(tl.where(picked == best[:, None], ek[None, :], E), 1)
        hit = ek[None, :] == idx[:, None]
        wj = tl.sum(tl.where(hit, src, 0.0), 1)
        picked = tl.where(hit, float("-inf"), picked)
        tl.store(ids_ptr + rows * TOPK + j, idx.to(tl.int64), mask=mr)
        tl.store(wts_ptr + rows * TOPK + j, wj, mask=mr)
        tot += wj
    if RENORM:
        inv = SCALING / (tot + 1e-20)
    else:
        inv = tl.full((R,), SCALING, tl.float32)
    for j in tl.static_range(TOPK):
        wj = tl.load(wts_ptr + rows * TOPK + j, mask=mr, other=0.0)
        tl.store(wts_ptr + rows * TOPK + j, wj * inv, mask=mr)
"""

# the same selection with one reduction per pick: each slot's score and expert packed into one
# int64 key (the score's bits made order-preserving, -0.0 as +0.0, then E - 1 - expert: among equal
# scores the lowest expert is the largest key), the TOPK largest keys taken in turn; each pick's
# weight gathered afterwards (exact: one nonzero per sum) and summed in pick order, as above
_SELECT_PACKED = """
@triton.jit
def _select_rows(acc, e, me, slot, bias_ptr, ids_ptr, wts_ptr, rows, mr, R: tl.constexpr):
    # the R tokens `rows` (mr: real ones) from their logits acc [R, BEP] (padding slots masked)
    ek, picked, src = _ranked(acc, e, me, slot, bias_ptr, R)
    bits = (picked + 0.0).to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (bits.to(tl.int64) << 32) | (-ek + (E - 1)).to(tl.int64)
    key = tl.where(me[None, :], key, KEY_MIN)
    jj = tl.arange(0, TKP)
    best = tl.zeros((R, TKP), tl.int64)
    for j in tl.static_range(TOPK):
        top = tl.max(key, 1)
        key = tl.where(key == top[:, None], KEY_MIN, key)
        best = tl.where(jj[None, :] == j, top[:, None], best)
    idx = -best.to(tl.int32) + (E - 1)          # the low word: E - 1 - expert
    hit = ek[None, None, :] == idx[:, :, None]
    w = tl.sum(tl.where(hit, src[:, None, :], 0.0), 2)
    tot = tl.zeros((R,), tl.float32)
    for j in tl.static_range(TOPK):
        tot += tl.sum(tl.where(jj[None, :] == j, w, 0.0), 1)
    if RENORM:
        inv = SCALING / (tot + 1e-20)
    else:
        inv = tl.full((R,), SCALING, tl.float32)
    out = rows[:, None] * TOPK + jj[None, :]
    mo = mr[:, None] & (jj[None, :] < TOPK)
    tl.store(ids_ptr + out, idx.to(tl.int64), mask=mo)
    tl.store(wts_ptr + out, w * inv[:, None], mask=mo)
"""

_SELECT_KERNEL = """
@triton.jit
def moe_router_select(part_ptr, bias_ptr, ids_ptr, wts_ptr, N, S):
    # grid (token blocks of BR,): the S partials summed in a fixed order, then the selection
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    mr = rows < N
    e, me, slot = _slots()
    m2 = mr[:, None] & me[None, :]
    acc = tl.zeros((BR, BEP), tl.float32)
    p = part_ptr + rows[:, None] * E + e[None, :]
    for s0 in range(0, S, SU):          # SU partials a step, their loads issued together (past S: + 0.0)
        for u in tl.static_range(SU):
            acc += tl.load(p + (s0 + u) * N * E, mask=m2 & (tl.full((BR, BEP), s0 + u, tl.int32) < S), other=0.0)
    _select_rows(acc, e, me, slot, bias_ptr, ids_ptr, wts_ptr, rows, mr, BR)
"""

_FUSED_KERNEL = """
@triton.jit
def moe_router(x_ptr, w_ptr, part_ptr, bias_ptr, ids_ptr, wts_ptr, ticket_ptr, N, KCH, r_ptr, nw_ptr, s_ptr, xn_ptr):
    # grid as moe_router_logits with one token block (N <= RF <= BN); each program then takes a
    # ticket, and the last to arrive (every partial stored) sums the SF partials in the select
    # kernel's order (unrolled: its loads issue together, past L1), selects, and resets the ticket.
    # NORM: the add_rmsnorm that feeds the router inline (_logits_block)
    _logits_block(x_ptr, w_ptr, part_ptr, N, KCH, r_ptr, nw_ptr, s_ptr, xn_ptr)
    tl.debug_barrier()                  # every thread's partials stored before the ticket
    if tl.atomic_add(ticket_ptr, 1, sem="acq_rel") == tl.num_programs(1) * tl.num_programs(2) - 1:
        tl.store(ticket_ptr, 0)
        rows = tl.arange(0, RF)
        mr = rows < N
        e, me, slot = _slots()
        m2 = mr[:, None] & me[None, :]
        acc = tl.zeros((RF, BEP), tl.float32)
        p = part_ptr + rows[:, None] * E + e[None, :]
        for s in tl.static_range(SF):
            acc += tl.load(p + s * N * E, mask=m2, other=0.0, cache_modifier=".cg")
        _select_rows(acc, e, me, slot, bias_ptr, ids_ptr, wts_ptr, rows, mr, RF)
"""

# the selection's forms (the moe_route "select" key): "argmax" takes each pick's best score, then
# its lowest expert, then its weight (three reductions a pick); "packed" one reduction a pick
SELECTIONS = {"argmax": _SELECT_ARGMAX, "packed": _SELECT_PACKED}

_GROUPS = """
# keep the TOPK_GROUP groups with the best top-2 sums (ties: lowest group); other experts' scores
# become 0 (padding slots and padding groups hold -inf and are never kept)
g3 = tl.reshape(choice, (R, NGP, EGP))
s3 = tl.reshape(slot[None, :] + tl.zeros((R, BEP), tl.int32), (R, NGP, EGP))
t1 = tl.max(g3, 2)
i1 = tl.min(tl.where(g3 == t1[:, :, None], s3, EGP), 2)
gs = $group_score
gi = tl.arange(0, NGP)
keep = tl.zeros((R, NGP), tl.int32)
for _ in tl.static_range(TOPK_GROUP):
    gb = tl.max(gs, 1)
    gbi = tl.min(tl.where(gs == gb[:, None], gi[None, :], NGP), 1)
    keep = tl.where(gi[None, :] == gbi[:, None], 1, keep)
    gs = tl.where(gi[None, :] == gbi[:, None], float("-inf"), gs)
keep_e = tl.reshape(keep[:, :, None] + tl.zeros((R, NGP, EGP), tl.int32), (R, BEP))
picked = tl.where(keep_e > 0, choice, 0.0)
"""


def _compute_type(xdt: str, wdt: str):
    """bf16 x bf16 (f16 x f16) products are exact in fp32: tensor cores with fp32 accumulation give
    the fp32 router's numbers; any other mix computes in fp32 (exact "ieee" dot)."""
    return TL_DTYPES[xdt] if xdt == wdt and xdt in ("bf16", "f16") else TL_DTYPES["f32"]


@functools.lru_cache(maxsize=None)
def logits_spec(D, E, xdt, wdt, small, target) -> KernelSpec:
    cfg = config("moe_route", target)
    sfx = "_small" if small else ""
    consts = {"D": D, "E": E, "BN": cfg["BN" + sfx], "BE": min(cfg["BE" + sfx], max(16, next_pow2(E))),
              "BK": cfg["BK" + sfx], "CT": _compute_type(xdt, wdt), "NORM": False, "DP": 1, "EPS": 0.0,
              "DT": TL_DTYPES[xdt], "PREFETCH": bool(small and cfg["prefetch"])}
    src = render("moe_router_logits", _LOGITS + _LOGITS_KERNEL, consts)
    sig = {"x_ptr": ptr_type(xdt), "w_ptr": ptr_type(wdt), "part_ptr": "*fp32", "N": "i32", "KCH": "i32"}
    return KernelSpec("moe_router_logits", "moe_router_logits", src, sig, cfg["num_warps" + sfx],
                      cfg["num_stages" + sfx], {**cfg, **consts})


def _selection(E, top_k, n_group, topk_group, renorm, scaling, weights, cfg) -> tuple[dict, dict]:
    """The selection's constants and source blocks."""
    if E % n_group or not 0 < topk_group <= n_group or not 0 < top_k <= E:
        raise ValueError(f"bad routing: {E} experts, {n_group} groups, topk_group {topk_group}, top_k {top_k}")
    EG = E // n_group
    EGP, NGP = next_pow2(EG), next_pow2(n_group)
    BEP = max(16, EGP * NGP)
    NGP = BEP // EGP                    # at least 16 slots: extra groups are padding
    if cfg["select"] not in SELECTIONS:
        raise ValueError(f"moe_route select {cfg['select']!r}: one of {', '.join(SELECTIONS)}")
    consts = {"E": E, "EG": EG, "EGP": EGP, "NGP": NGP, "BEP": BEP, "BR": cfg["BR"], "SU": cfg["select_unroll"], "TOPK": top_k,
              "TOPK_GROUP": topk_group, "RENORM": bool(renorm and top_k > 1), "SCALING": float(scaling)}
    if cfg["select"] == "packed":
        consts.update(TKP=next_pow2(top_k), KEY_MIN=-(1 << 63))
    top2 = "t1 + tl.max(tl.where(s3 == i1[:, :, None], float('-inf'), g3), 2)" if EG > 1 else "t1"
    groups = _GROUPS.replace("$group_score", top2) if n_group > 1 else "picked = choice"
    return consts, {"groups": groups, "weights_from": "choice" if weights == "official" else "scores"}


def _select_source(cfg: dict) -> str:
    return _SLOTS + SELECTIONS[cfg["select"]]


@functools.lru_cache(maxsize=None)
def select_spec(E, top_k, n_group, topk_group, renorm, scaling, weights, target) -> KernelSpec:
    cfg = config("moe_route", target)
    consts, blocks = _selection(E, top_k, n_group, topk_group, renorm, scaling, weights, cfg)
    src = render("moe_router_select", _select_source(cfg) + _SELECT_KERNEL, consts, **blocks)
    sig = {"part_ptr": "*fp32", "bias_ptr": "*fp32", "ids_ptr": "*i64", "wts_ptr": "*fp32", "N": "i32", "S": "i32"}
    return KernelSpec("moe_router_select", "moe_router_select", src, sig, cfg["select_warps"], 1, {**cfg, **consts})


@functools.lru_cache(maxsize=None)
def fused_spec(D, E, xdt, wdt, top_k, n_group, topk_group, renorm, scaling, weights, target,
               tokens: int | None = None, norm_eps: float | None = None) -> KernelSpec | None:
    """The router in one launch for up to `fused_max` tokens (the small logits tiles, one token
    block; None when fused_max is 0), its selection over `tokens` rows (default: fused_max):
    bitwise the two kernels' result. norm_eps: with the add_rmsnorm that feeds it inline."""
    cfg = config("moe_route", target)
    lg = logits_spec(D, E, xdt, wdt, True, target)
    rows = min(cfg["fused_max"], cfg["small_max"])
    if rows <= 0:
        return None
    if rows > lg.config["BN"]:
        raise ValueError(f"moe_route fused_max {cfg['fused_max']} exceeds one token block (BN_small {lg.config['BN']})")
    consts, blocks = _selection(E, top_k, n_group, topk_group, renorm, scaling, weights, cfg)
    consts.update({k: lg.config[k] for k in ("D", "BN", "BE", "BK", "CT", "DT", "PREFETCH")},
                  RF=next_pow2(min(tokens or rows, rows)), SF=_splits(rows, D, E, lg)[0],
                  NORM=norm_eps is not None, DP=next_pow2(D), EPS=float(norm_eps or 0.0))
    name = "moe_router" + ("_norm" if norm_eps is not None else "")
    src = render(name, _LOGITS + _select_source(cfg) + _FUSED_KERNEL, consts, **blocks)
    p = ptr_type(xdt)
    sig = {"x_ptr": p, "w_ptr": ptr_type(wdt), "part_ptr": "*fp32", "bias_ptr": "*fp32",
           "ids_ptr": "*i64", "wts_ptr": "*fp32", "ticket_ptr": "*i32", "N": "i32", "KCH": "i32",
           "r_ptr": p, "nw_ptr": p, "s_ptr": p, "xn_ptr": p}
    return KernelSpec(name, "moe_router", src, sig, lg.num_warps, lg.num_stages,
                      {**cfg, **consts, "max_tokens": rows})


def _splits(N: int, D: int, E: int, spec: KernelSpec) -> tuple[int, int]:
    """(K splits, K per split) from the shape alone: enough programs to fill the GPU."""
    c = spec.config
    blocks = -(-N // c["BN"]) * -(-E // c["BE"])
    want = max(1, min(-(-c["programs"] // blocks), -(-D // c["BK"])))
    kch = -(-(-(-D // want)) // c["BK"]) * c["BK"]
    return -(-D // kch), kch


def moe_route(x, gate_weight, bias, *, top_k, n_group=1, topk_group=1, renormalize=True, scaling=1.0,
              weights="official"):
    """-> (ids [..., top_k] i64, weights [..., top_k] fp32): the op library's moe_route."""
    if weights not in ("official", "unbiased"):
        raise ValueError(f"weights must be 'official' or 'unbiased', got {weights!r}")
    E, D = gate_weight.shape
    if x.shape[-1] != D or bias.shape != (E,):
        raise ValueError(f"x {tuple(x.shape)}, gate_weight {tuple(gate_weight.shape)}, bias {tuple(bias.shape)}")
    if bias.dtype != torch.float32:
        raise TypeError("the triton router computes in fp32: bias must be fp32")
    lead = x.shape[:-1]
    xf = x.reshape(-1, D).contiguous()
    N = xf.shape[0]
    target = current_target()
    sel = select_spec(E, top_k, n_group, topk_group, renormalize, float(scaling), weights, target)
    ids = torch.empty(N, top_k, device=x.device, dtype=torch.int64)
    wts = torch.empty(N, top_k, device=x.device, dtype=torch.float32)
    if N:
        xdt, wdt = ir_dtype(x), ir_dtype(gate_weight)
        lg = logits_spec(D, E, xdt, wdt, N <= sel.config["small_max"], target)
        S, kch = _splits(N, D, E, lg)
        part = torch.empty(S, N, E, device=x.device, dtype=torch.float32)
        grid = (-(-N // lg.config["BN"]), -(-E // lg.config["BE"]), S)
        one = fused_spec(D, E, xdt, wdt, top_k, n_group, topk_group, renormalize, float(scaling), weights, target,
                         N) if N <= sel.config["fused_max"] else None
        if one is not None:
            launch(one, grid, xf, gate_weight.contiguous(), part, bias.contiguous(), ids, wts, tickets(x.device, 1),
                   N, kch, xf, xf, xf, xf)
        else:
            launch(lg, grid, xf, gate_weight.contiguous(), part, N, kch)
            launch(sel, (-(-N // sel.config["BR"]),), part, bias.contiguous(), ids, wts, N, S)
    return ids.view(*lead, top_k), wts.view(*lead, top_k)


def takes_norm(x, residual, gate_weight) -> bool:
    """Does `routed_norm` run the norm inside the router's one launch? Decode-sized (up to
    fused_max tokens), moe_route's norm_inline on, x and the residual of one float dtype."""
    if x.dtype != residual.dtype or x.shape != residual.shape or x.dtype not in (torch.float32, torch.bfloat16,
                                                                                  torch.float16):
        return False
    cfg = config("moe_route", current_target())
    return bool(cfg["norm_inline"]) and 0 < x.numel() // x.shape[-1] <= min(cfg["fused_max"], cfg["small_max"])


def routed_norm(x, residual, norm_weight, eps, gate_weight, bias, **route):
    """add_rmsnorm(x, residual) * norm_weight, then moe_route of it: (ids, weights, normalised x,
    x + residual), the norm inside the router's one launch where `takes_norm`, else its kernel
    then the router."""
    from .norm import rmsnorm
    if not takes_norm(x, residual, gate_weight):
        xn, s = rmsnorm(x, norm_weight, eps, residual=residual)
        return (*moe_route(xn, gate_weight, bias, **route), xn, s)
    E, D = gate_weight.shape
    if x.shape[-1] != D or bias.shape != (E,) or norm_weight.shape != (D,) or bias.dtype != torch.float32:
        raise ValueError(f"x {tuple(x.shape)}, gate_weight {tuple(gate_weight.shape)}, bias {tuple(bias.shape)} "
                         f"{bias.dtype}, norm weight {tuple(norm_weight.shape)} do not fit")
    top_k = route["top_k"]
    xf, rf = x.reshape(-1, D).contiguous(), residual.reshape(-1, D).to(x.dtype).contiguous()
    N = xf.shape[0]
    target = current_target()
    attrs = (top_k, route.get("n_group", 1), route.get("topk_group", 1), route.get("renormalize", True),
             float(route.get("scaling", 1.0)), route.get("weights", "official"))
    lg = logits_spec(D, E, ir_dtype(x), ir_dtype(gate_weight), True, target)
    one = fused_spec(D, E, ir_dtype(x), ir_dtype(gate_weight), *attrs, target, N, float(eps))
    S, kch = _splits(N, D, E, lg)
    ids = torch.empty(N, top_k, device=x.device, dtype=torch.int64)
    wts = torch.empty(N, top_k, device=x.device, dtype=torch.float32)
    xn, s = torch.empty_like(xf), torch.empty_like(xf)
    part = torch.empty(S, N, E, device=x.device, dtype=torch.float32)
    launch(one, (1, -(-E // lg.config["BE"]), S), xf, gate_weight.contiguous(), part, bias.contiguous(), ids, wts,
           tickets(x.device, 1), N, kch, rf, norm_weight.to(x.dtype).contiguous(), s, xn)
    lead = x.shape[:-1]
    return ids.view(*lead, top_k), wts.view(*lead, top_k), xn.view(x.shape), s.view(x.shape)


@dataclass
class NormRoute:
    """An add_rmsnorm whose normalised output a moe_route op reads: one step at the norm's place
    (`routed_norm`: the norm inside the router's launch at decode sizes, else both kernels)."""
    ops: list                 # [add_rmsnorm, moe_route]
    inputs: list[str]         # the norm's operands (x, residual, weight), the router's weight and bias
    outputs: list[str]        # the router's (ids, weights), then the norm's (normalised, sum)

    def fused_specs(self, g, target: str) -> list[KernelSpec]:
        """The router-with-norm kernels of every decode token count (none with norm_inline off)."""
        norm, route = self.ops
        cfg = config("moe_route", target)
        if not cfg["norm_inline"]:
            return []
        x, w = g.types[route.inputs[0]], g.types[route.inputs[1]]
        a = get_op("moe_route").full_attrs(route.attrs)
        specs = [fused_spec(x.shape[-1], w.shape[0], x.dtype, w.dtype, a["top_k"], a["n_group"], a["topk_group"],
                            a["renormalize"], float(a["scaling"]), a["weights"], target, n, float(norm.attrs["eps"]))
                 for n in range(1, min(cfg["fused_max"], cfg["small_max"]) + 1)]
        return list({s.hash: s for s in specs if s}.values())


def norm_routes(g, order: list, covered) -> dict[int, NormRoute]:
    """add_rmsnorm op id -> its step, for each norm whose normalised output feeds a moe_route."""
    out = {}
    for op in order:
        if op.kind != "add_rmsnorm" or not covered(g, op) or op.outputs[0] in g.outputs:
            continue
        route = next((u for u in g.users(op.outputs[0]) if u.kind == "moe_route" and u.inputs[0] == op.outputs[0]
                      and covered(g, u)), None)
        if route is not None:
            out[op.id] = NormRoute([op, route], list(op.inputs) + list(route.inputs[1:]),
                                   list(route.outputs) + list(op.outputs))
    return out


def run_norm_route(item: NormRoute, args: list, attrs: dict) -> list:
    """A NormRoute step's outputs from its inputs; attrs: the router op's (full) attributes."""
    x, r, nw, w, b = args
    return list(routed_norm(x, r, nw, item.ops[0].attrs["eps"], w, b, top_k=attrs["top_k"],
                            n_group=attrs["n_group"], topk_group=attrs["topk_group"],
                            renormalize=attrs["renormalize"], scaling=attrs["scaling"], weights=attrs["weights"]))


def specs(x, w, attrs, target) -> list[KernelSpec]:
    """Every router kernel one op may launch (both logits variants), for AOT builds."""
    sel = select_spec(w.shape[0], attrs["top_k"], attrs["n_group"], attrs["topk_group"], attrs["renormalize"],
                      float(attrs["scaling"]), attrs["weights"], target)
    fused = config("moe_route", target)["fused_max"]
    ones = [fused_spec(x.shape[-1], w.shape[0], x.dtype, w.dtype, attrs["top_k"], attrs["n_group"], attrs["topk_group"],
                       attrs["renormalize"], float(attrs["scaling"]), attrs["weights"], target, n)
            for n in range(1, fused + 1)]
    return ([logits_spec(x.shape[-1], w.shape[0], x.dtype, w.dtype, small, target) for small in (True, False)]
            + [sel] + list({s.hash: s for s in ones if s}.values()))
