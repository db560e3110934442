"""The KDA chunk-prefill kernels as they were before the fused intra kernel (commit b4e6c50,
lowering/triton/kda.py), kept only so bench/kda_chunk.py can time old against new in one run:
four kernels (prep; intra: A_kk, A_qk with exact diagonal blocks by BC unrolled columns over the
whole of K; solve: (I + A_kk)^-1 recomputed by each of its column-block programs, reloading k and
the decay; scan) and chunk tables built on the host with a device sync. The prep and scan
kernels are today's (the prep less its beta k G output)."""
from __future__ import annotations

import functools

import torch

from kimi_graph.lowering.triton import kda
from kimi_graph.lowering.triton.codegen import PTR_TYPES, KernelSpec, dot_precision, launch, next_pow2, render
from kimi_graph.lowering.triton.targets import config, current_target

BEFORE = {"BW": 128, "solve_warps": 4, "intra_warps": 4}     # the previous tiles

_PREP = "\n".join(line for line in kda._PREP.replace("qg_ptr, bkg_ptr, kg_ptr", "qg_ptr, kg_ptr").splitlines()
                  if "bkg_ptr +" not in line)

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



@functools.lru_cache(maxsize=None)
def chunk_specs(H, K, V, dtype, fused, scale, eps, has_state, target=None) -> list[KernelSpec]:
    cfg = {**config("kda_chunk", target), **BEFORE}
    BT, BC, BV = cfg["BT"], cfg["BC"], min(cfg["BV"], max(16, next_pow2(V)))
    BW = min(cfg["BW"], max(16, next_pow2(max(K, V))))
    consts = kda._consts(H, K, V, dtype, fused, scale, eps, BT=BT, BC=BC, PR=BC, NC=BT // BC, BV=BV, BW=BW,
                         NKW=kda._cdiv(K, BW), KS=max(16, next_pow2(K)), SEG=0, HAS_STATE=bool(has_state), PREC=dot_precision(dtype),
                         FTZ_EXP=False)
    f32 = ("gc_ptr", "beta_ptr", "akk_ptr", "gl_ptr", "a_ptr", "dt_ptr", "s0_ptr", "sn_ptr") + \
        (() if fused else ("f_ptr", "b_ptr"))
    i32 = ("chunk_start", "chunk_len", "cu_ptr", "chunk0_ptr")

    def spec(name, template, args, warps, stages=1, **blocks):
        sig = {a: ("*i32" if a in i32 else "*fp32" if a in f32 else "*i64" if a == "slot_ptr"
                   else "i32" if a in ("c_lo", "c_hi") else PTR_TYPES[dtype]) for a in args}
        return KernelSpec(name + "_before", name, render(name, template, consts, **blocks), sig, warps, stages, consts)

    return [spec("kda_chunk_prep", _PREP, ["q_ptr", "k_ptr", "f_ptr", "b_ptr", "a_ptr", "dt_ptr", "chunk_start",
                                           "chunk_len", "qn_ptr", "kn_ptr", "gc_ptr", "beta_ptr", "qg_ptr",
                                           "kg_ptr", "gl_ptr"], cfg["prep_warps"], **kda._PREP_KG["reload"], **kda._PREP_IN["plain"], diag_args="",
                 diag_here=""),
            spec("kda_chunk_intra", _INTRA, ["qn_ptr", "kn_ptr", "gc_ptr", "beta_ptr", "chunk_start",
                                             "chunk_len", "aqk_ptr", "akk_ptr"], cfg["intra_warps"]),
            spec("kda_chunk_solve", _SOLVE, ["kn_ptr", "v_ptr", "gc_ptr", "beta_ptr", "akk_ptr", "chunk_start",
                                             "chunk_len", "w_ptr", "u_ptr"], cfg["solve_warps"],
                 solve=_solve_source(BT // BC, BC)),
            spec("kda_chunk_scan", kda._SCAN, ["qg_ptr", "kg_ptr", "w_ptr", "u_ptr", "aqk_ptr", "gl_ptr", "o_ptr",
                                               "s0_ptr", "sn_ptr", "slot_ptr", "cu_ptr", "chunk0_ptr",
                                               "c_lo", "c_hi"],
                 cfg["num_warps"], cfg["num_stages"], **kda._scan_blocks(1))]


def kda_chunk(q, k, v, f, b, A_log, dt_bias, scale, *, eps=1e-6, state=None, cu_seqlens=None, fused=True):
    """The previous kda.kda_chunk (same arguments and results)."""
    dtype, dev = kda._ir_dtype(q), q.device
    (q2, k2, v2, f2, b2), cu, H, K, V, a, dt = kda._inputs(q, k, v, f, b, A_log, dt_bias, cu_seqlens, fused)
    N = cu.numel() - 1
    prep, intra, solve, scan = chunk_specs(H, K, V, dtype, fused, scale, eps, state is not None, current_target())
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
    s0, sn, slot, result = kda._states(state, N, H, K, V, dev)
    if NCH:
        c = prep.config
        launch(prep, (NCH, H), q2, k2, f2, b2, a, dt, cstart, clen, qn, kn, gc, beta, qg, kg, gl)
        launch(intra, (NCH, H), qn, kn, gc, beta, cstart, clen, aqk, akk)
        launch(solve, (NCH, H, c["NKW"] + kda._cdiv(V, c["BW"])), kn, v2, gc, beta, akk, cstart, clen, w, u)
    launch(scan, (N, H, kda._cdiv(V, scan.config["BV"])), qg, kg, w, u, aqk, gl, o, s0, sn, slot, cu, chunk0,
           0, 2 ** 31 - 1)
    return o.view(q.shape[0], q.shape[1], H, V), result
