"""The routed experts of a decode-sized batch, read by their top-k ids (no permutation).

For up to `max_pairs` token copies (N tokens x top_k) the expert rows are read directly, one
(token, expert) pair per program column: no sort, no tile map, no un-permute; two kernels:
    moe_decode_gate_up   h[p] = silu(x[p // K] w1_e^T) * (x[p // K] w3_e^T), e = ids[p]
    moe_decode_down      y[p] = h[p] w2_e^T, then out[n] = acc[n] + sum_j weights[n, j] y[n K + j]
The combine (moe_permute's weighted sum) runs in the down kernel: each program takes a ticket of
its (token, D block) once its rows are stored, and the last of the token's programs there sums
them and resets the ticket (codegen.tickets; a CUDA graph replays it as captured).
The rounding is the permuted path's: h and each expert's output y are rounded to the data
dtype, the weighted sum runs in fp32 in the order j = 0..K-1 onto acc. A shared expert of the
layer can take acc's place: its gate/up rows and its down rows are one more program column per
token in each kernel (its output, rounded, is the combine's acc). Both projections run one
program per (BN or BND output rows, pair): at B=1, top-8 plus the shared expert and D = 2304,
BND = 16 gives 144 x 9 programs, so a single token's ~42 MB of down weights is read by the
whole GPU rather than by one program per D block looping over the experts.
Tiles may depend on the token count (`token_tiles` of the moe_decode config: one token reads 9
experts' rows, eight tokens ~65, and the best tile differs): a CUDA graph captures one batch size,
so the choice costs nothing at replay. A token's result is bitwise the same in any batch of its
bucket; across buckets the K tiles (so the fp32 summation order) may differ: bf16 rounding apart.
Low-bit experts (int4 / int8 / fp8, `Quant`) take the same kernels with their weight loads
dequantizing the codes (dequant.py: int4 / int8 from 32-bit words without conversion
instructions, the group scale on each word's partial sum; `dequant` = "elements": each weight
rounded as kimi_graph/ops/quant.dequantize does), in the tiles of `quant_tiles` (a low-bit row is
a quarter or half the bytes: wider K tiles keep as many bytes in flight).
Larger batches take moe.moe_experts (low-bit: moe_quant.quantized_moe_experts); `moe_experts`
chooses.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kimi_graph.ops.quant import BITS, code_shape, group_of, scale_shape, weight_shape

from . import dequant, moe, moe_permute, moe_quant, moe_w4a8
from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render, tickets
from .elementwise import ir_dtype, ptr_type
from .targets import config, current_target

# the K loops over float weights ("f"; low-bit codes: "q", dequant.helpers). FTILE: the products
# summed into [rows, K tile] accumulators, each row summed once at the end (else a row sum per K
# step); $krange: "range" or "tl.static_range" (the loop unrolled: a program's loads all issued
# before its first sum)
_HELPERS = """
@triton.jit
def _swiglu_rows_f(x_ptr, wg_ptr, wu_ptr, s_ptr, z_ptr, rg, ru, mn, ROUND: tl.constexpr):
    # silu(x wg[rg]^T) * (x wu[ru]^T) for BN rows of one expert (D columns); ROUND: gate and up
    # rounded to the data dtype first (as separate linears give them)
    if FTILE:
        tile_g = tl.zeros((BN, BK), tl.float32)
        tile_u = tl.zeros((BN, BK), tl.float32)
        for k0 in $krange(0, D, BK):
            tile_g += _wmul_f(wg_ptr, rg, mn, x_ptr, k0, D, BK, XTILE)
            tile_u += _wmul_f(wu_ptr, ru, mn, x_ptr, k0, D, BK, XTILE)
        acc_g = tl.sum(tile_g, 1)
        acc_u = tl.sum(tile_u, 1)
    else:
        acc_g = tl.zeros_like(rg).to(tl.float32)       # (rg's rows: BN, or BNS of a shared split)
        acc_u = tl.zeros_like(rg).to(tl.float32)
        for k0 in $krange(0, D, BK):
            acc_g += _wdot_f(wg_ptr, s_ptr, z_ptr, rg, mn, x_ptr, k0, D, G1, BK, XTILE)
            acc_u += _wdot_f(wu_ptr, s_ptr, z_ptr, ru, mn, x_ptr, k0, D, G1, BK, XTILE)
    if ROUND:
        acc_g = acc_g.to(DT).to(tl.float32)
        acc_u = acc_u.to(DT).to(tl.float32)
    return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u


@triton.jit
def _rows_dot_f(h_ptr, w_ptr, s_ptr, z_ptr, n, mn, K: tl.constexpr, G: tl.constexpr):
    # (h w^T)[n] for the BND rows n of w [., K], in fp32 (the down kernel's forms)
    if FTILE_D:
        tile = tl.zeros((BND, BKD), tl.float32)
        for k0 in $krange_d(0, K, BKD):
            tile += _wmul_f(w_ptr, n, mn, h_ptr, k0, K, BKD, XTILE_D)
        y = tl.sum(tile, 1)
    else:
        y = tl.zeros_like(n).to(tl.float32)
        for k0 in $krange_d(0, K, BKD):
            y += _wdot_f(w_ptr, s_ptr, z_ptr, n, mn, h_ptr, k0, K, G, BKD, XTILE_D)
    return y
"""

_DECODE = """
@triton.jit
def _wmul_f(w_ptr, r, mr, v_ptr, k0, K: tl.constexpr, BKX: tl.constexpr, XT: tl.constexpr):
    # w[r, k] v[k] over k0 .. k0 + BKX of a float weight [., K], in fp32 (XT: x_load "tile")
    k = k0 + tl.arange(0, BKX)
    mk = k < K
    w = tl.load(w_ptr + r[:, None] * K + k[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
    if XT:          # v read in w's [rows, BKX] shape (the rows' copies from L1): no layout change
        v = tl.load(v_ptr + k[None, :] + 0 * r[:, None], mask=mr[:, None] & mk[None, :], other=0.0)
        return w.to(tl.float32) * v.to(tl.float32)
    v = tl.load(v_ptr + k, mask=mk, other=0.0).to(tl.float32)
    return w.to(tl.float32) * v[None, :]


@triton.jit
def _wdot_f(w_ptr, s_ptr, z_ptr, r, mr, v_ptr, k0, K: tl.constexpr, G: tl.constexpr, BKX: tl.constexpr,
            XT: tl.constexpr):
    # sum_k w[r, k] v[k] over k0 .. k0 + BKX of a float weight [., K]
    return tl.sum(_wmul_f(w_ptr, r, mr, v_ptr, k0, K, BKX, XT), 1)


@triton.jit
def _column(pairs):
    # this program's column: grid order, or with SHARED_FIRST the shared expert's columns (past
    # the pairs) first in launch order, so they read weights prefetched into L2 before the
    # routed experts' stream evicts them
    p = tl.program_id(1)
    if SHARED_FIRST:
        shared = tl.num_programs(1) - pairs
        p = tl.where(p < shared, p + pairs, p - shared)
    return p


$loader
$helpers

@triton.jit
def moe_decode_gate_up(x_ptr, ids_ptr, w13_ptr, s13_ptr, z13_ptr, h_ptr, wg_ptr, wu_ptr, hs_ptr, pairs):
    # grid (I blocks, pairs + SHR x tokens): one expert's BN gate and up rows against one token's
    # x; programs past the pairs do the shared expert, SHR of them a token and I block (BNS rows each)
    p = _column(pairs)
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    if p < pairs:
        ex = tl.load(ids_ptr + p)
        wb = w13_ptr + ex * W13
        mn = n < I
        h = _swiglu_rows_$R(x_ptr + (p // TOPKD).to(tl.int64) * D, wb, wb, s13_ptr + ex * S13, z13_ptr + ex * S13,
                           n, n + I, mn, False)
        tl.store(h_ptr + p.to(tl.int64) * I + n, h.to(DT), mask=mn)
    else:
        tok = ((p - pairs) // SHR).to(tl.int64)
        ns = (tl.program_id(0) * SHR + (p - pairs) % SHR) * BNS + tl.arange(0, BNS)
        ms = ns < IS
        hsh = _swiglu_rows_f(x_ptr + tok * D, wg_ptr, wu_ptr, wg_ptr, wg_ptr, ns, ns, ms, True)
        tl.store(hs_ptr + tok * IS + ns, hsh.to(DT), mask=ms)


@triton.jit
def moe_decode_down(h_ptr, ids_ptr, w2_ptr, s2_ptr, z2_ptr, hs_ptr, wd_ptr, y_ptr, wts_ptr, acc_ptr, out_ptr,
                    tickets_ptr, pairs):
    # grid (D blocks, pairs + SHR x tokens): y[p] = round(h[p] w2_{ids[p]}^T) for BND of its D
    # rows; programs past the pairs do the shared expert (y's row pairs + token), SHR of them a token
    # and D block (BNDS rows each). Each then takes a ticket of (its token, D block); the last of the
    # token's TOPK (+ SHR) programs there combines: out[tok] = acc[tok] (or the shared row) +
    # sum_j weights[tok, j] y[tok K + j]
    p = _column(pairs)
    n = tl.program_id(0) * BND + tl.arange(0, BND)
    mn = n < D
    if p < pairs:
        ex = tl.load(ids_ptr + p)
        y = _rows_dot_$R(h_ptr + p.to(tl.int64) * I, w2_ptr + ex * W2, s2_ptr + ex * S2, z2_ptr + ex * S2,
                        n, mn, I, G2)
        tok = p // TOPKD
        tl.store(y_ptr + p.to(tl.int64) * D + n, y.to(DT), mask=mn)
    else:
        tok = (p - pairs) // SHR
        ns = (tl.program_id(0) * SHR + (p - pairs) % SHR) * BNDS + tl.arange(0, BNDS)
        ms = ns < D
        ys = _rows_dot_f(hs_ptr + tok.to(tl.int64) * IS, wd_ptr, wd_ptr, wd_ptr, ns, ms, IS, 1)
        tl.store(y_ptr + (pairs + tok).to(tl.int64) * D + ns, ys.to(DT), mask=ms)
    tl.debug_barrier()                  # every thread's rows stored before the ticket
    ticket = tickets_ptr + tok * tl.num_programs(0) + tl.program_id(0)
    if tl.atomic_add(ticket, 1, sem="acq_rel") == TOPK + SHARED * SHR - 1:
        tl.store(ticket, 0)
        if SHARED:
            a = tl.load(y_ptr + (pairs + tok).to(tl.int64) * D + n, mask=mn, other=0.0, cache_modifier=".cg")
        else:
            a = tl.load(acc_ptr + tok.to(tl.int64) * D + n, mask=mn, other=0.0)
        a = _weighted_rows(y_ptr, y_ptr, wts_ptr, a.to(tl.float32), tok, n, mn, True)
        tl.store(out_ptr + tok.to(tl.int64) * D + n, a.to(DT), mask=mn)
"""


@dataclass(frozen=True, eq=False)
class Quant:
    """Low-bit routed experts (kimi_graph/ops/quant.py): w13 and w2 are `fmt` codes with these
    scales, and zero points when asymmetric."""
    fmt: str
    group_size: int
    s13: torch.Tensor
    s2: torch.Tensor
    z13: torch.Tensor | None = None
    z2: torch.Tensor | None = None

    def key(self) -> tuple:
        return self.fmt, self.group_size, self.z13 is not None


FORMS = {"acc": ("row", "tile"), "unroll": (False, True), "x_load": ("vector", "tile")}   # the float K loops
TILE_KEYS = ("BN", "BK", "num_warps", "BND", "BKD", "warps_down", "num_stages", *FORMS,
             *(f"{k}_down" for k in FORMS))


def forms_of(cfg: dict) -> tuple[dict, dict]:
    """The gate/up and the down kernel's K-loop forms ({key: value} over FORMS) a config gives:
    FORMS' first value where unset; the down's `*_down` keys, each the gate/up's where unset."""
    form = {k: cfg[k] if cfg.get(k) is not None else allowed[0] for k, allowed in FORMS.items()}
    return form, {k: cfg[f"{k}_down"] if cfg.get(f"{k}_down") is not None else form[k] for k in FORMS}


def bucket_of(cfg: dict, tokens: int) -> int | None:
    """The first `token_tiles` bound that holds `tokens` tokens (None: the unbucketed tiles)."""
    return next((bound for bound, _ in cfg.get("token_tiles", ()) if tokens <= bound), None)


def _tiles(cfg: dict, over: dict, where: str, keys: tuple) -> dict:
    bad = set(over) - set(keys)
    if bad:
        raise ValueError(f"{where}: {sorted(bad)} are not tile keys ({', '.join(keys)})")
    return {**cfg, **over}


def bucket_config(cfg: dict, bucket: int | None, keys: tuple = TILE_KEYS, family: str = "moe_decode",
                  quant: str | None = None) -> dict:
    """cfg with the tiles of its `token_tiles` entry for `bucket` (a bound) over its own, and for
    low-bit experts (`quant`: their format) those of `quant_tiles` over both, then `quant_bucket`'s."""
    if bucket is not None:
        cfg = _tiles(cfg, dict(cfg["token_tiles"])[bucket], f"{family} token_tiles[{bucket}]", keys)
    if not quant:
        return cfg
    return quant_bucket(_tiles(cfg, cfg.get("quant_tiles") or {}, f"{family} quant_tiles", keys), bucket, quant, keys,
                        family)


def quant_bucket(cfg: dict, bucket: int | None, fmt: str, keys: tuple = TILE_KEYS, family: str = "moe_decode") -> dict:
    """cfg with the low-bit experts' own tiles for `bucket` over it: the entries of
    `quant_token_tiles`, then of `quant_token_tiles_FMT` for `fmt` (bounds must be `token_tiles`
    bounds): a bucket's float tiles need not suit the codes."""
    bounds = {b for b, _ in cfg.get("token_tiles", ())}
    for key in ("quant_token_tiles", f"quant_token_tiles_{fmt}"):
        entries = cfg.get(key) or []
        stray = sorted({b for b, _ in entries} - bounds)
        if stray:
            raise ValueError(f"{family} {key} bounds {stray} are not token_tiles bounds")
        over = dict(entries).get(bucket)
        cfg = _tiles(cfg, over, f"{family} {key}[{bucket}]", keys) if over else cfg
    return cfg


@functools.lru_cache(maxsize=None)
def decode_specs(I, D, top_k, dtype, wdt, shared_i, target, quant: tuple | None = None, bucket: int | None = None):
    """(gate_up, down) kernels of the direct path (down combines); shared_i: the shared expert's width
    (0: none); quant: (format, group size, asymmetric) of low-bit experts; bucket: the
    `token_tiles` bound whose tiles to take (bucket_of). None where the target has no kernel for
    the format (fp8 before sm_89)."""
    base = config("moe_decode", target)
    cfg = bucket_config(base, bucket)
    words = a8 = False
    if quant is not None:       # the word loader takes quant_tiles (K tiles in int4 columns)
        fmt, group, asym = quant
        qcfg = bucket_config(base, bucket, quant=fmt)
        G1, G2 = group_of(fmt, D, group), group_of(fmt, I, group)
        BK, BKD = (dequant.word_tile(fmt, qcfg[k]) if fmt in BITS else 0 for k in ("BK", "BKD"))
        a8 = bool(qcfg.get("a8")) and moe_w4a8.fits(fmt, D, I, G1, G2)
        words = a8 or uses_words(qcfg, fmt, D, I, G1, G2, min(BK, next_pow2(D)), min(BKD, next_pow2(max(I, shared_i))))
        if words:
            cfg = {**qcfg, "BK": BK, "BKD": BKD}
        else:                   # (elements: the bucket's float tiles, then the codes' own)
            cfg = quant_bucket(cfg, bucket, fmt)
        if a8:                  # int8 activations by dp4a: moe_w4a8's loops, tiles and warps
            a8_src, a8_consts = moe_w4a8.decode_parts(D, I, G1, G2, asym, target)
            qq = config("moe_gemm_q", target)
            cfg.update(BN=a8_consts.pop("BN"), BND=a8_consts.pop("BND"), num_warps=qq["warps_w4a8"],
                       warps_down=qq.get("warps_down_w4a8", qq["warps_w4a8"]), num_stages=qq["stages_w4a8"])
    wide = max(I, shared_i)
    consts = {"I": I, "IS": max(shared_i, 1), "D": D, "TOPK": top_k, "TOPKD": max(top_k, 1),
              "BN": min(cfg["BN"], next_pow2(wide)), "BK": min(cfg["BK"], next_pow2(D)),
              "BND": min(cfg["BND"], next_pow2(D)), "BKD": min(cfg["BKD"], next_pow2(wide)),
              "SHARED": int(shared_i > 0), "SHARED_FIRST": bool(shared_i and base["shared_first"]),
              "DT": TL_DTYPES[dtype], "W13": 2 * I * D, "W2": D * I, "S13": 1, "S2": 1, "G1": 1, "G2": 1, "NPW": 1}
    # low-bit experts: the shared (float) expert's rows of an output block over SHR programs a
    # token, so its programs read about the bytes the codes' programs do (shared_split)
    # (batches in a token bucket of at most shared_split_tokens tokens; 0: every batch)
    split_here = not base["shared_split_tokens"] or (bucket is not None and bucket <= base["shared_split_tokens"])
    shr = 1 if quant is None or not split_here else max(1, min(int(base["shared_split"]), consts["BN"], consts["BND"]))
    if shr & (shr - 1):
        raise ValueError(f"moe_decode shared_split {shr}: a power of two")
    consts.update(SHR=shr, BNS=consts["BN"] // shr, BNDS=consts["BND"] // shr)
    p, stages = ptr_type(dtype), cfg["num_stages"]
    code, scale, zero = p, p, p
    for key, allowed in FORMS.items():
        for k in (key, f"{key}_down"):
            if cfg.get(k, allowed[0]) not in allowed:
                raise ValueError(f"moe_decode {k} {cfg[k]!r}: one of {allowed}")
    # the float K loops' forms: the bf16 experts' (low-bit kernels keep the plain loops for their shared expert)
    plain = quant is not None
    form, down = forms_of(cfg)
    krange = lambda f: "tl.static_range" if not plain and f["unroll"] else "range"  # noqa: E731
    consts.update(FTILE=not plain and form["acc"] == "tile", FTILE_D=not plain and down["acc"] == "tile",
                  XTILE=form["x_load"] == "tile", XTILE_D=down["x_load"] == "tile")
    helpers = _HELPERS.replace("$krange_d", krange(down)).replace("$krange", krange(form))
    loader = ""
    if quant is not None:
        if fmt == "fp8" and not moe_quant.has_e4m3(target):
            return None
        w13, w2 = (2 * I, D), (D, I)
        unit = 4 if words else 1                    # bytes a code pointer steps
        consts.update(G1=G1, G2=G2, NPW=dequant.slots(fmt, words),
                      W13=math.prod(code_shape(fmt, w13)) // unit, W2=math.prod(code_shape(fmt, w2)) // unit,
                      S13=math.prod(scale_shape(fmt, w13, group)), S2=math.prod(scale_shape(fmt, w2, group)))
        code, zero = "*i32" if words else moe_quant.CODE_PTR[fmt], "*u8" if asym else p
        helpers, loader = helpers + dequant.helpers(words, cfg["prefetch"]), dequant.loader(fmt, asym, words)
        if a8:
            helpers += "\n\n" + a8_src
            consts.update(a8_consts)
    name = "moe_decode" + (f"_{quant[0]}" if quant else "") + ("_a8" if quant and a8 else "")
    src = render(name, _DECODE + moe_permute.WEIGHTED_ROWS, consts, loader=loader, helpers=helpers,
                 R="a8" if quant and a8 else "q" if quant else "f")
    return (KernelSpec(f"{name}_gate_up", "moe_decode_gate_up", src,
                       {"x_ptr": p, "ids_ptr": "*i64", "w13_ptr": code, "s13_ptr": scale, "z13_ptr": zero,
                        "h_ptr": p, "wg_ptr": p, "wu_ptr": p, "hs_ptr": p, "pairs": "i32"},
                       cfg["num_warps"], stages, consts),
            KernelSpec(f"{name}_down", "moe_decode_down", src,
                       {"h_ptr": p, "ids_ptr": "*i64", "w2_ptr": code, "s2_ptr": scale, "z2_ptr": zero,
                        "hs_ptr": p, "wd_ptr": p, "y_ptr": p, "wts_ptr": ptr_type(wdt), "acc_ptr": p, "out_ptr": p,
                        "tickets_ptr": "*i32", "pairs": "i32"},
                       cfg.get("warps_down", cfg["num_warps"]), stages, consts))


def uses_words(cfg: dict, fmt: str, D: int, I: int, G1: int, G2: int, BK: int, BKD: int) -> bool:
    """Do the kernels read `fmt` codes as 32-bit words (dequant.py)? Where the `dequant` key says
    "words" and the rows, groups and K tiles hold whole words."""
    return cfg.get("dequant", "words") == "words" and dequant.words_fit(fmt, [(D, G1, BK), (I, G2, BKD)])


def _shapes(w13, w2, quant):
    """The float weights' shapes ([E, 2I, D], [E, D, I])."""
    if quant is None:
        return tuple(w13.shape), tuple(w2.shape)
    return weight_shape(quant.fmt, tuple(w13.shape)), weight_shape(quant.fmt, tuple(w2.shape))


def _check(x, ids, weights, w13, w2, acc, shared, quant=None):
    (E, I2, D), s2 = _shapes(w13, w2, quant)
    ok = ids.shape == weights.shape and ids.shape[:-1] == x.shape[:-1] and x.shape[-1] == D \
        and s2 == (E, D, I2 // 2) and ids.dtype == torch.int64 and (acc is None or acc.shape == x.shape)
    if shared is not None:
        wg, wu, wd = shared
        ok = ok and wg.shape == wu.shape and wg.shape[1:] == (D,) and wd.shape == (D, wg.shape[0])
    if not ok or (acc is None) == (shared is None):
        raise ValueError(f"x {tuple(x.shape)}, ids {tuple(ids.shape)} {ids.dtype}, weights {tuple(weights.shape)}, "
                         f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, acc {None if acc is None else tuple(acc.shape)}"
                         f", shared {None if shared is None else [tuple(t.shape) for t in shared]} do not fit "
                         "(give acc or a shared expert, not both)")


def _specs(x, ids, weights, w13, w2, shared, quant):
    (E, I2, D), _ = _shapes(w13, w2, quant)
    IS = 0 if shared is None else shared[0].shape[0]
    target = current_target()
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return decode_specs(I2 // 2, D, ids.shape[-1], ir_dtype(x), ir_dtype(weights), IS, target,
                        quant and quant.key(), bucket_of(config("moe_decode", target), tokens))


def direct(x, ids, weights, w13, w2, acc=None, shared=None, quant: Quant | None = None, before_down=None,
           out=None, lane: str = ""):
    """acc + sum_j weights[..., j] SwiGLU_{ids[..., j]}(x), reading experts by id; with `shared`
    = (w_gate, w_up, w_down), the shared expert's SwiGLU(x) takes acc's place (ids of no columns:
    the shared expert alone, on these kernels); with `quant`, w13 and w2 are low-bit codes,
    dequantized in the kernels (only the codes are read). before_down: an event the down kernel
    waits for (acc written on another stream); out: where to write (else a new tensor); lane: the
    ticket counters' lane (codegen.tickets: a side stream's own)."""
    _check(x, ids, weights, w13, w2, acc, shared, quant)
    specs = _specs(x, ids, weights, w13, w2, shared, quant)
    if specs is None:
        raise ValueError(f"no direct decode kernel for {quant.fmt} experts on {current_target()}")
    gate_up, down = specs
    (E, I2, D), _ = _shapes(w13, w2, quant)
    I = I2 // 2
    dt = x.dtype
    IS = 0 if shared is None else shared[0].shape[0]
    c = gate_up.config
    pairs = ids.numel()
    N = x.numel() // D
    if not N or not (pairs or IS):
        return acc.to(dt).clone() if acc is not None else torch.empty(x.shape, device=x.device, dtype=dt)
    if not pairs:               # the shared expert alone: ids and weights never read (one element each)
        ids, weights = (torch.empty(1, device=x.device, dtype=t.dtype) for t in (ids, weights))
    rows = pairs + (N if IS else 0)          # the shared expert's rows after the pairs
    programs = pairs + (c["SHR"] * N if IS else 0)
    h = torch.empty(max(pairs, 1), I, device=x.device, dtype=dt)
    y = torch.empty(rows, D, device=x.device, dtype=dt)
    hs = torch.empty(N, IS, device=x.device, dtype=dt) if IS else h
    wg, wu, wd = (t.to(dt).contiguous() for t in shared) if IS else (h, h, h)
    if quant is None:
        w13, w2 = w13.to(dt).contiguous(), w2.to(dt).contiguous()
        s13 = z13 = w13
        s2 = z2 = w2
    else:
        w13, w2 = (dequant.as_words(w) if gate_up.signature["w13_ptr"] == "*i32" else w.contiguous()
                   for w in (w13, w2))
        s13, s2 = quant.s13.to(dt).contiguous(), quant.s2.to(dt).contiguous()
        z13 = s13 if quant.z13 is None else quant.z13.contiguous()
        z2 = s2 if quant.z2 is None else quant.z2.contiguous()
    ids_c, xc = ids.contiguous(), x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=dt) if out is None else out
    acc = y if IS else acc.to(dt).contiguous()
    d_blocks = -(-D // c["BND"])
    launch(gate_up, (-(-max(I, IS) // c["BN"]), programs), xc, ids_c, w13, s13, z13, h, wg, wu, hs, pairs)
    if before_down is not None:
        torch.cuda.current_stream(x.device).wait_event(before_down)
    launch(down, (d_blocks, programs), h, ids_c, w2, s2, z2, hs, wd, y, weights.contiguous(), acc, out,
           tickets(x.device, N * d_blocks, lane), pairs)
    return out


def shared_swiglu(x, wg, wu, wd):
    """The shared expert (moe.moe_experts' accumulator): its GEMMs through torch, gate and up in
    one when they are adjacent rows of one fused weight, SwiGLU by moe.swiglu_rows then."""
    import torch.nn.functional as F
    if not (wg.is_contiguous() and wu.is_contiguous() and wg.shape[1:] == wu.shape[1:] and wg.shape[0] == wu.shape[0]
            and wu.data_ptr() == wg.data_ptr() + wg.numel() * wg.element_size()):
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
    gu = F.linear(x, torch.as_strided(wg, (2 * wg.shape[0], wg.shape[1]), wg.stride())).reshape(-1, 2 * wg.shape[0])
    spec = moe.swiglu_rows_spec(wg.shape[0], ir_dtype(x))
    h = torch.empty(gu.shape[0], wg.shape[0], device=x.device, dtype=x.dtype)
    launch(spec, (-(-gu.shape[0] // spec.config["BR"]), -(-wg.shape[0] // spec.config["BI"])), gu, h, gu.shape[0])
    return F.linear(h.reshape(*x.shape[:-1], -1), wd)


def takes_direct(ids: torch.Tensor) -> bool:
    return ids.numel() <= config("moe_decode", current_target())["max_pairs"]


def moe_experts(x, ids, weights, w13, w2, acc=None, shared=None, quant: Quant | None = None, acc_ready=None):
    """The routed experts (and a shared one): by id for a decode-sized batch (low-bit experts:
    where `quant_direct` says so), else the permuted path (moe.moe_experts, or for low-bit experts
    moe_quant.quantized_moe_experts) after the shared expert through torch. acc_ready: an event
    recorded once acc is written (on another stream: `shared_beside`)."""
    cfg = config("moe_decode", current_target())
    direct_q, tokens = cfg["quant_direct"], ids.numel() // ids.shape[-1] if ids.shape[-1] else 0
    by_id = quant is None or (quant.fmt in direct_q if isinstance(direct_q, (list, tuple)) else bool(direct_q)) \
        or 0 < tokens <= cfg["quant_direct_tokens"].get(quant.fmt, 0)
    if by_id and takes_direct(ids) and _specs(x, ids, weights, w13, w2, shared, quant) is not None:
        return direct(x, ids, weights, w13, w2, acc, shared, quant, before_down=acc_ready)
    _check(x, ids, weights, w13, w2, acc, shared, quant)
    if acc_ready is not None:                   # (None off CUDA: written in turn)
        torch.cuda.current_stream(x.device).wait_event(acc_ready)
    if shared is not None:
        acc = shared_swiglu(x, *(t.to(x.dtype) for t in shared))
    if quant is None:
        return moe.moe_experts(x, ids, weights, w13, w2, acc)
    return moe_quant.quantized_moe_experts(x, ids, weights, w13, quant.s13, w2, quant.s2, acc, quant.z13, quant.z2,
                                           fmt=quant.fmt, group_size=quant.group_size)


def operands_before_acc(kind: str) -> int:
    """The operands of a moe_experts (5) or quantized_moe_experts (7) op before its acc."""
    return 7 if kind == "quantized_moe_experts" else 5


def _shared_of(args: list, n: int, shared_rows: tuple) -> tuple:
    """The shared expert's (Wg, Wu, Wd) among an Experts step's operands (at n), Wg and Wu sliced."""
    (g0, g1), (u0, u1) = shared_rows
    return args[n][g0:g1], args[n + 1][u0:u1], args[n + 2]


def _routed(n: int, attrs: dict, args: list, zeros: list) -> tuple:
    """(w13, w2, Quant or None) of an experts op's operands (`operands_before_acc` n), low-bit
    ones with these zero points."""
    if n == 5:
        return args[3], args[4], None
    return args[3], args[5], Quant(attrs["format"], attrs["group_size"], args[4], args[6], *zeros)


def run_step(kind: str, attrs: dict, args: list, shared_rows: tuple = (), beside=None):
    """A moe_experts or quantized_moe_experts op's operands (the backend's `Experts` step): with
    `shared_rows`, the acc operand is replaced by the shared expert's (Wg, Wu, Wd), Wg and Wu
    sliced to those (start, end) rows; beside: (its output, the event after it) from
    `shared_beside`, which then takes the acc's place."""
    n = operands_before_acc(kind)
    ready = None
    if beside is not None:
        (acc, ready), shared, rest = beside, None, args[n + 3:]
    elif shared_rows:
        acc, shared, rest = None, _shared_of(args, n, shared_rows), args[n + 3:]
    else:
        acc, shared, rest = args[n], None, args[n + 1:]
    w13, w2, quant = _routed(n, attrs, args, rest)
    return moe_experts(*args[:3], w13, w2, acc, shared, quant, acc_ready=ready)


_SIDE: dict = {}            # device -> the side stream shared_beside launches on


def beside_tokens(tokens: int) -> bool:
    """Does a step of `tokens` tokens run its shared expert beside the router (moe_decode
    shared_beside: up to that many tokens)?"""
    return 0 < tokens <= config("moe_decode", current_target())["shared_beside"]


def shared_beside(kind: str, attrs: dict, args: list, shared_rows: tuple, x, residual, norm_weight, eps):
    """The shared expert of an Experts step (operands `args`, x, ids and weights not yet known)
    on a side stream forked here: add_rmsnorm(x, residual) * norm_weight (as the router's launch
    computes it), then the shared expert alone on the direct kernels. Returns (its output, the
    event recorded after it) for run_step's `beside`: the routed down kernel waits for it, so the
    shared expert's weights stream while the router's latency-bound launch runs. Off CUDA (the
    interpreter) the same launches run in turn (no event)."""
    from .norm import rmsnorm
    n = operands_before_acc(kind)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)     # the caller's stream's memory
    none = torch.empty(*x.shape[:-1], 0, device=x.device, dtype=torch.int64)
    w13, w2, quant = _routed(n, attrs, args, args[n + 3:])

    def launches():
        xn, _ = rmsnorm(x, norm_weight, eps, residual=residual)
        direct(xn, none, none.float(), w13, w2, None, _shared_of(args, n, shared_rows), quant, out=out,
               lane="beside")
    if not x.is_cuda:
        launches()
        return out, None
    side = _SIDE.setdefault(x.device, torch.cuda.Stream(x.device))
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        launches()
        done = torch.cuda.Event()
        done.record(side)
    return out, done


def op_quantized_moe_experts(args, attrs):
    return [run_step("quantized_moe_experts", attrs, list(args))]


def specs_for(kind, ins, outs, attrs, target, shared_i: int = 0):
    """Both paths' kernels (the op runs either; the direct one in every token bucket, and with the
    shared expert beside the router (shared_beside) its kernels with no routed pairs), for AOT
    builds."""
    x, ids, w = ins[:3]
    cfg = config("moe_decode", target)
    buckets = [None] + [bound for bound, _ in cfg.get("token_tiles", ())]
    ks = [ids.shape[-1]] + ([0] if shared_i and cfg["shared_beside"] else [])
    if kind == "quantized_moe_experts":
        fmt = attrs["format"]
        (E, I2, D), I = weight_shape(fmt, ins[3].shape), weight_shape(fmt, ins[5].shape)[2]
        zeros = ins[7 + (3 if shared_i else 1):]             # after acc or the shared expert's weights
        direct_specs = [s for k in ks for b in buckets for s in decode_specs(
            I, D, k, x.dtype, w.dtype, shared_i, target, (fmt, attrs["group_size"], bool(zeros)), b) or ()]
        return direct_specs + moe_quant.chain_specs(ins[:7] + [x] + list(zeros), attrs, target)
    E, I2, D = ins[3].shape
    return ([s for k in ks for b in buckets for s in decode_specs(I2 // 2, D, k, x.dtype, w.dtype, shared_i, target,
                                                                  None, b)]
            + moe.specs_for("moe_experts", ins[:5] + [x], outs, attrs, target))
