"""KDA: the delta rule as one semantic op (kda_recurrent: token-by-token recurrence, or the
chunkwise WY/UT form, fp32 state), and the fused ops the passes make of it with its gating.
The chunkwise form is written once, `chunk_form`, against an array namespace: torch here, ONNX
values for the portable export; the Triton kernels compute the same quantities.

kda_fused_recurrent / kda_fused_chunk (q, k, v, f, b, A_log, dt_bias, state?)
  q, k [B,T,H,K] after conv+SiLU, *not* normalised; v [B,T,H,V]; f [B,T,H*K] the raw f_b
  output; b [B,T,H] the raw b_proj output; A_log [1,1,H,1]; dt_bias [H*K]. Inside:
  g = -exp(A_log) * softplus(f + dt_bias) (fp32), beta = sigmoid(b), q, k L2-normalised (eps
  `l2norm_eps`), then the delta rule -> (o [B,T,H,V], state). `_chunk` is the chunkwise form
  for prefill in chunks of `chunk_size`, same results.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dtypes import IR_DTYPES, acc_dtype, acc_torch
from .decompose import Eager, cast_to
from .norm import l2_normalize
from .registry import REQUIRED, OpDef, dim, expect, expect_float, register


def kda_recurrence(q, k, v, g, beta, state, scale):
    """q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state [B, H, K, V] or None.
    Per token: S = S*exp(g)[:, None]; S += k (beta (v - k^T S))^T; o = (scale q)^T S."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    acc = acc_torch(v.dtype)
    S = torch.zeros(B, H, K, V, dtype=acc, device=v.device) if state is None else state.to(acc).clone()
    q, k, v, g, beta = (t.to(acc) for t in (q, k, v, g, beta))
    out = torch.empty(B, T, H, V, dtype=acc, device=v.device)
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)
        kt = k[:, t]
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + torch.einsum("bhk,bhv->bhkv", kt, beta[:, t].unsqueeze(-1) * err)
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
    return out, S


@register
class KDARecurrent(OpDef):
    kind = "kda_recurrent"
    doc = ("gated delta rule per head with per-channel log decay g; state [B, H, K, V] in fp32; "
           "chunk_size > 0: computed in the chunkwise form (same results), 0: the target's choice")
    family = "kda"
    results = ("o", "state")
    operands = ("q", "k", "v", "g", "beta", "state?")
    attributes = {"scale": REQUIRED(float), "chunk_size": 0}

    def infer(self, types, attrs):
        q, k, v, g, beta = types[:5]
        expect_float(self.kind, q, k, v, g, beta)
        expect(q.rank == 4 and q.shape == k.shape == g.shape, self.kind,
               f"q {q}, k {k}, g {g} must be equal [B, T, H, K]")
        expect(v.rank == 4 and v.shape[:3] == q.shape[:3], self.kind, f"v {v} must be [B, T, H, V]")
        expect(beta.shape == q.shape[:3], self.kind, f"beta {beta} must be [B, T, H]")
        B, _, H, K = q.shape
        state = v.with_shape((B, H, K, v.shape[3])).with_dtype(acc_dtype(v.dtype))
        if len(types) > 5:
            expect(types[5] == state, self.kind, f"state must be {state}, got {types[5]}")
        return [v, state]

    def ref(self, args, attrs):
        q, k, v, g, beta = args[:5]
        state, n = args[5] if len(args) > 5 else None, attrs.get("chunk_size", 0)
        o, S = (kda_chunkwise(q, k, v, g, beta, state, attrs["scale"], n) if n
                else kda_recurrence(q, k, v, g, beta, state, attrs["scale"]))
        return [o.to(v.dtype), S]

    def flops(self, ins, outs, attrs, dims):
        B, T, H, K = (d if isinstance(d, int) else dims[d] for d in ins[0].shape)
        return 7.0 * B * T * H * K * outs[0].shape[3]


def kda_chunkwise(q, k, v, g, beta, state, scale, chunk_size):
    """The chunkwise form of `kda_recurrence` (chunk_form on torch tensors): same inputs, same
    results up to fp rounding; any T (the last chunk may be shorter)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"kda_chunkwise: chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, K = k.shape
    acc = acc_torch(v.dtype)
    S = torch.zeros(B, H, K, v.shape[-1], dtype=acc, device=v.device) if state is None else state.to(acc).clone()
    o, S = chunk_form(TorchArrays(acc, min(T, chunk_size)), q, k, v, g, beta, S, scale, chunk_size)
    return o, S


SUB = 16    # rows of the diagonal blocks the inverse works in (the Triton kernels' sub-chunk)


def chunk_form(x, q, k, v, g, beta, state, scale, chunk):
    """KDA in its chunkwise WY/UT form, written once against an array namespace `x` (torch
    here: TorchArrays; the portable ONNX body: lowering/onnx/functions.OnnxArrays); the Triton
    kernels (lowering/triton/kda.py) compute the same quantities. Heads first, tokens in chunks
    of C = min(T, chunk) (the last padded with zeros, which leave the state alone); per chunk,
    with G the cumulative log decay (ratios exp of differences, masked before the exp):
      A = strict_lower(beta_r k_r.k_i e^(G_r-G_i)),  A_qk = scale lower(q_r.k_i e^(G_r-G_i)),
      T = (I + A)^-1 by SUB-row blocks (unit_lower_inverse),
      W = T (beta k e^G),  U = T (beta v),  qG = scale q e^G,  kG = k e^(G_C-G),  gC = e^(G_C);
    then a scan over chunks carries the state: V' = U - W S; O = qG S + A_qk V';
    S = gC S + kG^T V'. -> (o [B,T,H,V] like v, state [B,H,K,V])."""
    qc, kc, vc, gc, bc = (x.chunks(t) for t in (q, k, v, g, x.unsqueeze(beta, -1)))   # [B,H,n,C,*]
    G = x.cumsum(gc)
    diff = x.sub(x.unsqueeze(G, 4), x.unsqueeze(G, 3))                    # [B,H,n,r,i,K]
    k_i = x.unsqueeze(kc, 3)
    A = x.mul(x.sum_last(x.mul(x.mul(x.unsqueeze(kc, 4), k_i), x.exp(x.lower(diff, strict=True)))), bc)
    Aqk = x.scale(x.sum_last(x.mul(x.mul(x.unsqueeze(qc, 4), k_i), x.exp(x.lower(diff, strict=False)))), scale)
    Tinv = unit_lower_inverse(x, A, chunk)
    eG = x.exp(G)
    W = lower_apply(x, Tinv, x.mul(bc, x.mul(kc, eG)))
    U = lower_apply(x, Tinv, x.mul(bc, vc))
    last = x.last(G)                                                      # [B,H,n,1,K]
    o, S = x.scan(_scan_step, state, (x.scale(x.mul(qc, eG), scale), x.mul(kc, x.exp(x.sub(last, G))),
                                      W, U, Aqk, x.exp(last)))
    return x.unchunk(o, v), S


def _scan_step(y, S, qG, kG, W, U, Aqk, gC):
    """One chunk of the scan: (o, new state) from the state S [B,H,K,V]."""
    u = y.sub(U, y.matmul(W, S))
    o = y.add(y.matmul(qG, S), y.matmul(Aqk, u))
    return o, y.add(y.mul(y.transpose(gC), S), y.matmul(y.transpose(kG), u))


def unit_lower_inverse(x, A, chunk):
    """T = (I + A)^-1 of strictly lower A [.., C, C] as blocks {(J, I): T_JI} of SUB rows: the
    diagonal block (I + N)^-1 = (I - N)(I + N^2)(I + N^4).. (exact: N^SUB = 0, no serial
    loop), T_JI = -T_JJ sum_{I<=M<J} A_JM T_MI."""
    nb, T = -(-chunk // SUB), {}
    n = min(chunk, SUB)
    for J in range(nb):
        N = x.block(A, J, J, SUB)
        eye = x.eye_like(N)
        T[J, J] = x.sub(eye, N)
        for _ in range(max(n - 1, 1).bit_length() - 1):
            N = x.matmul(N, N)
            T[J, J] = x.matmul(T[J, J], x.add(eye, N))
        for I in range(J - 1, -1, -1):       # from the nearest block outwards
            acc = x.matmul(x.block(A, J, I, SUB), T[I, I])
            for M in range(I + 1, J):
                acc = x.add(acc, x.matmul(x.block(A, J, M, SUB), T[M, I]))
            T[J, I] = x.neg(x.matmul(T[J, J], acc))
    return T


def lower_apply(x, T, X):
    """T X for block lower T (unit_lower_inverse) and X [.., C, *], row block by row block."""
    nb = max(J for J, _ in T) + 1
    rows = []
    for J in range(nb):
        acc = x.matmul(T[J, 0], x.block_rows(X, 0, SUB))
        for I in range(1, J + 1):
            acc = x.add(acc, x.matmul(T[J, I], x.block_rows(X, I, SUB)))
        rows.append(acc)
    return rows[0] if nb == 1 else x.concat_rows(rows)


class TorchArrays:
    """chunk_form's array namespace on torch tensors, in `acc` precision, chunks of C tokens."""

    def __init__(self, acc, C):
        self.acc, self.C = acc, max(C, 1)

    def chunks(self, t):
        """[B,T,H,D] -> [B,H,n,C,D], zero-padded."""
        t = t.to(self.acc)
        B, T, H, D = t.shape
        n = -(-T // self.C)
        t = F.pad(t, (0, 0, 0, 0, 0, n * self.C - T))
        return t.view(B, n, self.C, H, D).permute(0, 3, 1, 2, 4)

    def unchunk(self, o, v):
        B, H, n, C, V = o.shape
        return o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :v.shape[1]]

    def lower(self, d, strict):
        r = torch.arange(d.shape[3], device=d.device)
        keep = (r[:, None] > r[None, :]) if strict else (r[:, None] >= r[None, :])
        return torch.where(keep[..., None], d, d.new_tensor(float("-inf")))

    def scan(self, step, S, per_chunk):
        n = per_chunk[0].shape[2]
        outs = []
        for c in range(n):
            o, S = step(self, S, *(t[:, :, c] for t in per_chunk))
            outs.append(o)
        empty = per_chunk[3][:, :, :0]
        return (torch.stack(outs, 2) if outs else empty), S

    cumsum = staticmethod(lambda t: t.cumsum(3))
    exp = staticmethod(torch.exp)
    neg = staticmethod(torch.neg)
    add = staticmethod(torch.add)
    sub = staticmethod(torch.sub)
    mul = staticmethod(torch.mul)
    matmul = staticmethod(torch.matmul)
    unsqueeze = staticmethod(torch.unsqueeze)
    sum_last = staticmethod(lambda t: t.sum(-1))
    scale = staticmethod(lambda t, s: t * s)
    transpose = staticmethod(lambda t: t.transpose(-1, -2))
    last = staticmethod(lambda G: G[..., -1:, :])
    block = staticmethod(lambda A, J, I, n: A[..., J * n:(J + 1) * n, I * n:(I + 1) * n])
    block_rows = staticmethod(lambda X, I, n: X[..., I * n:(I + 1) * n, :])
    concat_rows = staticmethod(lambda rows: torch.cat(rows, -2))
    eye_like = staticmethod(lambda N: torch.eye(N.shape[-1], dtype=N.dtype, device=N.device))


def kda_gate(f, A_log, dt_bias, acc):
    """g = -exp(A_log) * softplus(f + dt_bias) in torch dtype `acc`, shaped [B,T,H,K]: decay_gate
    run eagerly."""
    B, T, C = f.shape
    H = A_log.shape[2]
    return decay_gate(Eager(), f, A_log, dt_bias, (B, T, H, C // H), IR_DTYPES[acc])


def decay_gate(b, f, A_log, dt_bias, shape, acc: str):
    """The decay g = -exp(A_log) * softplus(f + dt_bias) in `acc`, reshaped to `shape`
    [B,T,H,K], through builder `b`: the model declares it so, and KDA's decomposition."""
    f = b("add", b("cast", f, dtype=acc), cast_to(b, dt_bias, acc), name="f")
    f = b("reshape", b("softplus", f, name="f"), shape=list(shape), name="f")
    a = b("neg", b("exp", cast_to(b, A_log, acc), name="A"), name="A")
    return b("mul", f, a, name="decay")

class _KDAFused(OpDef):
    fused = True
    operands = ("q", "k", "v", "f", "b", "A_log", "dt_bias", "state?")
    results = ("o", "state")
    family = "kda"
    attributes = {"scale": REQUIRED(float), "l2norm_eps": 1e-6}

    def infer(self, types, attrs):
        q, k, v, f, b, A, dt = types[:7]
        expect_float(self.kind, *types[:7])
        expect(q.rank == 4 and q.shape == k.shape, self.kind, f"q {q} and k {k} must be [B,T,H,K]")
        B, T, H, K = q.shape
        expect(v.rank == 4 and v.shape[:3] == (B, T, H), self.kind, f"v {v} must be [B,T,H,V]")
        expect(f.shape == (B, T, H * K), self.kind, f"f {f} must be [B,T,{H * K}]")
        expect(b.shape == (B, T, H), self.kind, f"b {b} must be [B,T,{H}]")
        expect(A.shape == (1, 1, H, 1) and dt.shape == (H * K,), self.kind,
               f"A_log {A} / dt_bias {dt} do not fit {H} heads of {K}")
        state = v.with_shape((B, H, K, v.shape[3])).with_dtype(acc_dtype(v.dtype))
        if len(types) > 7:
            expect(types[7] == state, self.kind, f"state must be {state}, got {types[7]}")
        return [v, state]

    def decompose(self, b, ins, attrs):
        """l2norm(q), l2norm(k), the decay gate, sigmoid(b), then kda_recurrent."""
        q, k, v, f, beta_in, A, dt = ins[:7]
        acc = acc_dtype(b.type(v).dtype)
        eps = attrs["l2norm_eps"]
        g = decay_gate(b, f, A, dt, b.type(q).shape, acc)
        beta = b("sigmoid", b("cast", beta_in, dtype=acc), name="beta")
        return b.emit("kda_recurrent", b("l2norm", q, eps=eps, name="q"), b("l2norm", k, eps=eps, name="k"),
                      v, g, beta, ins[7] if len(ins) > 7 else None, scale=attrs["scale"],
                      chunk_size=attrs.get("chunk_size", 0), name="kda")

    def prepare(self, args, attrs):
        q, k, v, f, b, A, dt = args[:7]
        acc = acc_torch(v.dtype)
        g = kda_gate(f, A, dt, acc)
        beta = torch.sigmoid(b.to(acc))
        eps = attrs["l2norm_eps"]
        return l2_normalize(q, eps), l2_normalize(k, eps), v, g, beta, (args[7] if len(args) > 7 else None)

    def flops(self, ins, outs, attrs, dims):
        B, T, H, K = (dim(d, dims) for d in ins[0].shape)
        return 7.0 * B * T * H * K * dim(ins[2].shape[3], dims) + 12.0 * B * T * H * K


@register
class KDAFusedRecurrent(_KDAFused):
    kind = "kda_fused_recurrent"
    doc = "KDA with decay gate, beta sigmoid and q/k L2 norm fused; token-by-token recurrence"

    def ref(self, args, attrs):
        q, k, v, g, beta, s0 = self.prepare(args, attrs)
        o, S = kda_recurrence(q, k, v, g, beta, s0, attrs["scale"])
        return [o.to(v.dtype), S]


@register
class KDAFusedChunk(_KDAFused):
    kind = "kda_fused_chunk"
    doc = "KDA with fused gating in the chunkwise (WY/UT) form for prefill"
    attributes = {"scale": REQUIRED(float), "l2norm_eps": 1e-6, "chunk_size": 64}

    def ref(self, args, attrs):
        q, k, v, g, beta, s0 = self.prepare(args, attrs)
        o, S = kda_chunkwise(q, k, v, g, beta, s0, attrs["scale"], attrs["chunk_size"])
        return [o.to(v.dtype), S]
