"""MoE kernels: the grouped SwiGLU over packed expert weights (a device-side tile map; gate and
up in one pass with SiLU*up in the epilogue; then the down projection), and the entry points of
the four MoE ops; the router lives in `moe_route`, the permutation and its inverse in
`moe_permute`."""
from __future__ import annotations

import functools

import torch

from . import moe_permute, moe_route
from .codegen import dot_precision, TL_DTYPES, KernelSpec, launch, next_pow2, render
from .elementwise import ir_dtype, ptr_type
from .targets import config, current_target

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
def moe_gate_up(x_ptr, off_ptr, w13_ptr, h_ptr, tile_e_ptr, tile_r_ptr$gather_arg):
    # grid (I blocks, tiles): h = silu(x w1^T) * (x w3^T) for one expert's rows; neighbouring
    # programs share the row tile and the expert (L2 reuse). Sorted row r reads x row `src`:
    # r itself (x already permuted), or token order[r] // TOPK (gathered by index)
    ex = tl.load(tile_e_ptr + tl.program_id(1))
    if ex >= 0:
        r = tl.load(tile_r_ptr + tl.program_id(1)) + tl.arange(0, BM)
        mr = r < tl.load(off_ptr + ex + 1)
        $src_rows
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
def moe_down(h_ptr, off_ptr, w2_ptr, y_ptr, tile_e_ptr, tile_r_ptr$gather_arg):
    # grid (D blocks, tiles): y = h w2^T for one expert's rows, stored at row `dst`: r (sorted),
    # or order[r] = n * TOPK + j (the token's own slot j: un-permuted in the epilogue)
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
        $dst_rows
        tl.store(y_ptr + dst[:, None] * D + n[None, :], acc.to(DT), mask=mr[:, None] & mn[None, :])
"""

def _gemm_loads(K: int, N: int, BK: int, BN: int, gate_up: bool) -> str:
    """The K-loop loads of one grouped GEMM; masks only on the dims the tiles do not divide."""
    mk, mn = K % BK != 0, N % BN != 0
    kx = "mr[:, None] & (k0 + dk < KD)[None, :]" if mk else "mr[:, None]"
    kw = " & ".join(filter(None, ["mn[None, :]" if mn else "", "(k0 + dk < KD)[:, None]" if mk else ""]))
    wm = f", mask={kw}, other=0.0" if kw else ""
    a = "x" if gate_up else "h"
    lines = [f"{a} = tl.load({a}_ptr + {'src' if gate_up else 'r'}[:, None] * KD + k0 + dk[None, :], mask={kx}, "
             "other=0.0)"]
    if gate_up:
        lines += [f"w1 = tl.load(wb + n[None, :] * KD + k0 + dk[:, None]{wm})",
                  f"w3 = tl.load(wb + (n[None, :] + I) * KD + k0 + dk[:, None]{wm})"]
    else:
        lines += [f"w = tl.load(wb + n[None, :] * KD + k0 + dk[:, None]{wm})"]
    return "\n".join(lines).replace("KD", str(K))


SIZES = ("small", "mid", "large")


def gemm_size(M: int, E: int, target: str) -> str:
    """The tile class for M sorted rows over E experts: "small" (decode, M <= 256), "mid" (fewer
    than mid_rows rows per expert on average: a shorter row tile wastes less of each expert's
    last tile), "large". A class's tiles are the config's keys with its suffix (BM_mid, ...),
    else the large ones."""
    if M <= 256:
        return "small"
    return "mid" if M < config("moe_gemm", target)["mid_rows"] * E else "large"


@functools.lru_cache(maxsize=None)
def gemm_specs(E, I, D, dtype, size, target, gather=False, top_k=1):
    """(tile map, gate_up, down). With `gather`, gate_up reads x rows by index (order[r] //
    top_k) and down stores each row at its copy's own slot order[r]: no permuted copies."""
    cfg = config("moe_gemm", target)
    sfx = {"small": "_small", "mid": "_mid", "large": ""}[size]
    get = lambda key: cfg.get(key + sfx, cfg[key])       # a class's own value, else the large one
    BM, BN, BK, w, st = (get(k) for k in ("BM", "BN", "BK", "num_warps", "num_stages"))
    BN_down = cfg.get("BN_down" + sfx, BN)
    consts = {"E": E, "I": I, "D": D, "BE": max(16, next_pow2(E)), "BM": BM, "BN": BN, "BK": BK,
              "TB": 64, "DT": TL_DTYPES[dtype], "PREC": dot_precision(dtype), "TOPK": top_k}
    gu, dn = dict(consts), dict(consts, BN=BN_down)
    idx = {"gather_arg": ", order_ptr" if gather else "",
           "src_rows": "src = tl.load(order_ptr + r, mask=mr, other=0) // TOPK" if gather else "src = r",
           "dst_rows": "dst = tl.load(order_ptr + r, mask=mr, other=0)" if gather else "dst = r"}
    src_gu = render("grouped_swiglu", _GEMM, gu, gu_loads=_gemm_loads(D, I, BK, BN, True),
                    down_loads=_gemm_loads(I, D, BK, BN, False), **idx)
    src_dn = render("grouped_swiglu", _GEMM, dn, gu_loads=_gemm_loads(D, I, BK, BN_down, True),
                    down_loads=_gemm_loads(I, D, BK, BN_down, False), **idx)
    p = ptr_type(dtype)
    tiles = {"tile_e_ptr": "*i32", "tile_r_ptr": "*i32"}
    order = {"order_ptr": "*i64"} if gather else {}
    return (KernelSpec("moe_tile_map", "moe_tile_map", src_gu, {"off_ptr": "*i64", **tiles, "max_tiles": "i32"},
                       4, 1, gu),
            KernelSpec("moe_gate_up", "moe_gate_up", src_gu,
                       {"x_ptr": p, "off_ptr": "*i64", "w13_ptr": p, "h_ptr": p, **tiles, **order}, w, st, gu),
            KernelSpec("moe_down", "moe_down", src_dn,
                       {"h_ptr": p, "off_ptr": "*i64", "w2_ptr": p, "y_ptr": p, **tiles, **order}, w, st, dn))


def _swiglu_launch(x, offsets, w13, w2, out_rows, order=None, top_k=1):
    """Tile map, gate_up, down over the rows that `offsets` lays out by expert: y [out_rows, D]."""
    E, I2, D = w13.shape
    I, M, dt = I2 // 2, out_rows, x.dtype
    target = current_target()
    tmap, gate_up, down = gemm_specs(E, I, D, ir_dtype(x), gemm_size(M, E, target), target,
                                     order is not None, top_k)
    c = gate_up.config
    max_tiles = -(-M // c["BM"]) + E
    te = torch.empty(max_tiles, device=x.device, dtype=torch.int32)
    tr = torch.empty(max_tiles, device=x.device, dtype=torch.int32)
    h = torch.empty(M, I, device=x.device, dtype=dt)
    y = torch.empty(M, D, device=x.device, dtype=dt)
    if M:
        off = offsets.to(torch.int64).contiguous()
        extra = () if order is None else (order,)
        launch(tmap, (-(-max_tiles // c["TB"]),), off, te, tr, max_tiles)
        launch(gate_up, (-(-I // c["BN"]), max_tiles), x.contiguous(), off, w13.to(dt).contiguous(), h, te, tr,
               *extra)
        launch(down, (-(-D // down.config["BN"]), max_tiles), h, off, w2.to(dt).contiguous(), y, te, tr, *extra)
    return y


def grouped_swiglu(rows, offsets, w13, w2):
    """For the rows of expert e (offsets[e]:offsets[e+1]): w2_e (silu(w1_e x) * w3_e x)."""
    E, I2, D = w13.shape
    if rows.shape[1] != D or offsets.shape != (E + 1,) or w2.shape != (E, D, I2 // 2):
        raise ValueError(f"rows {tuple(rows.shape)}, offsets {tuple(offsets.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)} do not fit")
    return _swiglu_launch(rows, offsets, w13, w2, rows.shape[0])


def moe_experts(x, ids, weights, w13, w2, acc):
    """acc + sum_j weights[..., j] SwiGLU_{ids[..., j]}(x), the routed experts in one op. Below
    `fused_min_rows` token copies (decode) it runs permute -> grouped SwiGLU -> un-permute; above,
    the fused form: a sort without row copies, gate_up reading x rows by index, down writing each
    copy's result to its own slot (token n's copies at n*k .. n*k+k-1), and a combine that sums a
    token's k slots in order (deterministic: a row's result never depends on its batch)."""
    E, I2, D = w13.shape
    k = ids.shape[-1]
    if (ids.shape[:-1] != x.shape[:-1] or weights.shape != ids.shape or acc.shape != x.shape
            or x.shape[-1] != D or w2.shape != (E, D, I2 // 2) or ids.dtype != torch.int64):
        raise ValueError(f"x {tuple(x.shape)}, ids {tuple(ids.shape)} {ids.dtype}, weights {tuple(weights.shape)}, "
                         f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, acc {tuple(acc.shape)} do not fit")
    M = ids.numel()
    if M < config("moe_gemm")["fused_min_rows"]:
        rows, offsets, order = moe_permute.moe_permute(x, ids, E)
        return moe_permute.moe_unpermute(grouped_swiglu(rows, offsets, w13, w2), order, weights, acc)
    offsets, order = moe_permute.moe_sort(ids, E)
    slots = _swiglu_launch(x.reshape(-1, D), offsets, w13, w2, M, order, k)
    return moe_permute.moe_combine(slots, weights, acc)


def op_moe_route(args, attrs):
    return list(moe_route.moe_route(*args, top_k=attrs["top_k"], n_group=attrs["n_group"], topk_group=attrs["topk_group"],
                          renormalize=attrs["renormalize"], scaling=attrs["scaling"], weights=attrs["weights"]))


def op_moe_permute(args, attrs):
    return list(moe_permute.moe_permute(args[0], args[1], attrs["num_experts"]))


def op_grouped_swiglu(args, attrs):
    return [grouped_swiglu(*args)]


def op_moe_unpermute(args, attrs):
    return [moe_permute.moe_unpermute(*args)]


def op_moe_experts(args, attrs):
    return [moe_experts(*args)]


def specs_for(kind, ins, outs, attrs, target):
    if kind == "moe_route":
        return moe_route.specs(ins[0], ins[1], attrs, target)
    if kind == "moe_permute":
        return moe_permute.specs(ins[0], ins[1], attrs, target)
    if kind == "grouped_swiglu":
        E, I2, D = ins[2].shape
        return [s for size in SIZES for s in gemm_specs(E, I2 // 2, D, ins[0].dtype, size, target)]
    if kind == "moe_unpermute":
        w, acc = ins[2], ins[3]
        return list(moe_permute.unpermute_specs(acc.shape[-1], w.shape[-1], acc.dtype, w.dtype, target))
    x, ids, w, w13 = ins[:4]                  # moe_experts: the chain (decode) and the fused form
    E, I2, D = w13.shape
    chain = (specs_for("moe_permute", [x, ids], [], {"num_experts": E}, target)
             + specs_for("grouped_swiglu", [x, None, w13], [], {}, target)
             + specs_for("moe_unpermute", [None, None, w, x], [], {}, target))
    fused = [s for size in ("mid", "large") for s in gemm_specs(E, I2 // 2, D, x.dtype, size, target, True, ids.shape[-1])]
    return chain + fused + moe_permute.sort_specs(E, ids.shape[-1], target) \
        + list(moe_permute.combine_specs(D, ids.shape[-1], x.dtype, w.dtype, target))
