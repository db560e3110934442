"""MoE kernels: the grouped SwiGLU over packed expert weights (a device-side tile map; gate and
up in one pass with SiLU*up in the epilogue; then the down projection), and the entry points of
the four MoE ops; the router lives in `moe_route`, the permutation and its inverse in
`moe_permute`."""
from __future__ import annotations

import functools
import re

import torch

from . import moe_permute, moe_route
from .codegen import dot_precision, TL_DTYPES, KernelSpec, launch, next_pow2, render, use_descriptor_scratch
from .elementwise import ir_dtype, ptr_type
from .targets import TARGETS, config, current_target

_TILE_MAP = """
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
"""


def _tile_map(count: bool) -> str:
    """_TILE_MAP, storing also the number of valid tiles to count_ptr with `count` (persistent kernels)."""
    if not count:
        return _TILE_MAP
    return _TILE_MAP.replace("max_tiles):", "max_tiles, count_ptr):").rstrip() + \
        "\n    if tl.program_id(0) == 0:\n        tl.store(count_ptr, tl.sum(nt, 0))\n"

# One grouped GEMM: $descriptors once, then per (row tile t, N block nb) its $setup and $tiles
# (the rows, K loop and epilogue at a BMT-row tile: BM rows, or a smaller tile of row_tiles when
# the expert has no more left; rows a tile computes past its expert are wasted work). Grid (N
# blocks, tiles), neighbouring programs sharing the row tile and the expert (L2 reuse); or
# persistent: `persistent` programs an SM take work items t * NBLK + nb in turn, the next item's
# loads issued during this one's epilogue (flattened loops)
_GEMM = """
@triton.jit
def $entry($args):
    dk = tl.arange(0, BK)
    $descriptors
    $work
"""
_WORK_GRID = """
t = tl.program_id(1)
nb = tl.program_id(0)
ex = tl.load(tile_e_ptr + t)
if ex >= 0:
    $item
"""
_WORK_PERSISTENT = """
for item in tl.range(tl.program_id(0), tl.load(count_ptr) * NBLK, tl.num_programs(0), flatten=True$ws):
    t = item // NBLK
    nb = item % NBLK
    ex = tl.load(tile_e_ptr + t)
    $item
"""
_ITEM = """
r0 = tl.load(tile_r_ptr + t)
end = tl.load(off_ptr + ex + 1)
n = nb * BN + tl.arange(0, BN)
mn = n < NO
$setup
$tiles
"""

# gate_up: h = silu(x w1^T) * (x w3^T) for one expert's rows. Sorted row r reads x row `src`:
# r itself (x already permuted), or token order[r] // TOPK (gathered by index)
_GATE_UP_TILE = """
r = r0 + tl.arange(0, BMT)
mr = r < end
$src_rows
acc_g = tl.zeros((BMT, BN), tl.float32)
acc_u = tl.zeros((BMT, BN), tl.float32)
for k0 in $k_range:
    $loads
    acc_g = tl.dot(x, w1, acc_g, input_precision=PREC)
    acc_u = tl.dot(x, w3, acc_u, input_precision=PREC)
h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
tl.store(h_ptr + r[:, None] * I + n[None, :], h.to(DT), mask=mr[:, None] & mn[None, :])
"""

# down: y = h w2^T for one expert's rows, stored at row `dst`: r (sorted), or order[r] =
# n * TOPK + j (the token's own slot j: un-permuted in the epilogue)
_DOWN_TILE = """
r = r0 + tl.arange(0, BMT)
mr = r < end
acc = tl.zeros((BMT, BN), tl.float32)
for k0 in $k_range:
    $loads
    acc = tl.dot(h, w, acc, input_precision=PREC)
$dst_rows
tl.store(y_ptr + dst[:, None] * D + n[None, :], acc.to(DT), mask=mr[:, None] & mn[None, :])
"""


def _tile_loads(gate_up: bool, K: int, N: int, BK: int, BN: int, tma: bool) -> str:
    """The K-loop loads of one grouped GEMM tile. Weights through a tensor descriptor (`tma`:
    rows past N read the next matrix, K past the end reads zeros; either only reaches outputs
    the store masks), else by pointer with masks only on the dims the tiles do not divide; the
    down GEMM's sorted h rows through a descriptor too (rows past the expert: masked outputs)."""
    mk, mn = K % BK != 0, N % BN != 0
    kx = "mr[:, None] & (k0 + dk < KD)[None, :]" if mk else "mr[:, None]"
    if gate_up:
        lines = [f"x = tl.load(x_ptr + src[:, None] * KD + k0 + dk[None, :], mask={kx}, other=0.0)"]
    elif tma:
        lines = ["h = hdBMT.load([r0, k0])"]
    else:
        lines = [f"h = tl.load(h_ptr + r[:, None] * KD + k0 + dk[None, :], mask={kx}, other=0.0)"]
    if tma:
        ws = [("w1", "wn"), ("w3", "wn + I")] if gate_up else [("w", "wn")]
        lines += [f"{a} = wd.load([{row}, k0]).T" for a, row in ws]
    else:
        kw = " & ".join(filter(None, ["mn[None, :]" if mn else "", "(k0 + dk < KD)[:, None]" if mk else ""]))
        wm = f", mask={kw}, other=0.0" if kw else ""
        ws = [("w1", "n[None, :]"), ("w3", "(n[None, :] + I)")] if gate_up else [("w", "n[None, :]")]
        lines += [f"{a} = tl.load(wb + {row} * KD + k0 + dk[:, None]{wm})" for a, row in ws]
    return "\n".join(lines).replace("KD", str(K))


def row_tiles(BM: int, half: int) -> list[int]:
    """The row tiles of a kernel, largest first: BM, then `half` halvings of it (16 rows at least)."""
    return [BM >> i for i in range(half + 1) if BM >> i >= 16]


def _kernel_source(gate_up: bool, K: int, N: int, BM: int, BK: int, BN: int, tma: str, half: int,
                   ws: bool, gather: bool, persistent: int, count: bool) -> str:
    """One grouped GEMM kernel's source (tile map included): its setup, and its tile at each of
    row_tiles(BM, half), a program taking the least that holds the rows its expert has left.
    `tma`: "" (pointers), "device" (descriptors built by each program) or "host" (descriptor
    arguments: wd, and down's h rows hd<rows> per row tile). `persistent`: the work loop of
    _WORK_PERSISTENT (one row tile: no branches inside it), warp-specialized with `ws`; `count`:
    the tile map also stores the number of valid tiles (for a persistent kernel)."""
    if gate_up:
        w, shape = "w13_ptr", "[E * 2 * I, D], strides=[D, 1]"
        wn, wb = "ex * (2 * I) + nb * BN", "w13_ptr + ex.to(tl.int64) * (2 * I * D)"
        idx = {"src_rows": "src = tl.load(order_ptr + r, mask=mr, other=0) // TOPK" if gather else "src = r"}
        args = "x_ptr, off_ptr, w13_ptr, h_ptr, tile_e_ptr, tile_r_ptr"
    else:
        w, shape = "w2_ptr", "[E * D, I], strides=[I, 1]"
        wn, wb = "ex * D + nb * BN", "w2_ptr + ex.to(tl.int64) * (D * I)"
        idx = {"dst_rows": "dst = tl.load(order_ptr + r, mask=mr, other=0)" if gather else "dst = r"}
        args = "h_ptr, off_ptr, w2_ptr, y_ptr, tile_e_ptr, tile_r_ptr, M"
    args += (", order_ptr" if gather else "") + (", count_ptr" if persistent else "")
    rows = row_tiles(BM, 0 if persistent else half)
    descs = {"wd": (w, shape, "BN, BK")}
    if not gate_up:
        descs.update({f"hd{bmt}": ("h_ptr", "[M, I], strides=[I, 1]", f"{bmt}, BK") for bmt in rows})
    if tma == "host":           # built on the host, passed as arguments
        args += "".join(f", {d}" for d in descs)
    descriptors = [f"{d} = tl.make_tensor_descriptor({ptr}, shape={sh}, block_shape=[{b}])"
                   for d, (ptr, sh, b) in descs.items()] if tma == "device" else []
    setup = f"wn = {wn}" if tma else f"wb = {wb}"
    k_range = f"tl.range(0, {K}, BK, warp_specialize=True)" if ws and not persistent else f"range(0, {K}, BK)"
    tmpl = _GATE_UP_TILE if gate_up else _DOWN_TILE

    def tile(bmt: int) -> list[str]:
        text = _body(tmpl, loads=_tile_loads(gate_up, K, N, BK, BN, tma), k_range=k_range, **idx)
        return text.replace("BMT", str(bmt)).splitlines()

    # smallest first; a smaller tile's names suffixed (Triton keeps a name's type across branches)
    own = re.compile(r"\b(r|mr|src|dst|acc|acc_g|acc_u|x|h|w|w1|w3|k0)\b")
    tiles, ind = [], lambda ls: ["    " + s if s else s for s in ls]
    for i, bmt in enumerate(reversed(rows[1:])):
        tiles += [f"{'el' if i else ''}if end - r0 <= {bmt}:", *ind(own.sub(rf"\1_{bmt}", "\n".join(tile(bmt))).splitlines())]
    tiles = tiles + ["else:", *ind(tile(BM))] if tiles else tile(BM)
    item = _body(_ITEM, setup=setup, tiles="\n".join(tiles))
    work = _body(_WORK_PERSISTENT, item=item, ws=", warp_specialize=True" if ws else "").replace(
        "NBLK", str(-(-N // BN))) if persistent else _body(_WORK_GRID, item=item)    # a literal: the interpreter's ints
    tile_map = _body(_tile_map(count))
    return tile_map + "\n\n\n" + _body(_GEMM, entry="moe_gate_up" if gate_up else "moe_down", args=args,
                                         descriptors="\n".join(descriptors), work=work) + "\n"


def _body(template: str, **blocks: str) -> str:
    """A template's text with its blocks in place (no header: pieces of one kernel source)."""
    return render("", template, {}, **blocks).split("\n\n\n", 1)[1].strip("\n")


SIZES = ("small", "mid", "large")


def gemm_size(M: int, E: int, target: str) -> str:
    """The tile class for M sorted rows over E experts: "small" (decode, M <= 256), "mid" (fewer
    than mid_rows rows per expert on average: a shorter row tile wastes less of each expert's
    last tile), "large". A class's tiles are the config's keys with its suffix (BM_mid, ...),
    else the large ones."""
    if M <= 256:
        return "small"
    return "mid" if M < config("moe_gemm", target)["mid_rows"] * E else "large"


def gemm_tiles(size: str, target: str) -> dict:
    """The "moe_gemm" keys of one tile class: each key's value with the class's suffix, else the
    large one; the down GEMM's BN / BK / warps / stages from its *_down keys (per class), else the
    gate_up's. tma (false, true = "device", "host"; -> "", "device", "host"), half, ws and
    persistent (programs an SM; 0: a grid of all tiles; persistent_down: the down GEMM's, else
    the same) fall back to the large ones for "mid" only ("small" takes its own or none); a
    persistent kernel has one row tile (its half 0)."""
    cfg = config("moe_gemm", target)
    sfx = {"small": "_small", "mid": "_mid", "large": ""}[size]
    get = lambda key, default=None: cfg.get(key + sfx, cfg.get(key, default))
    out = {k: get(k) for k in ("BM", "BN", "BK", "num_warps", "num_stages")}
    out.update({f"{k}_down": cfg.get(f"{k}_down{sfx}", out[k]) for k in ("BN", "BK", "num_warps", "num_stages")})
    flag = (lambda k: cfg.get(k + sfx, False)) if size == "small" else (lambda k: get(k, False))
    out.update(half=int(flag("half")), ws=bool(flag("ws")), persistent=int(flag("persistent")))
    pd = flag("persistent_down")
    out["persistent_down"] = out["persistent"] if pd is False else int(pd)
    tma = cfg.get("tma" + sfx, False) if size == "small" else get("tma", False)
    if tma not in (False, True, "", "device", "host"):
        raise ValueError(f"moe_gemm tma {tma!r}: false / '', true / 'device', or 'host'")
    out["tma"] = {False: "", True: "device"}.get(tma, tma)
    half = len(row_tiles(out["BM"], out["half"])) - 1                 # tl.dot takes 16 rows at least
    out.update(half=0 if out["persistent"] else half, half_down=0 if out["persistent_down"] else half)
    out["ws"] = out["ws"] and bool(out["tma"])             # warp specialization wants descriptor loads
    return out


@functools.lru_cache(maxsize=None)
def gemm_specs(E, I, D, dtype, size, target, gather=False, top_k=1, aligned=False):
    """(tile map, gate_up, down) at the tiles of class `size`. With `gather`, gate_up reads x
    rows by index (order[r] // top_k) and down stores each row at its copy's own slot order[r]:
    no permuted copies. Tensor descriptors (config tma) only when `aligned` (tma_aligned)."""
    t = gemm_tiles(size, target)
    tma = t["tma"] if aligned and (TARGETS[target]["arch"] or 90) >= 90 else ""      # sm_90+, interpreter
    BM = t["BM"]
    base = {"E": E, "I": I, "D": D, "BE": max(16, next_pow2(E)), "BM": BM, "TB": 64, "DT": TL_DTYPES[dtype],
            "PREC": dot_precision(dtype), "TOPK": top_k}
    gu = dict(base, NO=I, BN=t["BN"], BK=t["BK"], NBLK=-(-I // t["BN"]))
    dn = dict(base, NO=D, BN=t["BN_down"], BK=t["BK_down"], NBLK=-(-D // t["BN_down"]))
    ws, counted = t["ws"] and bool(tma), bool(t["persistent"] or t["persistent_down"])
    gu.update(tma=tma, half=t["half"], ws=ws, persistent=t["persistent"])
    dn.update(tma=tma, half=t["half_down"], ws=ws, persistent=t["persistent_down"])
    src = lambda c, gate_up, K, N: (render("grouped_swiglu", "", {k: v for k, v in c.items() if k.isupper()}).rstrip("\n")
                                    + "\n\n" + _kernel_source(gate_up, K, N, BM, c["BK"], c["BN"], tma, c["half"], ws,
                                                              gather, c["persistent"], counted))
    src_gu, src_dn = src(gu, True, D, I), src(dn, False, I, D)
    p = ptr_type(dtype)
    tiles = {"tile_e_ptr": "*i32", "tile_r_ptr": "*i32"}
    order = {"order_ptr": "*i64"} if gather else {}
    count = lambda c: {"count_ptr": "*i32"} if c else {}
    desc = lambda rows, cols: f"tensordesc<{p[1:]}[{rows}, {cols}]>"          # AOT's name of the argument type
    desc_gu, desc_dn = ({"wd": desc(gu["BN"], gu["BK"])},
                        {"wd": desc(dn["BN"], dn["BK"]), **{f"hd{r}": desc(r, dn["BK"]) for r in row_tiles(BM, dn["half"])}}) \
        if tma == "host" else ({}, {})
    return (KernelSpec("moe_tile_map", "moe_tile_map", src_gu,
                       {"off_ptr": "*i64", **tiles, "max_tiles": "i32", **count(counted)}, 4, 1, gu),
            KernelSpec("moe_gate_up", "moe_gate_up", src_gu,
                       {"x_ptr": p, "off_ptr": "*i64", "w13_ptr": p, "h_ptr": p, **tiles, **order,
                        **count(gu["persistent"]), **desc_gu}, t["num_warps"], t["num_stages"], gu),
            KernelSpec("moe_down", "moe_down", src_dn,
                       {"h_ptr": p, "off_ptr": "*i64", "w2_ptr": p, "y_ptr": p, **tiles, "M": "i32", **order,
                        **count(dn["persistent"]), **desc_dn}, t["num_warps_down"], t["num_stages_down"], dn))


def _swiglu_launch(x, offsets, w13, w2, out_rows, order=None, top_k=1, y=None, h=None, size_rows=None):
    """Tile map, gate_up, down over the rows that `offsets` lays out by expert: y [out_rows, D]
    (given: only those rows written; h [out_rows, I] scratch); the tiles' class from
    `size_rows` rows (default out_rows)."""
    E, I2, D = w13.shape
    I, M, dt = I2 // 2, out_rows, x.dtype
    target = current_target()
    x, w13, w2 = x.contiguous(), w13.to(dt).contiguous(), w2.to(dt).contiguous()
    size = gemm_size(M if size_rows is None else size_rows, E, target)
    aligned = bool(gemm_tiles(size, target)["tma"]) and _rows_aligned(w13, w2)      # h: fresh, aligned
    tmap, gate_up, down = gemm_specs(E, I, D, ir_dtype(x), size, target, order is not None, top_k, aligned)
    c = gate_up.config
    max_tiles = -(-M // c["BM"]) + E
    te = torch.empty(max_tiles, device=x.device, dtype=torch.int32)
    tr = torch.empty(max_tiles, device=x.device, dtype=torch.int32)
    h = torch.empty(M, I, device=x.device, dtype=dt) if h is None else h
    y = torch.empty(M, D, device=x.device, dtype=dt) if y is None else y
    if M:
        if c["tma"] == "device":
            use_descriptor_scratch()
        off = offsets.to(torch.int64).contiguous()
        extra = () if order is None else (order,)
        d_gu, d_dn = _host_descriptors(c, down.config, w13, w2, h) if c["tma"] == "host" else ((), ())
        count = torch.empty(1, device=x.device, dtype=torch.int32)      # valid tiles, for persistent kernels
        # a persistent kernel: `persistent` programs an SM over the valid tiles, else one per tile
        grid = lambda k: (min(k["persistent"] * _multiprocessors(x.device), max_tiles * k["NBLK"]),) \
            if k["persistent"] else (k["NBLK"], max_tiles)
        counted = lambda spec: (count,) if "count_ptr" in spec.signature else ()
        launch(tmap, (-(-max_tiles // c["TB"]),), off, te, tr, max_tiles, *counted(tmap))
        launch(gate_up, grid(c), x, off, w13, h, te, tr, *extra, *counted(gate_up), *d_gu)
        launch(down, grid(down.config), h, off, w2, y, te, tr, M, *extra, *counted(down), *d_dn)
    return y


_SWIGLU_ROWS = """
@triton.jit
def swiglu_rows(gu_ptr, h_ptr, M):
    # grid (row blocks, column blocks): h[r, i] = silu(gu[r, i]) * gu[r, I + i] in fp32, rounded once
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    i = tl.program_id(1) * BI + tl.arange(0, BI)
    m = (r < M)[:, None] & (i < I)[None, :]
    src = r.to(tl.int64)[:, None] * (2 * I) + i[None, :]
    g = tl.load(gu_ptr + src, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + src + I, mask=m, other=0.0).to(tl.float32)
    tl.store(h_ptr + r.to(tl.int64)[:, None] * I + i[None, :], (g / (1.0 + tl.exp(-g)) * u).to(DT), mask=m)
"""


@functools.lru_cache(maxsize=None)
def swiglu_rows_spec(I: int, dtype: str) -> KernelSpec:
    """silu(gate) * up over rows [gate | up] of 2I in one pass (the shared expert's, after its fused
    gate/up GEMM)."""
    consts = {"I": I, "BR": 16, "BI": min(256, next_pow2(I)), "DT": TL_DTYPES[dtype]}
    p = ptr_type(dtype)
    return KernelSpec("swiglu_rows", "swiglu_rows", render("swiglu_rows", _SWIGLU_ROWS, consts),
                      {"gu_ptr": p, "h_ptr": p, "M": "i32"}, 4, 1, consts)


def _multiprocessors(device) -> int:
    """SMs of a CUDA device; 4 programs' worth in the interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _host_descriptors(gu: dict, dn: dict, w13, w2, h):
    """Tensor descriptor arguments: gate_up's weights; down's weights and h rows (each row tile)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    desc = lambda t, rows, cols: TensorDescriptor.from_tensor(t.reshape(-1, t.shape[-1]), [rows, cols])
    return ((desc(w13, gu["BN"], gu["BK"]),),
            (desc(w2, dn["BN"], dn["BK"]), *(desc(h, r, dn["BK"]) for r in row_tiles(dn["BM"], dn["half"]))))


def _rows_aligned(*ts) -> bool:
    """Whether tensor descriptors can read these contiguous tensors: 16-byte aligned bases and rows."""
    return all(t.data_ptr() % 16 == 0 and t.shape[-1] * t.element_size() % 16 == 0 for t in ts)


def grouped_swiglu(rows, offsets, w13, w2):
    """For the rows of expert e (offsets[e]:offsets[e+1]): w2_e (silu(w1_e x) * w3_e x)."""
    E, I2, D = w13.shape
    if rows.shape[1] != D or offsets.shape != (E + 1,) or w2.shape != (E, D, I2 // 2):
        raise ValueError(f"rows {tuple(rows.shape)}, offsets {tuple(offsets.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)} do not fit")
    return _swiglu_launch(rows, offsets, w13, w2, rows.shape[0])


def swiglu_into(rows, offsets, w13, w2, y, h, size_rows):
    """grouped_swiglu over the rows of the experts `offsets` covers (row indices into `rows`:
    offsets[0] need not be 0), written into those rows of y [M, D], with h [M, I] as scratch;
    tiles sized for `size_rows` rows."""
    E, I2, D = w13.shape
    M = rows.shape[0]
    if offsets.shape != (E + 1,) or w2.shape != (E, D, I2 // 2) or y.shape != rows.shape or h.shape != (M, I2 // 2):
        raise ValueError(f"rows {tuple(rows.shape)}, offsets {tuple(offsets.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, y {tuple(y.shape)}, h {tuple(h.shape)} do not fit")
    return _swiglu_launch(rows, offsets, w13, w2, M, y=y, h=h, size_rows=max(1, size_rows))


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
    fused.append(swiglu_rows_spec(I2 // 2, x.dtype))     # shared_swiglu's, at the experts' width (the published one)
    return chain + fused + moe_permute.sort_specs(E, ids.shape[-1], target) \
        + list(moe_permute.combine_specs(D, ids.shape[-1], x.dtype, w.dtype, target))
