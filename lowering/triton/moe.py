"""MoE kernels: the router (fp32 sigmoid scores, + bias for selection, grouped top-k,
renormalise, scale), token permutation (stable sort by expert, then a row gather), the grouped
SwiGLU over packed expert weights (a device-side tile map; gate and up in one pass with
SiLU*up in the epilogue; then the down projection) and the weighted un-permute."""
from __future__ import annotations

import functools

import torch

from .codegen import dot_precision, TL_DTYPES, KernelSpec, launch, next_pow2, render
from .elementwise import ir_dtype, ptr_type
from .targets import config, current_target

_ROUTE = """
@triton.jit
def moe_route(x_ptr, w_ptr, bias_ptr, ids_ptr, wts_ptr, N):
    # grid (token blocks,): scores [BN, BE] in fp32, then selection entirely in registers
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
    choice = tl.where(me[None, :], choice, float("-inf"))
    $groups
    picked = tl.where(me[None, :], picked, float("-inf"))
    src = $weights_from
    tot = tl.zeros((BN,), tl.float32)
    for j in tl.static_range(TOPK):
        best = tl.max(picked, 1)
        idx = tl.min(tl.where(picked == best[:, None], e[None, :], BE), 1)
        hit = e[None, :] == idx[:, None]
        wj = tl.sum(tl.where(hit, src, 0.0), 1)
        picked = tl.where(hit, float("-inf"), picked)
        tl.store(ids_ptr + rows * TOPK + j, idx.to(tl.int64), mask=mr)
        tl.store(wts_ptr + rows * TOPK + j, wj, mask=mr)
        tot += wj
    if RENORM:
        inv = SCALING / (tot + 1e-20)
    else:
        inv = tl.full((BN,), SCALING, tl.float32)
    for j in tl.static_range(TOPK):
        wj = tl.load(wts_ptr + rows * TOPK + j, mask=mr, other=0.0)
        tl.store(wts_ptr + rows * TOPK + j, wj * inv, mask=mr)
"""

_GROUPS = """
# keep the TOPK_GROUP groups with the best top-2 sums; other experts' scores become 0
# (groups past NG hold only padding experts: their scores are -inf and they are never kept)
g3 = tl.reshape(choice, (BN, NGP, EG))
e3 = tl.reshape(e[None, :] + tl.zeros((BN, BE), tl.int32), (BN, NGP, EG)) % EG
t1 = tl.max(g3, 2)
i1 = tl.min(tl.where(g3 == t1[:, :, None], e3, EG), 2)
gs = $group_score
gi = tl.arange(0, NGP)
keep = tl.zeros((BN, NGP), tl.int32)
for _ in tl.static_range(TOPK_GROUP):
    gb = tl.max(gs, 1)
    gbi = tl.min(tl.where(gs == gb[:, None], gi[None, :], NGP), 1)
    keep = tl.where(gi[None, :] == gbi[:, None], 1, keep)
    gs = tl.where(gi[None, :] == gbi[:, None], float("-inf"), gs)
keep_e = tl.reshape(keep[:, :, None] + tl.zeros((BN, NGP, EG), tl.int32), (BN, BE))
picked = tl.where(keep_e > 0, choice, 0.0)
"""

_PERMUTE = """
@triton.jit
def moe_sort(ids_ptr, order_ptr, off_ptr, M):
    # one program: stable counting sort of the M token copies by expert
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
def moe_gather_rows(x_ptr, order_ptr, rows_ptr):
    # grid (M,): rows[p] = x[order[p] // TOPK]
    p = tl.program_id(0)
    src = tl.load(order_ptr + p) // TOPK
    d = tl.arange(0, BD)
    for d0 in range(0, D, BD):
        m = d0 + d < D
        tl.store(rows_ptr + p * D + d0 + d, tl.load(x_ptr + src * D + d0 + d, mask=m), mask=m)
"""

_GEMM = """
@triton.jit
def moe_tile_map(off_ptr, tile_e_ptr, tile_r_ptr, max_tiles):
    # grid (tile blocks,): tile t -> (expert, first row); -1 past the last tile
    e = tl.arange(0, BE)
    me = e < E
    lo = tl.load(off_ptr + e, mask=me, other=0)
    hi = tl.load(off_ptr + e + 1, mask=me, other=0)
    nt = (hi - lo + BM - 1) // BM
    tend = tl.cumsum(nt, 0)
    tstart = tend - nt
    t = tl.program_id(0) * TB + tl.arange(0, TB)
    ex = tl.sum((tend[None, :] <= t[:, None]).to(tl.int32), 1)
    hot = e[None, :] == ex[:, None]
    ts = tl.sum(tl.where(hot, tstart[None, :], 0), 1)
    row = tl.sum(tl.where(hot, lo[None, :], 0), 1) + (t - ts) * BM
    valid = ex < E
    tl.store(tile_e_ptr + t, tl.where(valid, ex, -1), mask=t < max_tiles)
    tl.store(tile_r_ptr + t, tl.where(valid, row, 0).to(tl.int32), mask=t < max_tiles)


@triton.jit
def moe_gate_up(x_ptr, off_ptr, w13_ptr, h_ptr, tile_e_ptr, tile_r_ptr):
    # grid (I blocks, tiles): h = silu(x w1^T) * (x w3^T) for one expert's rows; neighbouring
    # programs share the row tile and the expert (L2 reuse)
    ex = tl.load(tile_e_ptr + tl.program_id(1))
    if ex >= 0:
        r = tl.load(tile_r_ptr + tl.program_id(1)) + tl.arange(0, BM)
        mr = r < tl.load(off_ptr + ex + 1)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = n < I
        dk = tl.arange(0, BK)
        acc_g = tl.zeros((BM, BN), tl.float32)
        acc_u = tl.zeros((BM, BN), tl.float32)
        wb = w13_ptr + ex.to(tl.int64) * (2 * I * D)
        for k0 in range(0, D, BK):
            $gu_loads
            acc_g += tl.dot(x, w1, input_precision=PREC)
            acc_u += tl.dot(x, w3, input_precision=PREC)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(h_ptr + r[:, None] * I + n[None, :], h.to(DT), mask=mr[:, None] & mn[None, :])


@triton.jit
def moe_down(h_ptr, off_ptr, w2_ptr, y_ptr, tile_e_ptr, tile_r_ptr):
    # grid (D blocks, tiles): y = h w2^T for one expert's rows
    ex = tl.load(tile_e_ptr + tl.program_id(1))
    if ex >= 0:
        r = tl.load(tile_r_ptr + tl.program_id(1)) + tl.arange(0, BM)
        mr = r < tl.load(off_ptr + ex + 1)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        mn = n < D
        dk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), tl.float32)
        wb = w2_ptr + ex.to(tl.int64) * (D * I)
        for k0 in range(0, I, BK):
            $down_loads
            acc += tl.dot(h, w, input_precision=PREC)
        tl.store(y_ptr + r[:, None] * D + n[None, :], acc.to(DT), mask=mr[:, None] & mn[None, :])
"""

_UNPERMUTE = """
@triton.jit
def moe_inverse(order_ptr, inv_ptr, M):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < M
    tl.store(inv_ptr + tl.load(order_ptr + p, mask=m, other=0), p.to(tl.int64), mask=m)


@triton.jit
def moe_unpermute(y_ptr, inv_ptr, w_ptr, acc_ptr, out_ptr):
    # grid (tokens, D blocks): out[n] = acc[n] + sum_j w[n, j] y[inv[n * TOPK + j]]
    tok = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = d < D
    a = tl.load(acc_ptr + tok * D + d, mask=md, other=0.0).to(tl.float32)
    for j in tl.static_range(TOPK):
        p = tl.load(inv_ptr + tok * TOPK + j)
        wj = tl.load(w_ptr + tok * TOPK + j).to(tl.float32)
        a += wj * tl.load(y_ptr + p * D + d, mask=md, other=0.0).to(tl.float32)
    tl.store(out_ptr + tok * D + d, a.to(DT), mask=md)
"""



@functools.lru_cache(maxsize=None)
def route_spec(D, E, top_k, n_group, topk_group, renorm, scaling, weights, xdt, wdt, target) -> KernelSpec:
    cfg = config("moe_route", target)
    BE = max(16, next_pow2(E))
    if n_group > 1 and (E % n_group or next_pow2(n_group) != n_group or next_pow2(E // n_group) != E // n_group):
        raise ValueError(f"grouped top-k needs power-of-two groups: {E} experts in {n_group} groups")
    consts = {"D": D, "E": E, "BE": BE, "BN": max(16, cfg["BN"]), "BK": cfg["BK"], "TOPK": top_k,
              "NGP": BE // (E // n_group), "EG": E // n_group, "TOPK_GROUP": topk_group,
              "RENORM": bool(renorm and top_k > 1), "SCALING": float(scaling)}
    top2 = "t1 + tl.max(tl.where(e3 == i1[:, :, None], float('-inf'), g3), 2)" if E // n_group > 1 else "t1"
    groups = _GROUPS.replace("$group_score", top2) if n_group > 1 else "picked = choice"
    src = render("moe_route", _ROUTE, consts, groups=groups,
                 weights_from="choice" if weights == "official" else "scores")
    sig = {"x_ptr": ptr_type(xdt), "w_ptr": ptr_type(wdt), "bias_ptr": "*fp32", "ids_ptr": "*i64",
           "wts_ptr": "*fp32", "N": "i32"}
    return KernelSpec("moe_route", "moe_route", src, sig, cfg["num_warps"], cfg["num_stages"], consts)


def moe_route(x, gate_weight, bias, *, top_k, n_group=1, topk_group=1, renormalize=True, scaling=1.0,
              weights="official"):
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
    spec = route_spec(D, E, top_k, n_group, topk_group, renormalize, float(scaling), weights,
                      ir_dtype(x), ir_dtype(gate_weight), current_target())
    ids = torch.empty(N, top_k, device=x.device, dtype=torch.int64)
    wts = torch.empty(N, top_k, device=x.device, dtype=torch.float32)
    if N:
        launch(spec, (-(-N // spec.config["BN"]),), xf, gate_weight.contiguous(), bias.contiguous(), ids, wts, N)
    return ids.view(*lead, top_k), wts.view(*lead, top_k)


@functools.lru_cache(maxsize=None)
def permute_specs(D, E, top_k, dtype, target):
    cfg = config("moe_permute", target)
    consts = {"D": D, "E": E, "BE": max(16, next_pow2(E)), "TOPK": top_k, "BLOCK": cfg["BLOCK"],
              "BD": min(1024, next_pow2(D))}
    src = render("moe_permute", _PERMUTE, consts)
    sort = KernelSpec("moe_sort", "moe_sort", src, {"ids_ptr": "*i64", "order_ptr": "*i64", "off_ptr": "*i64",
                                                    "M": "i32"}, cfg["num_warps"], 1, consts)
    gather = KernelSpec("moe_gather_rows", "moe_gather_rows", src,
                        {"x_ptr": ptr_type(dtype), "order_ptr": "*i64", "rows_ptr": ptr_type(dtype)}, 4, 1, consts)
    return sort, gather


def moe_permute(x, ids, num_experts):
    """-> rows [M, D] (token copies sorted by expert, stable), offsets [E+1] i64, order [M] i64."""
    if ids.shape[:-1] != x.shape[:-1] or ids.dtype != torch.int64:
        raise ValueError(f"ids {tuple(ids.shape)} {ids.dtype} do not fit x {tuple(x.shape)}")
    D, k = x.shape[-1], ids.shape[-1]
    flat = ids.reshape(-1).contiguous()
    M = flat.numel()
    sort, gather = permute_specs(D, num_experts, k, ir_dtype(x), current_target())
    order = torch.empty(M, device=x.device, dtype=torch.int64)
    offsets = torch.zeros(num_experts + 1, device=x.device, dtype=torch.int64)
    rows = torch.empty(M, D, device=x.device, dtype=x.dtype)
    if M:
        launch(sort, (1,), flat, order, offsets, M)
        launch(gather, (M,), x.reshape(-1, D).contiguous(), order, rows)
    return rows, offsets, order


def _gemm_loads(K: int, N: int, BK: int, BN: int, gate_up: bool) -> str:
    """The K-loop loads of one grouped GEMM; masks only on the dims the tiles do not divide."""
    mk, mn = K % BK != 0, N % BN != 0
    kx = "mr[:, None] & (k0 + dk < KD)[None, :]" if mk else "mr[:, None]"
    kw = " & ".join(filter(None, ["mn[None, :]" if mn else "", "(k0 + dk < KD)[:, None]" if mk else ""]))
    wm = f", mask={kw}, other=0.0" if kw else ""
    a = "x" if gate_up else "h"
    lines = [f"{a} = tl.load({a}_ptr + r[:, None] * KD + k0 + dk[None, :], mask={kx}, other=0.0)"]
    if gate_up:
        lines += [f"w1 = tl.load(wb + n[None, :] * KD + k0 + dk[:, None]{wm})",
                  f"w3 = tl.load(wb + (n[None, :] + I) * KD + k0 + dk[:, None]{wm})"]
    else:
        lines += [f"w = tl.load(wb + n[None, :] * KD + k0 + dk[:, None]{wm})"]
    return "\n".join(lines).replace("KD", str(K))


@functools.lru_cache(maxsize=None)
def gemm_specs(E, I, D, dtype, small, target):
    cfg = config("moe_gemm", target)
    sfx = "_small" if small else ""
    BM, BN, BK = cfg["BM" + sfx], cfg["BN" + sfx], cfg["BK" + sfx]
    consts = {"E": E, "I": I, "D": D, "BE": max(16, next_pow2(E)), "BM": BM, "BN": BN, "BK": BK,
              "TB": 64, "DT": TL_DTYPES[dtype], "PREC": dot_precision(dtype)}
    src = render("grouped_swiglu", _GEMM, consts, gu_loads=_gemm_loads(D, I, BK, BN, True),
                 down_loads=_gemm_loads(I, D, BK, BN, False))
    p = ptr_type(dtype)
    tiles = {"tile_e_ptr": "*i32", "tile_r_ptr": "*i32"}
    mk = lambda name, sig, w, s: KernelSpec(name, name, src, sig, w, s, consts)
    return (mk("moe_tile_map", {"off_ptr": "*i64", **tiles, "max_tiles": "i32"}, 4, 1),
            mk("moe_gate_up", {"x_ptr": p, "off_ptr": "*i64", "w13_ptr": p, "h_ptr": p, **tiles},
               cfg["num_warps"], cfg["num_stages"]),
            mk("moe_down", {"h_ptr": p, "off_ptr": "*i64", "w2_ptr": p, "y_ptr": p, **tiles},
               cfg["num_warps"], cfg["num_stages"]))


def grouped_swiglu(rows, offsets, w13, w2):
    """For the rows of expert e (offsets[e]:offsets[e+1]): w2_e (silu(w1_e x) * w3_e x)."""
    E, I2, D = w13.shape
    I = I2 // 2
    M = rows.shape[0]
    if rows.shape[1] != D or offsets.shape != (E + 1,) or w2.shape != (E, D, I):
        raise ValueError(f"rows {tuple(rows.shape)}, offsets {tuple(offsets.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)} do not fit")
    dt = rows.dtype
    tmap, gate_up, down = gemm_specs(E, I, D, ir_dtype(rows), M <= 256, current_target())
    c = gate_up.config
    max_tiles = -(-M // c["BM"]) + E
    te = torch.empty(max_tiles, device=rows.device, dtype=torch.int32)
    tr = torch.empty(max_tiles, device=rows.device, dtype=torch.int32)
    h = torch.empty(M, I, device=rows.device, dtype=dt)
    y = torch.empty(M, D, device=rows.device, dtype=dt)
    if M:
        off = offsets.to(torch.int64).contiguous()
        launch(tmap, (-(-max_tiles // c["TB"]),), off, te, tr, max_tiles)
        launch(gate_up, (-(-I // c["BN"]), max_tiles), rows.contiguous(), off, w13.to(dt).contiguous(), h, te, tr)
        launch(down, (-(-D // c["BN"]), max_tiles), h, off, w2.to(dt).contiguous(), y, te, tr)
    return y


@functools.lru_cache(maxsize=None)
def unpermute_specs(D, top_k, dtype, wdt, target):
    cfg = config("moe_permute", target)
    consts = {"D": D, "TOPK": top_k, "BLOCK": cfg["BLOCK"], "BD": min(1024, next_pow2(D)), "DT": TL_DTYPES[dtype]}
    src = render("moe_unpermute", _UNPERMUTE, consts)
    p = ptr_type(dtype)
    return (KernelSpec("moe_inverse", "moe_inverse", src, {"order_ptr": "*i64", "inv_ptr": "*i64", "M": "i32"},
                       4, 1, consts),
            KernelSpec("moe_unpermute", "moe_unpermute", src, {"y_ptr": p, "inv_ptr": "*i64", "w_ptr": ptr_type(wdt),
                                                               "acc_ptr": p, "out_ptr": p}, 4, 1, consts))


def moe_unpermute(y, order, weights, acc):
    k, D = weights.shape[-1], acc.shape[-1]
    M = y.shape[0]
    if order.shape != (M,) or weights.shape[:-1] != acc.shape[:-1] or M != weights.numel():
        raise ValueError(f"y {tuple(y.shape)}, order {tuple(order.shape)}, weights {tuple(weights.shape)}, "
                         f"acc {tuple(acc.shape)} do not fit")
    inv_spec, un_spec = unpermute_specs(D, k, ir_dtype(acc), ir_dtype(weights), current_target())
    inv = torch.empty(M, device=y.device, dtype=torch.int64)
    out = torch.empty_like(acc.contiguous())
    N = M // k
    if M:
        launch(inv_spec, (-(-M // inv_spec.config["BLOCK"]),), order.contiguous(), inv, M)
        launch(un_spec, (N, -(-D // un_spec.config["BD"])), y.to(acc.dtype).contiguous(), inv,
               weights.contiguous(), acc.contiguous(), out)
    return out


def op_moe_route(args, attrs):
    return list(moe_route(*args, top_k=attrs["top_k"], n_group=attrs["n_group"], topk_group=attrs["topk_group"],
                          renormalize=attrs["renormalize"], scaling=attrs["scaling"], weights=attrs["weights"]))


def op_moe_permute(args, attrs):
    return list(moe_permute(args[0], args[1], attrs["num_experts"]))


def op_grouped_swiglu(args, attrs):
    return [grouped_swiglu(*args)]


def op_moe_unpermute(args, attrs):
    return [moe_unpermute(*args)]


def specs_for(kind, ins, outs, attrs, target):
    if kind == "moe_route":
        x, w = ins[0], ins[1]
        return [route_spec(x.shape[-1], w.shape[0], attrs["top_k"], attrs["n_group"], attrs["topk_group"],
                           attrs["renormalize"], float(attrs["scaling"]), attrs["weights"], x.dtype, w.dtype, target)]
    if kind == "moe_permute":
        return list(permute_specs(ins[0].shape[-1], attrs["num_experts"], ins[1].shape[-1], ins[0].dtype, target))
    if kind == "grouped_swiglu":
        E, I2, D = ins[2].shape
        return [s for small in (True, False) for s in gemm_specs(E, I2 // 2, D, ins[0].dtype, small, target)]
    w, acc = ins[2], ins[3]
    return list(unpermute_specs(acc.shape[-1], w.shape[-1], acc.dtype, w.dtype, target))
