"""KDA's decode step in one launch: the q/k/v causal convs (+ SiLU) with their states, the f_b and
g_b projections of f_a and g_a, the gating and the delta-rule step, where the plain schedule
takes three (the conv group, the f_b / g_b pair, kda_recurrent_step).

One program per (token, head) of a one-token step: it reads its row of the fused input
projection (q, k, v, f_a, b and g_a are last-dim slices of one value), computes its head's
channels of the three convs from their states (each state shifted by one, the input last, in
place, after a barrier: every thread's reads of the old columns come first), its head's K
columns of f = f_a W_f^T and V columns of the gate g_b = g_a W_g^T (stored: the gated norm after
the step reads it), then the gated delta step on its whole [K, V] state. Every value the plain
kernels round to the data dtype between launches (conv outputs, f, the gate) is rounded the
same way here, so both forms agree to fp32 rounding.

The step (`DecodeStep`) holds the plain schedule items it replaces and runs them instead for
more than one token a sequence (prefill), states that are not in-place views, or more
sequences than kda_recurrent.fused_decode (0: never fused).

Up to `decode_split_rows` sequences, each head's V columns split over `decode_split` programs (the
state is [K, V]: each program's columns are independent; the q / k convs and f are recomputed by
each): more programs on a small batch. Every program reads the old q / k conv columns, so the last
of a head's programs to finish (a ticket, codegen.tickets) stores their new ones."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from kimi_graph.ops import get_op
from kimi_graph.runtime.views import SlotRows

from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render, row_view, tickets
from .elementwise import ir_dtype
from .kda import _GATE
from .targets import config, current_target

_STEP = _GATE + """

@triton.jit
def _conv_in(x_ptr, w_ptr, st_ptr, srow, c, m, C: tl.constexpr):
    # channels c of one token's causal conv (+ SiLU) from its state: (output rounded to DT in
    # fp32, the state's new columns, their pointers, whether they are stored); the taps summed
    # as causal_conv1d_fwd sums them (the input's tap, then the state's in order)
    jw = tl.arange(0, WP)
    live = m & (c * 0 + srow >= 0)
    sp = st_ptr + ((tl.maximum(srow, 0).to(tl.int64) * C + c) * (W - 1))[:, None] + jw[None, :]
    ms = live[:, None] & (jw < W - 1)[None, :]
    old = tl.load(sp, mask=ms, other=0.0)
    x = tl.load(x_ptr + c, mask=m, other=0.0)
    w = tl.load(w_ptr + c[:, None] * W + jw[None, :], mask=m[:, None] & (jw < W)[None, :], other=0.0).to(tl.float32)
    acc = tl.sum(tl.where(jw[None, :] == W - 1, w, 0.0), 1) * x.to(tl.float32)
    of = old.to(tl.float32)
    for i in tl.static_range(W - 1):
        acc += tl.sum(tl.where(jw[None, :] == i, w * of, 0.0), 1)
    acc = acc / (1.0 + tl.exp(-acc))
    # new column j = (state || x)[j + 1]: the old column j + 1, the input in the last
    nxt = tl.load(sp + 1, mask=ms & (jw < W - 2)[None, :], other=0.0)
    new = tl.where(jw[None, :] == W - 2, x[:, None], nxt)
    return acc.to(DT).to(tl.float32), new, sp, ms


@triton.jit
def _project(x_ptr, w, dr, mr):
    # y = sum_r w[:, r] x[r] (x: R values, w: the loaded rows), rounded to DT as the linear's output is
    xr = tl.load(x_ptr + dr, mask=mr, other=0.0).to(tl.float32)
    return tl.sum(w.to(tl.float32) * xr[None, :], 1).to(DT)


@triton.jit
def kda_decode_step(p_ptr, xs, wq_ptr, wk_ptr, wv_ptr, cq_ptr, ck_ptr, cv_ptr, wf_ptr, wg_ptr, a_ptr, dt_ptr,
                    o_ptr, g_ptr, s_ptr, slot_ptr, t_ptr):
    # grid (tokens, heads, NVB blocks of V columns); t: a ticket per (token, head) when NVB > 1;
    # p: the fused projection's rows (xs apart), q / k / v / f_a / b / g_a at QO / KO / VO / FO / BO / GO;
    # the conv states [slots, C, W-1] and the KDA state [slots, H, K, V] at row slot[token] (a padding row, slot -1: zeros read, nothing stored)
    n = tl.program_id(0)
    h = tl.program_id(1)
    dk = tl.arange(0, BK)
    dv = tl.program_id(2) * BV + tl.arange(0, BV)      # this program's V columns (NVB blocks a head)
    dr = tl.arange(0, BR)
    mk = dk < K
    mv = dv < V
    mr = dr < R
    row = p_ptr + n.to(tl.int64) * xs
    srow = tl.load(slot_ptr + n)
    soff = ((tl.maximum(srow, 0).to(tl.int64) * H + h) * K + dk[:, None]) * V + dv[None, :]
    smask = (mk & (dk * 0 + srow >= 0))[:, None] & mv[None, :]
    if EARLY:       # the state and the f_b / g_b rows first: in flight while the convs' loads and sums run
        S = tl.load(s_ptr + soff, mask=smask, other=0.0)
        wf = tl.load(wf_ptr + (h * K + dk)[:, None] * R + dr[None, :], mask=mk[:, None] & mr[None, :], other=0.0)
        if GATE:
            wg = tl.load(wg_ptr + (h * V + dv)[:, None] * R + dr[None, :], mask=mv[:, None] & mr[None, :], other=0.0)
    dt = tl.load(dt_ptr + h * K + dk, mask=mk, other=0.0)
    a_log = tl.load(a_ptr + h)
    q, nq, pq, mq = _conv_in(row + QO, wq_ptr, cq_ptr, srow, h * K + dk, mk, H * K)
    k, nk, pk, mkk = _conv_in(row + KO, wk_ptr, ck_ptr, srow, h * K + dk, mk, H * K)
    v, nv, pv, mvv = _conv_in(row + VO, wv_ptr, cv_ptr, srow, h * V + dv, mv, H * V)
    if not EARLY:   # (fewer registers held through the convs: more programs an SM at larger batches)
        wf = tl.load(wf_ptr + (h * K + dk)[:, None] * R + dr[None, :], mask=mk[:, None] & mr[None, :], other=0.0)
        if GATE:
            wg = tl.load(wg_ptr + (h * V + dv)[:, None] * R + dr[None, :], mask=mv[:, None] & mr[None, :], other=0.0)
    f = _project(row + FO, wf, dr, mr).to(tl.float32)
    if GATE:
        gt = _project(row + GO, wg, dr, mr)
        tl.store(g_ptr + n.to(tl.int64) * (H * V) + h * V + dv, gt, mask=mv)
    bb = tl.sigmoid(tl.load(row + BO + h).to(tl.float32))
    if not EARLY:
        S = tl.load(s_ptr + soff, mask=smask, other=0.0)
    g = kda_decay(f + dt, a_log)
    q = kda_l2norm(q, 0)
    k = kda_l2norm(k, 0)
    S = S * tl.exp(g)[:, None]
    err = v - tl.sum(k[:, None] * S, 0)
    S = S + k[:, None] * (bb * err)[None, :]
    o = tl.sum((q * SCALE)[:, None] * S, 0)
    tl.store(o_ptr + n.to(tl.int64) * (H * V) + h * V + dv, o.to(DT), mask=mv)
    tl.store(s_ptr + soff, S, mask=smask)
    tl.debug_barrier()                  # every thread's reads of the old conv columns first
    tl.store(pv, nv, mask=mvv)
    if NVB == 1:
        tl.store(pq, nq, mask=mq)
        tl.store(pk, nk, mask=mkk)
    else:       # q and k's columns, read by every V block of the head: stored by the last to arrive
        tk = t_ptr + n * H + h
        if tl.atomic_add(tk, 1, sem="acq_rel") == NVB - 1:
            tl.store(tk, 0)
            tl.store(pq, nq, mask=mq)
            tl.store(pk, nk, mask=mkk)
"""


@functools.lru_cache(maxsize=None)
def step_spec(H, K, V, R, W, offsets: tuple, gate: bool, dtype: str, scale: float, eps: float,
              target: str, early: bool = True, split: int = 1) -> KernelSpec:
    """The fused step of heads H x (K, V), f_a / g_a width R, conv width W; offsets: the
    columns (q, k, v, f_a, b, g_a) of the fused projection; early: the state and f_b / g_b rows
    loaded before the convs (kda_recurrent.decode_early_rows); split: programs a head, each
    taking V / split columns of the state (the q / k convs and f recomputed by each)."""
    cfg = config("kda_recurrent", target)
    QO, KO, VO, FO, BO, GO = offsets
    BV = next_pow2(-(-V // split)) if split > 1 else max(16, next_pow2(V))      # (no tl.dot: any power of 2)
    consts = {"H": H, "K": K, "V": V, "R": R, "W": W, "WP": max(2, next_pow2(W)), "BK": max(16, next_pow2(K)),
              "BV": BV, "NVB": -(-V // BV), "BR": max(16, next_pow2(R)), "QO": QO, "KO": KO, "VO": VO, "FO": FO,
              "BO": BO, "GO": GO, "GATE": gate, "EARLY": bool(early), "SCALE": float(scale), "EPS": float(eps), "DT": TL_DTYPES[dtype]}
    p = "*" + {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}[dtype]
    sig = {"p_ptr": p, "xs": "i32", "wq_ptr": p, "wk_ptr": p, "wv_ptr": p, "cq_ptr": p, "ck_ptr": p, "cv_ptr": p,
           "wf_ptr": p, "wg_ptr": p, "a_ptr": "*fp32", "dt_ptr": "*fp32", "o_ptr": p, "g_ptr": p,
           "s_ptr": "*fp32", "slot_ptr": "*i64", "t_ptr": "*i32"}
    warps = cfg["decode_warps"] if consts["NVB"] == 1 else cfg["decode_split_warps"] or cfg["decode_warps"]
    return KernelSpec("kda_decode_step", "kda_decode_step", render("kda_decode_step", _STEP, consts), sig,
                      warps, 1, consts)


def split_of(B: int, target: str) -> int:
    """V blocks a head for a step of B tokens: kda_recurrent.decode_split up to decode_split_rows tokens."""
    cfg = config("kda_recurrent", target)
    return max(1, int(cfg["decode_split"])) if B <= cfg["decode_split_rows"] else 1


@dataclass
class DecodeStep:
    """A KDA layer's convs (a backend Convs step), reshapes, f_b linear (or the f_b / g_b
    LinearPair) and kda_fused_recurrent op: one launch for a one-token step (see the module
    docstring), else `parts`, the plain steps, in order."""
    parts: list               # the plain schedule items: Convs, reshapes, the linear or pair, the KDA op
    kda: object               # the kda_fused_recurrent op
    offsets: tuple            # columns of q, k, v, f_a, b, g_a in the fused projection (g_a: 0 without the gate)
    inputs: list[str]         # projection, conv weights and states (q, k, v), W_f, W_g (or W_f), A_log, dt_bias, state
    outputs: list[str]        # the KDA op's (o, state), the conv states, the gate (with the pair)
    internal: list[str]       # values only the parts pass between them (dropped after them)
    taken: set[int]           # ids of the plan's ops the step runs in their place (the parts' but the KDA op)

    def fused_specs(self, g, target: str) -> list[KernelSpec]:
        """The one-launch kernels of graph `g`'s types, both load orders (AOT builds)."""
        p, wq, wf = (g.types[v] for v in (self.inputs[0], self.inputs[1], self.inputs[7]))
        _, H, K, V = g.types[self.inputs[-1]].shape
        a = get_op("kda_fused_recurrent").full_attrs(self.kda.attrs)
        splits = {1, split_of(1, target)}
        return [step_spec(H, K, V, wf.shape[1], wq.shape[-1], self.offsets, len(self.outputs) > 5, p.dtype,
                          float(a["scale"]), float(a["l2norm_eps"]), target, early, split)
                for early in (True, False) for split in sorted(splits)]


def _slice_of(g, v: str, src: str):
    """(start, end) when `v` is a last-dim slice of `src` with int bounds, else None."""
    sl = g.defining_op(v)
    if sl is None or sl.kind != "slice" or sl.inputs[0] != src:
        return None
    rank = g.types[v].rank
    if sl.attrs["dim"] % rank != rank - 1 or not all(isinstance(sl.attrs[k], int) for k in ("start", "end")):
        return None
    return sl.attrs["start"], sl.attrs["end"]


def decode_steps(g, order: list, convs: dict, pairs: dict, covered) -> dict[int, DecodeStep]:
    """kda op id -> its DecodeStep, for each kda_fused_recurrent with a state whose q, k, v are
    (reshaped) outputs of one conv group of slices of one projection, f a linear of another slice
    of it, b a slice of it; the conv group, reshapes and the linear (or its pair with g_b, of
    a slice of it as well) read by nothing else. `convs`, `pairs`: the plan's steps by first op
    id (the matched ones are for the caller to take out of the plan)."""
    by_conv = {c.ops[0].id: c for c in convs.values()}
    out = {}
    for op in order:
        if op.kind != "kda_fused_recurrent" or len(op.inputs) != 8 or not covered(g, op):
            continue
        resh = [g.defining_op(v) for v in op.inputs[:3]]
        if any(r is None or r.kind != "reshape" for r in resh):
            continue
        cs = [g.defining_op(r.inputs[0]) for r in resh]
        group = by_conv.get(cs[0].id) if cs[0] is not None else None
        if group is None or [c.id for c in group.ops] != [c.id for c in cs] or len(cs[0].inputs) != 3 \
                or get_op("causal_conv1d").full_attrs(cs[0].attrs)["activation"] != "silu":
            continue
        src = group.slices[0].inputs[0]
        lin = g.defining_op(op.inputs[3])
        if lin is None or lin.kind != "linear" or lin.inputs[1] not in g.params:
            continue
        pair = pairs.get(lin.id)
        spans = [_slice_of(g, v, src) for v in [c.inputs[0] for c in cs] + [lin.inputs[0], op.inputs[4]]]
        gspan = _slice_of(g, pair.ops[1].inputs[0], src) if pair is not None else None
        if any(s is None for s in spans) or (pair is not None and gspan is None):
            continue
        internal = [c.outputs[0] for c in cs] + [r.outputs[0] for r in resh] + [lin.outputs[0]]
        mine = {o.id for o in cs + resh + [lin, op]}
        if any(v in g.outputs or any(u.id not in mine for u in g.users(v)) for v in internal):
            continue
        wg = pair.ops[1].inputs[1] if pair is not None else lin.inputs[1]
        offsets = tuple(s[0] for s in spans) + ((gspan[0],) if gspan else (0,))
        inputs = ([src] + [c.inputs[1] for c in cs] + [c.inputs[2] for c in cs]
                  + [lin.inputs[1], wg] + list(op.inputs[5:8]))
        outputs = list(op.outputs) + [c.outputs[1] for c in cs] + ([pair.outputs[1]] if pair else [])
        parts = [group] + resh + [pair if pair is not None else lin] + [op]
        taken = {cs[0].id, lin.id} | {r.id for r in resh}
        out[op.id] = DecodeStep(parts, op, offsets, inputs, outputs, internal, taken)
    return out


def run(item: DecodeStep, args: list):
    """The step's outputs from its inputs, in one launch; None where the plain parts must run
    (more than one token a sequence or more than fused_decode tokens, states not in-place views, a
    kernel that does not build on this GPU: said once, with the reason)."""
    p, wq, wk, wv, cq, ck, cv, wf, wg, A_log, dt_bias, state = args
    target = current_target()
    if p.dim() != 3 or p.shape[1] != 1 or p.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or p.shape[0] > config("kda_recurrent", target)["fused_decode"]:
        return None
    views = (cq, ck, cv, state)
    if not all(isinstance(s, SlotRows) for s in views) or any(s.slots is not state.slots for s in views[:3]) \
            or any(s.storage.dtype != p.dtype or not s.storage.is_contiguous() for s in views[:3]) \
            or state.storage.dtype != torch.float32 or not state.storage.is_contiguous():
        return None
    B, (H, K, V), R, W = p.shape[0], state.storage.shape[1:], wf.shape[1], wq.shape[-1]
    gate = len(item.outputs) > 5
    a = get_op("kda_fused_recurrent").full_attrs(item.kda.attrs)
    spec = step_spec(H, K, V, R, W, item.offsets, gate, ir_dtype(p), float(a["scale"]), float(a["l2norm_eps"]),
                     target, B <= config("kda_recurrent", target)["decode_early_rows"], split_of(B, target))
    if spec.hash in _UNBUILT:
        return None
    rows, xs = row_view(p)
    dt = p.dtype
    o = torch.empty(B, 1, H, V, device=p.device, dtype=dt)
    gt = torch.empty(B, 1, H * V, device=p.device, dtype=dt) if gate else o
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
    try:
        launch(spec, (B, H, spec.config["NVB"]), rows, xs,
               *(w.reshape(w.shape[0], W).to(dt).contiguous() for w in (wq, wk, wv)),
               cq.storage, ck.storage, cv.storage, wf.to(dt).contiguous(), wg.to(dt).contiguous(),
               A_log.reshape(H).float().contiguous(), dt_bias.reshape(H * K).float().contiguous(), o, gt,
               state.storage, state.slots, tickets(p.device, B * H))
    except (CompilationError, OutOfResources) as err:   # raised before the kernel runs: nothing written
        _UNBUILT.add(spec.hash)
        warnings.warn(f"kda_decode_step does not build here ({type(err).__name__}: {str(err)[:200]}); "
                      "KDA decode steps run the plain kernels", RuntimeWarning, stacklevel=2)
        return None
    return [o, state, cq, ck, cv] + ([gt] if gate else [])


_UNBUILT: set[str] = set()     # hashes of step kernels that failed to build on this GPU
