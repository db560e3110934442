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

from .codegen import TL_DTYPES, KernelSpec, launch, render
from .elementwise import ir_dtype, ptr_type
from .targets import config, current_target

_STATE_WRITE = """
# the new state of sequence b: column j = (state ‖ x)[T + j], in ascending j (in place safe);
# a padding row (slot -1) stores nothing
dst = tl.load(slot_ptr + b)
ms = mc & (c * 0 + dst >= 0)
dst = tl.maximum(dst, 0)
for j in tl.static_range(W - 1):
    sj = c * 0 + T + j - (W - 1)
    v = tl.load(x_ptr + (b * T + sj) * C + c, mask=mc & (sj >= 0), other=0.0)
    if HAS_STATE:
        v += tl.load(s_ptr + (dst * C + c) * (W - 1) + (sj + (W - 1)), mask=ms & (sj < 0), other=0.0)
    tl.store(sn_ptr + (dst * C + c) * (W - 1) + j, v, mask=ms)
"""

_CONV = """
@triton.jit
def causal_conv1d_fwd(x_ptr, w_ptr, s_ptr, slot_ptr, y_ptr, sn_ptr, T):
    # grid (B, T blocks, C blocks); y[t, c] = sum_i w[c, i] x[t - W + 1 + i, c]. With one T block
    # (decode) the program also writes the new state, after its reads of the old one.
    b = tl.program_id(0)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    c = tl.program_id(2) * BC + tl.arange(0, BC)
    mc = c < C
    mt = t < T
    acc = tl.zeros((BT, BC), tl.float32)
    for i in tl.static_range(W):
        src = t - (W - 1 - i)
        wi = tl.load(w_ptr + c * W + i, mask=mc, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + (src + b * T)[:, None] * C + c[None, :],
                     mask=(mt & (src >= 0))[:, None] & mc[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            # src < 0 reads state column W - 1 + src (zeros for a padding row, slot -1)
            col = src + (W - 1)
            srow = tl.load(slot_ptr + b)
            sv = tl.load(s_ptr + (tl.maximum(srow, 0) * C + c[None, :]) * (W - 1) + col[:, None],
                         mask=(mt & (src < 0) & (t * 0 + srow >= 0))[:, None] & mc[None, :], other=0.0).to(tl.float32)
            xv = xv + sv
        acc += xv * wi[None, :]
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + (t + b * T)[:, None] * C + c[None, :], acc.to(DT), mask=mt[:, None] & mc[None, :])
    if W > 1:
        if tl.num_programs(1) == 1:
            $state_write


@triton.jit
def causal_conv1d_state(x_ptr, s_ptr, slot_ptr, sn_ptr, T):
    # grid (B, C blocks), after the outputs when T spans several blocks
    b = tl.program_id(0)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = c < C
    $state_write
"""


@functools.lru_cache(maxsize=None)
def conv_specs(C: int, W: int, dtype: str, silu: bool, has_state: bool, target: str):
    cfg = config("conv", target)
    consts = {"C": C, "W": W, "BT": cfg["BT"], "BC": cfg["BC"], "SILU": silu, "HAS_STATE": has_state,
              "DT": TL_DTYPES[dtype]}
    src = render("causal_conv1d", _CONV, consts, state_write=_STATE_WRITE)
    p = ptr_type(dtype)
    fwd = KernelSpec("causal_conv1d_fwd", "causal_conv1d_fwd", src,
                     {"x_ptr": p, "w_ptr": p, "s_ptr": p, "slot_ptr": "*i64", "y_ptr": p, "sn_ptr": p,
                      "T": "i32"},
                     cfg["num_warps"], 1, consts)
    st = KernelSpec("causal_conv1d_state", "causal_conv1d_state", src,
                    {"x_ptr": p, "s_ptr": p, "slot_ptr": "*i64", "sn_ptr": p, "T": "i32"}, cfg["num_warps"], 1,
                    consts)
    return fwd, st


def causal_conv1d(x, weight, state=None, activation="none"):
    """x [B,T,C], weight [C,1,W], state [B,C,W-1] or None -> (y [B,T,C], new state).
    A `SlotRows` state is updated in place and returned as the new state."""
    if activation not in ("none", "silu"):
        raise ValueError(f"activation must be 'none' or 'silu', got {activation!r}")
    B, T, C = x.shape
    if weight.dim() != 3 or weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"weight {tuple(weight.shape)} must be [{C}, 1, W]")
    W = weight.shape[2]
    if state is not None and tuple(state.shape) != (B, C, W - 1):
        raise ValueError(f"state {tuple(state.shape)} must be [{B}, {C}, {W - 1}]")
    xc = x.contiguous()
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
    fwd, st = conv_specs(C, W, ir_dtype(x), activation == "silu", state is not None, current_target())
    y = torch.empty_like(xc)
    BT, BC = fwd.config["BT"], fwd.config["BC"]
    blocks = -(-T // BT)
    if T:
        launch(fwd, (B, blocks, -(-C // BC)), xc, w, s, slot, y, sn, T)
    if W > 1 and blocks != 1:
        launch(st, (B, -(-C // BC)), xc, s, slot, sn, T)
    return y, out


def op_causal_conv1d(args, attrs):
    return list(causal_conv1d(args[0], args[1], args[2] if len(args) > 2 else None, attrs["activation"]))


def specs_for(kind, ins, outs, attrs, target):
    x, w = ins[0], ins[1]
    return list(conv_specs(x.shape[2], w.shape[2], x.dtype, attrs["activation"] == "silu", len(ins) > 2, target))
