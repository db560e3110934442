"""KDA kernels: chunkwise prefill (four generated kernels) and the recurrent step (decode).

Both take packed tokens [N_tok, H, *] with cumulative sequence offsets `cu_seqlens` [N+1]
(a [B, T] batch is B sequences of T). FUSED kernels compute the gating inside:
g = -exp(A_log) * softplus(f + dt_bias), beta = sigmoid(b), q and k L2-normalised; the
unfused variant (the `kda_recurrent` op) reads g, beta and normalised q, k.

Chunk form (chunk BT, sub-chunk BC), per chunk with cumulative decay G_i = exp(gc_i):
  A_kk[i,j] = beta_i sum_d k_id k_jd G_id/G_jd (j < i)   T = (I + A_kk)^-1
  W = T (beta k G), U = T (beta v)                       A_qk[i,j] = scale q_i.k_j G_i/G_j (j <= i)
  scan over chunks: V' = U - W S;  O = (scale q G) S + A_qk V';  S = G_L S + (k G_L/G)^T V'
G_i/G_j is never formed from G alone: off-diagonal sub-blocks factor through the row before
the later sub-chunk (both factors <= 1) and diagonal sub-blocks are exact column loops.
"""
from __future__ import annotations

import functools

import torch

from kimi_graph.runtime.views import SlotRows

from .codegen import PTR_TYPES, TL_DTYPES, KernelSpec, dot_precision, launch, next_pow2, render
from .targets import config, current_target

_STATE_IN = """
# the (sequence, head) state tile [K, BV], fp32, zeros without an initial state; sequence s
# keeps its state at row slot[s] of the state storage (in place when s0 and sn are one);
# a padding row (slot -1) starts from zeros and stores nothing
srow = tl.load(slot_ptr + s)
soff = ((tl.maximum(srow, 0) * H + h) * K + dk[:, None]) * V + dv[None, :]
smask = (mk & (dk * 0 + srow >= 0))[:, None] & mv[None, :]
if HAS_STATE:
    S = tl.load(s0_ptr + soff, mask=smask, other=0.0)
else:
    S = tl.zeros((BK, BV), tl.float32)
"""

_GATE = """
    if FUSED:
        ss = tl.sum(q * q, 1)
        q = q * (1.0 / tl.sqrt(ss + EPS))[:, None]
        ss = tl.sum(k * k, 1)
        k = k * (1.0 / tl.sqrt(ss + EPS))[:, None]
        x = tl.load(f_ptr + offk, mask=m2, other=0.0).to(tl.float32) + \\
            tl.load(dt_ptr + h * K + dk, mask=mk, other=0.0).to(tl.float32)[None, :]
        y = tl.exp(tl.minimum(x, 20.0))
        sp = tl.where(x > 20.0, x, tl.where(y < 1e-2, y * (1.0 - y * (0.5 - y * (0.3333333333 - y * 0.25))),
                                            tl.log(1.0 + y)))
        g = -tl.exp(tl.load(a_ptr + h).to(tl.float32)) * sp
        beta = tl.sigmoid(tl.load(b_ptr + tok * H + h, mask=rm, other=0.0).to(tl.float32))
    else:
        g = tl.load(f_ptr + offk, mask=m2, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + tok * H + h, mask=rm, other=0.0).to(tl.float32)
"""

_PREP = """
@triton.jit
def kda_chunk_prep(q_ptr, k_ptr, f_ptr, b_ptr, a_ptr, dt_ptr, chunk_start, chunk_len,
                   qn_ptr, kn_ptr, gc_ptr, beta_ptr, qg_ptr, kg_ptr, gl_ptr):
    # one program per (chunk, head): gating, norms, cumulative decay, BC rows at a time
    c = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(chunk_start + c)
    n = tl.load(chunk_len + c)
    dk = tl.arange(0, BK)
    mk = dk < K
    cc = tl.arange(0, BC)
    carry = tl.zeros((BK,), tl.float32)
    for i0 in range(0, BT, BC):
        rm = i0 + cc < n
        tok = start + i0 + cc
        m2 = rm[:, None] & mk[None, :]
        offk = tok[:, None] * (H * K) + h * K + dk[None, :]
        q = tl.load(q_ptr + offk, mask=m2, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offk, mask=m2, other=0.0).to(tl.float32)
        $gate
        g = tl.where(m2, g, 0.0)
        gc = tl.cumsum(g, 0) + carry[None, :]
        carry += tl.sum(g, 0)
        tl.store(qn_ptr + offk, q.to(DT), mask=m2)
        tl.store(kn_ptr + offk, k.to(DT), mask=m2)
        tl.store(gc_ptr + offk, gc, mask=m2)
        tl.store(beta_ptr + tok * H + h, beta, mask=rm)
        tl.store(qg_ptr + offk, (q * tl.exp(gc) * SCALE).to(DT), mask=m2)
    tl.store(gl_ptr + (c * H + h) * K + dk, tl.exp(carry), mask=mk)
    tl.debug_barrier()
    for i0 in range(0, BT, BC):     # k G_L / G, once the chunk's total decay is known
        rm = i0 + cc < n
        m2 = rm[:, None] & mk[None, :]
        offk = (start + i0 + cc)[:, None] * (H * K) + h * K + dk[None, :]
        k = tl.load(kn_ptr + offk, mask=m2, other=0.0).to(tl.float32)
        gc = tl.load(gc_ptr + offk, mask=m2, other=0.0)
        tl.store(kg_ptr + offk, (k * tl.exp(tl.where(m2, carry[None, :] - gc, 0.0))).to(DT), mask=m2)
"""

_INTRA = """
@triton.jit
def kda_chunk_intra(qn_ptr, kn_ptr, gc_ptr, beta_ptr, chunk_start, chunk_len, aqk_ptr, akk_ptr):
    # one program per (chunk, head)
    c = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(chunk_start + c)
    n = tl.load(chunk_len + c)
    dk = tl.arange(0, BK)
    mk = dk < K
    cc = tl.arange(0, BC)
    # intra-chunk A_kk (strictly lower, times beta) and A_qk (lower, times scale), by BC sub-blocks
    for I in tl.static_range(NC):
        rI = I * BC + cc
        mI = rI < n
        mI2 = mI[:, None] & mk[None, :]
        offI = (start + rI)[:, None] * (H * K) + h * K + dk[None, :]
        kI = tl.load(kn_ptr + offI, mask=mI2, other=0.0).to(tl.float32)
        qI = tl.load(qn_ptr + offI, mask=mI2, other=0.0).to(tl.float32)
        gI = tl.load(gc_ptr + offI, mask=mI2, other=0.0)
        bI = tl.load(beta_ptr + (start + rI) * H + h, mask=mI, other=0.0)
        arow = (start + rI)[:, None] * (H * BT) + h * BT
        if I > 0:
            gref = tl.load(gc_ptr + (start + I * BC - 1) * (H * K) + h * K + dk,
                           mask=mk & (dk * 0 + I * BC - 1 < n), other=0.0)
            eI = tl.exp(tl.where(mI2, gI - gref[None, :], 0.0))
            ka = kI * eI
            qa = qI * eI
            for J in tl.static_range(I):
                rJ = J * BC + cc
                mJ2 = (rJ < n)[:, None] & mk[None, :]
                offJ = (start + rJ)[:, None] * (H * K) + h * K + dk[None, :]
                kJ = tl.load(kn_ptr + offJ, mask=mJ2, other=0.0).to(tl.float32)
                gJ = tl.load(gc_ptr + offJ, mask=mJ2, other=0.0)
                kb = tl.trans(kJ * tl.exp(tl.where(mJ2, gref[None, :] - gJ, 0.0)))
                akk = tl.dot(ka, kb, input_precision=PREC) * bI[:, None]
                aqk = tl.dot(qa, kb, input_precision=PREC) * SCALE
                tl.store(akk_ptr + arow + (cc[None, :] + J * BC), akk, mask=mI[:, None])
                tl.store(aqk_ptr + arow + (cc[None, :] + J * BC), aqk.to(DT), mask=mI[:, None])
        dkk = tl.zeros((BC, BC), tl.float32)
        dqk = tl.zeros((BC, BC), tl.float32)
        for j in tl.static_range(BC):      # unrolled: the row loads issue early
            row = I * BC + j
            okj = (start + row) * (H * K) + h * K + dk
            kj = tl.load(kn_ptr + okj, mask=mk & (dk * 0 + row < n), other=0.0).to(tl.float32)
            gj = tl.load(gc_ptr + okj, mask=mk & (dk * 0 + row < n), other=0.0)
            vis = mI2 & (rI >= row)[:, None]
            e = tl.exp(tl.where(vis, gI - gj[None, :], float("-inf")))
            ck = tl.sum(kI * kj[None, :] * e, 1)
            cq = tl.sum(qI * kj[None, :] * e, 1)
            dkk = tl.where(cc[None, :] == j, ck[:, None], dkk)
            dqk = tl.where(cc[None, :] == j, cq[:, None], dqk)
        dkk = tl.where(cc[:, None] > cc[None, :], dkk * bI[:, None], 0.0)
        dqk = tl.where(cc[:, None] >= cc[None, :], dqk * SCALE, 0.0)
        tl.store(akk_ptr + arow + (cc[None, :] + I * BC), dkk, mask=mI[:, None])
        tl.store(aqk_ptr + arow + (cc[None, :] + I * BC), dqk.to(DT), mask=mI[:, None])
        for J in tl.static_range(I + 1, NC):
            z = tl.zeros((BC, BC), tl.float32)
            tl.store(akk_ptr + arow + (cc[None, :] + J * BC), z, mask=mI[:, None])
            tl.store(aqk_ptr + arow + (cc[None, :] + J * BC), z.to(DT), mask=mI[:, None])
"""

_SOLVE = """
@triton.jit
def kda_chunk_solve(kn_ptr, v_ptr, gc_ptr, beta_ptr, akk_ptr, chunk_start, chunk_len, w_ptr, u_ptr):
    # one program per (chunk, head, BW column block of [W | U]): T = (I + A_kk)^-1, then
    # W = T (beta k G) for the first NKW blocks, U = T (beta v) for the rest
    c = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2)
    start = tl.load(chunk_start + c)
    n = tl.load(chunk_len + c)
    cc = tl.arange(0, BC)
    col = tl.where(p < NKW, p, p - NKW) * BW + tl.arange(0, BW)
    mw = (col * 0 + p < NKW) & (col < K)
    mu = (col * 0 + p >= NKW) & (col < V)
    $solve
"""

_SCAN = """
@triton.jit
def kda_chunk_scan(qg_ptr, kg_ptr, w_ptr, u_ptr, aqk_ptr, gl_ptr, o_ptr, s0_ptr, sn_ptr, slot_ptr,
                   cu_ptr, chunk0_ptr):
    # one program per (sequence, head, V block): the state stays in registers across chunks
    s = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    tok0 = tl.load(cu_ptr + s)
    L = tl.load(cu_ptr + s + 1) - tok0
    c0 = tl.load(chunk0_ptr + s)
    r = tl.arange(0, BT)
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < K
    mv = dv < V
    $state_in
    for ci in range(0, tl.cdiv(L, BT)):
        tok = tok0 + ci * BT + r
        rm = ci * BT + r < L
        m2 = rm[:, None] & mk[None, :]
        offk = tok[:, None] * (H * K) + h * K + dk[None, :]
        w = tl.load(w_ptr + offk, mask=m2, other=0.0)
        qg = tl.load(qg_ptr + offk, mask=m2, other=0.0)
        kgt = tl.load(kg_ptr + tok[None, :] * (H * K) + h * K + dk[:, None],
                      mask=rm[None, :] & mk[:, None], other=0.0)
        offv = tok[:, None] * (H * V) + h * V + dv[None, :]
        mv2 = rm[:, None] & mv[None, :]
        u = tl.load(u_ptr + offv, mask=mv2, other=0.0).to(tl.float32)
        aqk = tl.load(aqk_ptr + tok[:, None] * (H * BT) + h * BT + r[None, :], mask=rm[:, None], other=0.0)
        gl = tl.load(gl_ptr + ((c0 + ci) * H + h) * K + dk, mask=mk, other=1.0)
        sd = S.to(DT)
        vn = u - tl.dot(w, sd, input_precision=PREC)
        vd = vn.to(DT)
        o = tl.dot(qg, sd, input_precision=PREC) + tl.dot(aqk, vd, input_precision=PREC)
        tl.store(o_ptr + offv, o.to(DT), mask=mv2)
        S = S * gl[:, None] + tl.dot(kgt, vd, input_precision=PREC)
    tl.store(sn_ptr + soff, S, mask=smask)
"""

_STEP = """
@triton.jit
def kda_recurrent_step(q_ptr, k_ptr, v_ptr, f_ptr, b_ptr, a_ptr, dt_ptr, o_ptr, s0_ptr, sn_ptr, slot_ptr,
                       cu_ptr):
    # one program per (sequence, head, V block); token by token, state in registers
    s = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    tok0 = tl.load(cu_ptr + s)
    L = tl.load(cu_ptr + s + 1) - tok0
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    mk = dk < K
    mv = dv < V
    $state_in
    if FUSED:
        dt = tl.load(dt_ptr + h * K + dk, mask=mk, other=0.0).to(tl.float32)
        A = tl.exp(tl.load(a_ptr + h).to(tl.float32))
    for t in range(0, L):
        tok = tok0 + t
        offk = tok * (H * K) + h * K + dk
        q = tl.load(q_ptr + offk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + tok * (H * V) + h * V + dv, mask=mv, other=0.0).to(tl.float32)
        bb = tl.load(b_ptr + tok * H + h).to(tl.float32)
        if FUSED:
            q = q / tl.sqrt(tl.sum(q * q, 0) + EPS)
            k = k / tl.sqrt(tl.sum(k * k, 0) + EPS)
            x = tl.load(f_ptr + offk, mask=mk, other=0.0).to(tl.float32) + dt
            y = tl.exp(tl.minimum(x, 20.0))
            sp = tl.where(x > 20.0, x, tl.where(y < 1e-2, y * (1.0 - y * (0.5 - y * (0.3333333333 - y * 0.25))),
                                                tl.log(1.0 + y)))
            g = -A * sp
            bb = tl.sigmoid(bb)
        else:
            g = tl.load(f_ptr + offk, mask=mk, other=0.0).to(tl.float32)
        S = S * tl.exp(g)[:, None]
        err = v - tl.sum(k[:, None] * S, 0)
        S = S + k[:, None] * (bb * err)[None, :]
        o = tl.sum((q * SCALE)[:, None] * S, 0)
        tl.store(o_ptr + tok * (H * V) + h * V + dv, o.to(DT), mask=mv)
    tl.store(sn_ptr + soff, S, mask=smask)
"""


def _solve_source(NC: int, BC: int) -> str:
    """Block lower-triangular inverse: T_II = (I + N)^-1 of the strictly lower diagonal block N as
    log2(BC) factors (I - N)(I + N^2)(I + N^4).. (exact fp32 products: N^BC = 0, no serial loop),
    T_IJ = -T_II sum_{J<=K<I} A_IK T_KJ; then row block J of this program's column block,
    sum_I T_JI beta_I X_I with X = k G (W columns) or v (U columns): the unused load is masked off."""
    L = ["eye = tl.where(cc[:, None] == cc[None, :], 1.0, 0.0)"]
    for J in range(NC):
        L += [f"rJ = start + {J} * BC + cc",
              f"mJ = {J} * BC + cc < n",
              f"N = tl.load(akk_ptr + rJ[:, None] * (H * BT) + h * BT + {J} * BC + cc[None, :], "
              "mask=mJ[:, None], other=0.0)",
              f"T{J}_{J} = eye - N"]
        for _ in range(1, BC.bit_length() - 1):   # (I+N)^-1 = (I-N)(I+N^2)(I+N^4).. (N^BC = 0)
            L += ["N = tl.dot(N, N, input_precision='ieee')",
                  f"T{J}_{J} = tl.dot(T{J}_{J}, eye + N, input_precision='ieee')"]
        for K_ in range(J):
            L.append(f"A{J}_{K_} = tl.load(akk_ptr + rJ[:, None] * (H * BT) + h * BT + {K_} * BC + cc[None, :], "
                     f"mask=mJ[:, None], other=0.0)")
        for I in range(J - 1, -1, -1):        # T_JI for I < J, from the nearest block outwards
            terms = " + ".join(f"tl.dot(A{J}_{K_}, T{K_}_{I}, input_precision=PREC)" for K_ in range(I, J))
            L.append(f"T{J}_{I} = -tl.dot(T{J}_{J}, {terms}, input_precision=PREC)")
        L += ["acc = tl.zeros((BC, BW), tl.float32)"]
        for I in range(J + 1):
            L += [f"rI = start + {I} * BC + cc",
                  f"mI = {I} * BC + cc < n",
                  "oI = rI[:, None] * (H * K) + h * K + col[None, :]",
                  "mW = mI[:, None] & mw[None, :]",
                  "xI = tl.load(kn_ptr + oI, mask=mW, other=0.0).to(tl.float32) * "
                  "tl.exp(tl.load(gc_ptr + oI, mask=mW, other=0.0))",
                  "xI += tl.load(v_ptr + rI[:, None] * (H * V) + h * V + col[None, :], "
                  "mask=mI[:, None] & mu[None, :], other=0.0).to(tl.float32)",
                  "xI = xI * tl.load(beta_ptr + rI * H + h, mask=mI, other=0.0)[:, None]",
                  f"acc += tl.dot(T{J}_{I}, xI, input_precision=PREC)"]
        L += ["tl.store(w_ptr + rJ[:, None] * (H * K) + h * K + col[None, :], acc.to(DT), "
              "mask=mJ[:, None] & mw[None, :])",
              "tl.store(u_ptr + rJ[:, None] * (H * V) + h * V + col[None, :], acc.to(DT), "
              "mask=mJ[:, None] & mu[None, :])"]
    return "\n".join(L)


def _sig(names, dtype, fp32=()):
    """AOT argument types: pointers of the activation dtype, fp32 for the names in `fp32`."""
    return {n: ("*fp32" if n in fp32 else PTR_TYPES[dtype]) for n in names}


def _consts(H, K, V, dtype, fused, scale, eps, **extra):
    return {"H": H, "K": K, "V": V, "BK": max(16, next_pow2(K)), "FUSED": bool(fused),
            "SCALE": float(scale), "EPS": float(eps), "DT": TL_DTYPES[dtype], **extra}


CHUNK_SIZES = (16, 32, 64, 128)    # chunk lengths the kernels run: powers of two, whole sub-chunks


def check_chunk_size(chunk: int) -> None:
    if chunk not in CHUNK_SIZES:
        raise ValueError(f"the triton KDA kernels run chunks of {', '.join(map(str, CHUNK_SIZES))} tokens, "
                         f"not {chunk} (chunk-kda{{chunk-size=N}})")


@functools.lru_cache(maxsize=None)
def chunk_specs(H, K, V, dtype, fused, scale, eps, has_state, target=None, chunk=None) -> list[KernelSpec]:
    """The four chunk-prefill kernels (prep, intra, solve, scan) for one head geometry and dtype;
    chunks of `chunk` tokens (the op's chunk size), else the target's tile."""
    cfg = config("kda_chunk", target)
    if chunk:
        check_chunk_size(chunk)
    BT, BC, BV = chunk or cfg["BT"], cfg["BC"], min(cfg["BV"], max(16, next_pow2(V)))
    BW = min(cfg["BW"], max(16, next_pow2(max(K, V))))
    consts = _consts(H, K, V, dtype, fused, scale, eps, BT=BT, BC=BC, NC=BT // BC,
                     BV=BV, BW=BW, NKW=_cdiv(K, BW), HAS_STATE=bool(has_state), PREC=dot_precision(dtype))
    gate_f32 = () if fused else ("f_ptr", "b_ptr")        # unfused: g and beta come in fp32
    f32 = ("gc_ptr", "beta_ptr", "akk_ptr", "gl_ptr", "a_ptr", "dt_ptr", "s0_ptr", "sn_ptr") + gate_f32
    i32 = ("chunk_start", "chunk_len", "cu_ptr", "chunk0_ptr")

    def spec(name, template, args, warps, stages=1, **blocks):
        sig = {a: ("*i32" if a in i32 else "*fp32" if a in f32 else "*i64" if a == "slot_ptr"
                   else PTR_TYPES[dtype]) for a in args}
        return KernelSpec(name, name, render(name, template, consts, **blocks), sig, warps, stages, consts)

    return [spec("kda_chunk_prep", _PREP, ["q_ptr", "k_ptr", "f_ptr", "b_ptr", "a_ptr", "dt_ptr", "chunk_start",
                                           "chunk_len", "qn_ptr", "kn_ptr", "gc_ptr", "beta_ptr", "qg_ptr",
                                           "kg_ptr", "gl_ptr"], cfg["prep_warps"], gate=_GATE),
            spec("kda_chunk_intra", _INTRA, ["qn_ptr", "kn_ptr", "gc_ptr", "beta_ptr", "chunk_start",
                                             "chunk_len", "aqk_ptr", "akk_ptr"], cfg["intra_warps"]),
            spec("kda_chunk_solve", _SOLVE, ["kn_ptr", "v_ptr", "gc_ptr", "beta_ptr", "akk_ptr", "chunk_start",
                                             "chunk_len", "w_ptr", "u_ptr"], cfg["solve_warps"],
                 solve=_solve_source(BT // BC, BC)),
            spec("kda_chunk_scan", _SCAN, ["qg_ptr", "kg_ptr", "w_ptr", "u_ptr", "aqk_ptr", "gl_ptr", "o_ptr",
                                           "s0_ptr", "sn_ptr", "slot_ptr", "cu_ptr", "chunk0_ptr"], cfg["num_warps"],
                 cfg["num_stages"], state_in=_STATE_IN)]


@functools.lru_cache(maxsize=None)
def step_spec(H, K, V, dtype, fused, scale, eps, has_state, target=None) -> KernelSpec:
    cfg = config("kda_recurrent", target)
    BV = min(cfg["BV"], max(16, next_pow2(V)))
    consts = _consts(H, K, V, dtype, fused, scale, eps, BV=BV, HAS_STATE=bool(has_state))
    names = ["q_ptr", "k_ptr", "v_ptr", "f_ptr", "b_ptr", "a_ptr", "dt_ptr", "o_ptr", "s0_ptr", "sn_ptr",
             "slot_ptr", "cu_ptr"]
    sig = _sig(names, dtype, ("a_ptr", "dt_ptr", "s0_ptr", "sn_ptr") + (() if fused else ("f_ptr", "b_ptr")))
    sig["cu_ptr"], sig["slot_ptr"] = "*i32", "*i64"
    src = render("kda_recurrent_step", _STEP, consts, state_in=_STATE_IN)
    return KernelSpec("kda_recurrent_step", "kda_recurrent_step", src, sig, cfg["num_warps"], cfg["num_stages"],
                      consts)


# -- launchers ---------------------------------------------------------------------------

def _ir_dtype(t: torch.Tensor) -> str:
    try:
        return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[t.dtype]
    except KeyError:
        raise TypeError(f"triton KDA kernels take f32/bf16/f16 tensors, got {t.dtype}") from None


def _packed(q, k, v, f, b, cu_seqlens):
    """Flatten [B,T,H,*] to packed tokens; uniform cu_seqlens when none is given."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [B,T,H,*]")
    B, T, H, K = q.shape
    if cu_seqlens is None:
        cu_seqlens = _uniform_offsets(B, T, q.device)
    else:
        if B != 1:
            raise ValueError("packed sequences (cu_seqlens) need B == 1")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if cu_seqlens[0] != 0 or cu_seqlens[-1] != T or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu_seqlens.tolist()}")
    flat = [t.reshape(B * T, *t.shape[2:]).contiguous() for t in (q, k, v, f, b)]
    return flat, cu_seqlens, H, K, v.shape[-1]


_OFFSETS: dict = {}


def _uniform_offsets(B: int, T: int, device) -> torch.Tensor:
    """cu_seqlens of B sequences of T tokens; kept (read only) for decode steps (T = 1), so a
    step launches no kernel to make them."""
    if T != 1:
        return torch.arange(0, (B + 1) * T, T, device=device, dtype=torch.int32)
    key = (B, str(device))
    if key not in _OFFSETS:
        _OFFSETS[key] = torch.arange(0, B + 1, device=device, dtype=torch.int32)
    return _OFFSETS[key]


def _gate_params(A_log, dt_bias, H, K, device):
    if A_log is None:   # unfused: no gating parameters
        z = torch.zeros(1, device=device, dtype=torch.float32)
        return z, z
    if A_log.numel() != H or dt_bias.numel() != H * K:
        raise ValueError(f"A_log {tuple(A_log.shape)} / dt_bias {tuple(dt_bias.shape)} do not fit {H}x{K}")
    return A_log.reshape(H).float().contiguous(), dt_bias.reshape(H * K).float().contiguous()


def _inputs(q, k, v, f, b, A_log, dt_bias, cu_seqlens, fused):
    """Packed token tensors (g, beta in fp32 when unfused), offsets, dims and gate parameters."""
    (q2, k2, v2, f2, b2), cu, H, K, V = _packed(q, k, v, f, b, cu_seqlens)
    if not fused:
        f2, b2 = f2.float(), b2.float()
    a, dt = _gate_params(A_log if fused else None, dt_bias, H, K, q.device)
    return (q2, k2, v2, f2, b2), cu, H, K, V, a, dt


def _states(state, N, H, K, V, device):
    """(initial state storage, new state storage, slot index, the op's state result): an
    in-place view (SlotRows) is read and written where it lives and returned as the result."""
    if state is not None and (tuple(state.shape) != (N, H, K, V) or state.dtype != torch.float32):
        raise ValueError(f"state must be fp32 [{N},{H},{K},{V}], got {state.dtype} {tuple(state.shape)}")
    if isinstance(state, SlotRows):
        if not state.storage.is_contiguous():
            raise ValueError("an in-place KDA state needs contiguous storage")
        return state.storage, state.storage, state.slots, state
    s0 = torch.zeros(1, device=device, dtype=torch.float32) if state is None else state.contiguous()
    sn = torch.empty(N, H, K, V, device=device, dtype=torch.float32)
    return s0, sn, torch.arange(N, device=device), sn


def kda_chunk(q, k, v, f, b, A_log, dt_bias, scale, *, eps=1e-6, state=None, cu_seqlens=None,
              fused=True, chunk=None):
    """Chunkwise KDA prefill. fused: f, b are the raw f_b / b_proj outputs; else f is g (log decay
    [B,T,H,K]) and b is beta [B,T,H], with q, k already normalised. -> (o [B,T,H,V], state [N,H,K,V])."""
    dtype, dev = _ir_dtype(q), q.device
    (q2, k2, v2, f2, b2), cu, H, K, V, a, dt = _inputs(q, k, v, f, b, A_log, dt_bias, cu_seqlens, fused)
    N = cu.numel() - 1
    prep, intra, solve, scan = chunk_specs(H, K, V, dtype, fused, scale, eps, state is not None,
                                           current_target(), chunk)
    BT = prep.config["BT"]
    lens = (cu[1:] - cu[:-1]).long()
    nch = (lens + BT - 1) // BT
    chunk0 = torch.zeros(N, dtype=torch.int32, device=dev)
    chunk0[1:] = torch.cumsum(nch, 0)[:-1].to(torch.int32)
    seq = torch.repeat_interleave(torch.arange(N, device=dev), nch)
    idx = torch.arange(seq.numel(), device=dev) - chunk0.long()[seq]
    cstart = (cu.long()[seq] + idx * BT).to(torch.int32)
    clen = torch.minimum(lens[seq] - idx * BT, torch.full_like(idx, BT)).to(torch.int32)
    NT, NCH = q2.shape[0], int(seq.numel())
    e = dict(device=dev, dtype=q.dtype)
    qn, kn, qg, kg, w = (torch.empty(NT, H, K, **e) for _ in range(5))
    u = torch.empty(NT, H, V, **e)
    gc = torch.empty(NT, H, K, device=dev, dtype=torch.float32)
    beta = torch.empty(NT, H, device=dev, dtype=torch.float32)
    aqk = torch.empty(NT, H, BT, **e)
    akk = torch.empty(NT, H, BT, device=dev, dtype=torch.float32)
    gl = torch.empty(max(NCH, 1), H, K, device=dev, dtype=torch.float32)
    o = torch.empty(NT, H, V, **e)
    s0, sn, slot, result = _states(state, N, H, K, V, dev)
    if NCH:
        c = prep.config
        launch(prep, (NCH, H), q2, k2, f2, b2, a, dt, cstart, clen, qn, kn, gc, beta, qg, kg, gl)
        launch(intra, (NCH, H), qn, kn, gc, beta, cstart, clen, aqk, akk)
        launch(solve, (NCH, H, c["NKW"] + _cdiv(V, c["BW"])), kn, v2, gc, beta, akk, cstart, clen, w, u)
    launch(scan, (N, H, _cdiv(V, scan.config["BV"])), qg, kg, w, u, aqk, gl, o, s0, sn, slot, cu, chunk0)
    return o.view(q.shape[0], q.shape[1], H, V), result


def kda_step(q, k, v, f, b, A_log, dt_bias, scale, *, eps=1e-6, state=None, cu_seqlens=None,
             fused=True, inplace=False):
    """Token-by-token KDA (decode). `inplace`: the new state is written into `state` (a
    `SlotRows` view always is)."""
    dtype, dev = _ir_dtype(q), q.device
    (q2, k2, v2, f2, b2), cu, H, K, V, a, dt = _inputs(q, k, v, f, b, A_log, dt_bias, cu_seqlens, fused)
    N = cu.numel() - 1
    spec = step_spec(H, K, V, dtype, fused, scale, eps, state is not None, current_target())
    s0, sn, slot, result = _states(state, N, H, K, V, dev)
    if inplace and not isinstance(state, SlotRows):
        if state is None or not state.is_contiguous():
            raise ValueError("inplace needs a contiguous fp32 state")
        sn = result = s0
    o = torch.empty(q2.shape[0], H, V, device=dev, dtype=q.dtype)
    launch(spec, (N, H, _cdiv(V, spec.config["BV"])), q2, k2, v2, f2, b2, a, dt, o, s0, sn, slot, cu)
    return o.view(q.shape[0], q.shape[1], H, V), result


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- op implementations (kind -> fn(args, attrs) -> results) ----------------------------

def _run(T: int, attrs: dict):
    """The step kernel for one token, else the chunk launcher in the op's chunk size (the
    target's tile where the op leaves the choice: chunk_size 0 or none)."""
    if T == 1:
        return kda_step
    return functools.partial(kda_chunk, chunk=attrs.get("chunk_size") or None)


def op_kda_fused(args, attrs):
    q, k, v, f, b, A, dt = args[:7]
    st = args[7] if len(args) > 7 else None
    B, T, H, K = q.shape
    return list(_run(T, attrs)(q, k, v, f.view(B, T, H, K), b, A, dt, attrs["scale"], eps=attrs["l2norm_eps"],
                               state=st))


def op_kda_recurrent(args, attrs):
    q, k, v, g, beta = args[:5]
    st = args[5] if len(args) > 5 else None
    return list(_run(q.shape[1], attrs)(q, k, v, g, beta, None, None, attrs["scale"], state=st, fused=False))


def specs_for(kind, ins, outs, attrs, target):
    """The kernels one KDA op needs (for AOT): the step kernel, plus the four chunk kernels
    (prep, intra, solve, scan) when T != 1."""
    q, v = ins[0], ins[2]
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    fused = kind != "kda_recurrent"
    has_state = len(ins) > (7 if fused else 5)
    eps = attrs.get("l2norm_eps", 1e-6)
    out = [step_spec(H, K, V, q.dtype, fused, attrs["scale"], eps, has_state, target)]
    if q.shape[1] != 1:
        out += chunk_specs(H, K, V, q.dtype, fused, attrs["scale"], eps, has_state, target,
                           attrs.get("chunk_size") or None)
    return out
