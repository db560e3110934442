"""Causal depthwise conv1d (+ SiLU) with a carried state: one kernel for the outputs (prefill
and the decode step alike; inputs before t=0 come from the state) and one for the new state
(the last W-1 inputs of state ‖ x), folded into the first when T fits one block (decode).
States are read and written at row slot[b] of their storage, so an in-place view
(runtime/views.SlotRows) is updated where it lives: the state write puts column j after
reading column j + T >= j + 1, never a column still to read."""
from __future__ import annotations

import functools

import torch

from kimi_graph.runtime.views import SlotRows

from .codegen import TL_DTYPES, KernelSpec, launch, next_pow2, render, row_view
from .elementwise import ir_dtype, ptr_type
from .targets import config, current_target

_STATE_WRITE = """
# the new state of sequence b: column j = (state ‖ x)[T + j], in ascending j (in place safe);
# a padding row (slot -1) stores nothing
dst = tl.load(slot_ptr + b)
ms = mc & (c * 0 + dst >= 0)
dst = tl.maximum(dst, 0).to(tl.int64)
for j in tl.static_range(W - 1):
    sj = c * 0 + T + j - (W - 1)
    v = tl.load(x_ptr + (b * T + sj).to(tl.int64) * xs + c, mask=mc & (sj >= 0), other=0.0)
    if HAS_STATE:
        v += tl.load(s_ptr + (dst * C + c) * (W - 1) + (sj + (W - 1)), mask=ms & (sj < 0), other=0.0)
    tl.store(sn_ptr + (dst * C + c) * (W - 1) + j, v, mask=ms)
"""

_CONV = """
@triton.jit
def _conv_block(x_ptr, w_ptr, s_ptr, slot_ptr, y_ptr, sn_ptr, T, xs, cblock):
    # y[t, c] = sum_i w[c, i] x[t - W + 1 + i, c] for sequence program_id(0), T block
    # program_id(1), C block `cblock`: tap i reads the [BT, BC] tile of x shifted up W - 1 - i
    # rows (one pointer tile, offset by whole rows: its rows come again from L1 / L2). Inputs
    # before t=0 come from the state, which only the first T block reads. With one T block
    # (decode) the program also writes the new state, after its reads of the old one. x's rows
    # (b, t) are xs apart (a slice of a wider projection's output reads in place).
    b = tl.program_id(0)
    tb = tl.program_id(1)
    t = tb * BT + tl.arange(0, BT)
    c = cblock * BC + tl.arange(0, BC)
    mc = c < C
    mt = t < T
    rows = (b * T + t).to(tl.int64)
    xp = x_ptr + rows[:, None] * xs + c[None, :]
    acc = tl.zeros((BT, BC), tl.float32)
    for i in tl.static_range(W):
        wi = tl.load(w_ptr + c * W + i, mask=mc, other=0.0).to(tl.float32)
        xv = tl.load(xp - (W - 1 - i) * xs, mask=(mt & (t >= W - 1 - i))[:, None] & mc[None, :], other=0.0)
        acc += xv.to(tl.float32) * wi[None, :]
    if HAS_STATE:
        if tb == 0:
            # t < W - 1 - i reads state column t + i (zeros for a padding row, slot -1)
            srow = tl.load(slot_ptr + b)
            sp = s_ptr + (tl.maximum(srow, 0).to(tl.int64) * C + c[None, :]) * (W - 1)
            for i in tl.static_range(W - 1):
                wi = tl.load(w_ptr + c * W + i, mask=mc, other=0.0).to(tl.float32)
                sv = tl.load(sp + (t + i)[:, None], mask=(mt & (t < W - 1 - i) & (t * 0 + srow >= 0))[:, None]
                             & mc[None, :], other=0.0)
                acc += sv.to(tl.float32) * wi[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + rows[:, None] * C + c[None, :], acc.to(DT), mask=mt[:, None] & mc[None, :])
    if W > 1:
        if tl.num_programs(1) == 1:
            $state_write


@triton.jit
def causal_conv1d_fwd(x_ptr, w_ptr, s_ptr, slot_ptr, y_ptr, sn_ptr, T, xs):
    # grid (B, T blocks, C blocks)
    _conv_block(x_ptr, w_ptr, s_ptr, slot_ptr, y_ptr, sn_ptr, T, xs, tl.program_id(2))


$group


@triton.jit
def _state_block(x_ptr, s_ptr, slot_ptr, sn_ptr, T, xs, cblock):
    # the new state of sequence program_id(0), C block `cblock`
    b = tl.program_id(0)
    c = cblock * BC + tl.arange(0, BC)
    mc = c < C
    $state_write


@triton.jit
def causal_conv1d_state(x_ptr, s_ptr, slot_ptr, sn_ptr, T, xs):
    # grid (B, C blocks), after the outputs when T spans several blocks
    _state_block(x_ptr, s_ptr, slot_ptr, sn_ptr, T, xs, tl.program_id(1))
"""


_ARGS = ("x", "w", "s", "slot", "y", "sn")
_STATE_ARGS = ("x", "s", "slot", "sn")


def _dispatch(n: int, block: str, args: tuple, axis: int) -> list[str]:
    """Lines calling `block` for conv i on C blocks [i NCB, (i+1) NCB) of grid axis `axis`."""
    lines = [f"    cb = tl.program_id({axis})"]
    for i in range(n):
        lines.append(f"    if cb < {i + 1} * NCB:" if i == 0 else
                     (f"    elif cb < {i + 1} * NCB:" if i < n - 1 else "    else:"))
        lines.append(f"        {block}({', '.join(f'{a}{i}_ptr' for a in args)}, T, xs, cb - {i} * NCB)")
    return lines


def _group_kernel(n: int) -> str:
    """Kernels running n convs of one shape in one launch each: the outputs (and, with one T
    block, the new states), then the new states when T spans several blocks."""
    fwd = [f"{a}{i}_ptr" for i in range(n) for a in _ARGS]
    st = [f"{a}{i}_ptr" for i in range(n) for a in _STATE_ARGS]
    return "\n".join(["@triton.jit", f"def causal_conv1d_group({', '.join(fwd)}, T, xs):",
                      f"    # grid (B, T blocks, {n} x C blocks)"] + _dispatch(n, "_conv_block", _ARGS, 2)
                     + ["", "", "@triton.jit", f"def causal_conv1d_state_group({', '.join(st)}, T, xs):",
                        f"    # grid (B, {n} x C blocks), after causal_conv1d_group when T spans several blocks"]
                     + _dispatch(n, "_state_block", _STATE_ARGS, 1))


@functools.lru_cache(maxsize=None)
def conv_specs(C: int, W: int, dtype: str, silu: bool, has_state: bool, target: str, group: int = 0):
    """(fwd, state) kernels; with group=n, those of n convs in one launch each."""
    cfg = config("conv", target)
    # BT >= W - 1: only the first T block reads the state
    consts = {"C": C, "W": W, "BT": max(cfg["BT"], next_pow2(W - 1)), "BC": cfg["BC"], "SILU": silu, "HAS_STATE": has_state,
              "DT": TL_DTYPES[dtype], "NCB": -(-C // cfg["BC"])}
    src = render("causal_conv1d", _CONV, consts, state_write=_STATE_WRITE,
                 group=_group_kernel(group) if group else "")
    p = ptr_type(dtype)
    if group:
        sigs = [{f"{a}{i}_ptr": ("*i64" if a == "slot" else p) for i in range(group) for a in args}
                for args in (_ARGS, _STATE_ARGS)]
        return tuple(KernelSpec(name, name, src, {**sig, "T": "i32", "xs": "i32"}, cfg["num_warps"], 1, consts)
                     for name, sig in zip(("causal_conv1d_group", "causal_conv1d_state_group"), sigs))
    fwd = KernelSpec("causal_conv1d_fwd", "causal_conv1d_fwd", src,
                     {"x_ptr": p, "w_ptr": p, "s_ptr": p, "slot_ptr": "*i64", "y_ptr": p, "sn_ptr": p,
                      "T": "i32", "xs": "i32"},
                     cfg["num_warps"], 1, consts)
    st = KernelSpec("causal_conv1d_state", "causal_conv1d_state", src,
                    {"x_ptr": p, "s_ptr": p, "slot_ptr": "*i64", "sn_ptr": p, "T": "i32", "xs": "i32"},
                    cfg["num_warps"], 1,
                    consts)
    return fwd, st


def _operands(x, weight, state, activation, with_y=True):
    """Checked launch operands (x, w, s, slot, y, sn), the new state to return, x's row stride
    and the spec key (`with_y` False: no y, for a kernel that runs the conv itself)."""
    if activation not in ("none", "silu"):
        raise ValueError(f"activation must be 'none' or 'silu', got {activation!r}")
    B, T, C = x.shape
    if weight.dim() != 3 or weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"weight {tuple(weight.shape)} must be [{C}, 1, W]")
    W = weight.shape[2]
    if state is not None and tuple(state.shape) != (B, C, W - 1):
        raise ValueError(f"state {tuple(state.shape)} must be [{B}, {C}, {W - 1}]")
    xc, xs = row_view(x)                  # rows (b, t) xs apart
    w = weight.to(x.dtype).reshape(C, W).contiguous()
    if isinstance(state, SlotRows):
        if state.dtype != x.dtype or not state.storage.is_contiguous():
            raise ValueError(f"an in-place conv state must be contiguous {x.dtype}, got {state.dtype}")
        s = sn = state.storage
        slot, out = state.slots, state
    else:
        s = xc if state is None else state.to(x.dtype).contiguous()
        sn = out = torch.empty(B, C, W - 1, device=x.device, dtype=x.dtype)
        slot = torch.arange(B, device=x.device)
    y = torch.empty(B, T, C, device=x.device, dtype=x.dtype) if with_y else None
    key = (C, W, ir_dtype(x), activation == "silu", state is not None)
    return (xc, w, s, slot, y, sn), out, xs, key


def causal_conv1d(x, weight, state=None, activation="none"):
    """x [B,T,C], weight [C,1,W], state [B,C,W-1] or None -> (y [B,T,C], new state).
    A `SlotRows` state is updated in place and returned as the new state."""
    args, out, xs, key = _operands(x, weight, state, activation)
    fwd, st = conv_specs(*key, current_target())
    B, T, C = x.shape
    BT, BC = fwd.config["BT"], fwd.config["BC"]
    blocks = -(-T // BT)
    xc, w, s, slot, y, sn = args
    if T:
        launch(fwd, (B, blocks, -(-C // BC)), *args, T, xs)
    if key[1] > 1 and blocks != 1:
        launch(st, (B, -(-C // BC)), xc, s, slot, sn, T, xs)
    return y, out


def causal_conv1d_group(xs: list, weights: list, states: list, activation: str = "none") -> list:
    """Several convs of one shape (KDA's q, k and v) -> [(y, new state)]: one launch when T
    fits one block (decode), else two (the outputs, then the new states); convs that differ
    in shape or stride run one after another."""
    prepared = [_operands(x, w, s, activation) for x, w, s in zip(xs, weights, states)]
    B, T, _ = xs[0].shape
    key, stride = prepared[0][3], prepared[0][2]
    if len(xs) < 2 or T == 0 or any(p[3] != key or p[2] != stride for p in prepared) \
            or any(x.shape != xs[0].shape for x in xs):
        return [causal_conv1d(x, w, s, activation) for x, w, s in zip(xs, weights, states)]
    fwd, st = conv_specs(*key, current_target(), group=len(xs))
    blocks, ncb = -(-T // fwd.config["BT"]), len(xs) * fwd.config["NCB"]
    launch(fwd, (B, blocks, ncb), *[a for p in prepared for a in p[0]], T, stride)
    if key[1] > 1 and blocks != 1:
        launch(st, (B, ncb), *[a for p in prepared for a in (p[0][0], p[0][2], p[0][3], p[0][5])], T, stride)
    return [(p[0][4], p[1]) for p in prepared]


def write_states(operands: list, keys: list, B: int, T: int, stride: int) -> None:
    """The new states of convs whose outputs another kernel computed (kda.kda_chunk_conv), after
    it read the old ones: one launch when the convs share a shape (_operands' operands and keys)."""
    if keys[0][1] < 2:
        return
    if len(set(keys)) == 1:
        st = conv_specs(*keys[0], current_target(), group=len(keys))[1]
        launch(st, (B, len(keys) * st.config["NCB"]), *[a for p in operands for a in (p[0], p[2], p[3], p[5])], T,
               stride)
        return
    for p, key in zip(operands, keys):
        st = conv_specs(*key, current_target())[1]
        launch(st, (B, st.config["NCB"]), p[0], p[2], p[3], p[5], T, stride)


def op_causal_conv1d(args, attrs):
    return list(causal_conv1d(args[0], args[1], args[2] if len(args) > 2 else None, attrs["activation"]))


def specs_for(kind, ins, outs, attrs, target, group: int = 0):
    x, w = ins[0], ins[1]
    key = (x.shape[2], w.shape[2], x.dtype, attrs["activation"] == "silu", len(ins) > 2, target)
    return list(conv_specs(*key)) + (list(conv_specs(*key, group=group)) if group else [])
