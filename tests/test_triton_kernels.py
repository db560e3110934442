"""Every generated Triton kernel against its op's reference, through the Triton interpreter
(TRITON_INTERPRET=1, fp32, small shapes with ragged lengths and sizes that are not multiples
of the blocks). KDA, attention and conv are also checked against fp64 loops written here,
apart from the op library. Tolerance: fp32 kernels vs references, rel. error <= 1e-5."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from kimi_graph.lowering.triton import codegen, conv, elementwise, kda, mla, moe, moe_permute, norm  # noqa: E402
from kimi_graph.ops import get_op
from kimi_graph.runtime.views import PagedRows  # noqa: E402
from reference_kimi import rel_err as rel  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _seeded(triton_interpret):
    torch.manual_seed(0)


# -- independent fp64 references ----------------------------------------------------------

def kda_loop(q, k, v, f, b, A_log, dt_bias, s0, scale, eps=1e-6):
    """Kimi Delta Attention token by token in fp64, per (sequence, head)."""
    q, k, v, f, b = (t.double() for t in (q, k, v, f, b))
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(B, H, K, V, dtype=torch.float64) if s0 is None else s0.double().clone()
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    A = A_log.double().reshape(H)
    dt = dt_bias.double().reshape(H, K)
    for bi in range(B):
        for h in range(H):
            for t in range(T):
                qt = q[bi, t, h] / math.sqrt((q[bi, t, h] ** 2).sum() + eps)
                kt = k[bi, t, h] / math.sqrt((k[bi, t, h] ** 2).sum() + eps)
                g = -math.exp(A[h]) * torch.log1p(torch.exp(f[bi, t, h] + dt[h]))
                beta = 1 / (1 + math.exp(-b[bi, t, h]))
                Sb = S[bi, h] * torch.exp(g)[:, None]
                Sb = Sb + beta * torch.outer(kt, v[bi, t, h] - kt @ Sb)
                o[bi, t, h] = (scale * qt) @ Sb
                S[bi, h] = Sb
    return o, S


def attention_loop(q, k, v, q_start, scale):
    B, T, H, _ = q.shape
    S = k.shape[1]
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for bi in range(B):
        for t in range(T):
            pos = (S - T if q_start is None else int(q_start[bi])) + t
            for h in range(H):
                s = (k[bi, : pos + 1, h].double() @ q[bi, t, h].double()) * scale
                o[bi, t, h] = torch.softmax(s, 0) @ v[bi, : pos + 1, h].double()
    return o


def kda_inputs(B, T, H, K, V):
    return (torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V),
            torch.randn(B, T, H, K), torch.randn(B, T, H), torch.log(torch.rand(1, 1, H, 1) * 15 + 1),
            torch.randn(H * K) - 2)


# -- KDA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [kda.kda_chunk, kda.kda_step], ids=["chunk", "step"])
@pytest.mark.parametrize("with_state", [False, True])
def test_kda_fused_matches_fp64_loop(fn, with_state):
    B, T, H, K, V = 2, 37, 2, 16, 24          # T: one full 32-chunk plus a ragged 5; V not a power of 2
    q, k, v, f, b, A, dt = kda_inputs(B, T, H, K, V)
    s0 = torch.randn(B, H, K, V) if with_state else None
    o, s = fn(q, k, v, f, b, A, dt, K ** -0.5, state=s0)
    ro, rs = kda_loop(q, k, v, f, b, A, dt, s0, K ** -0.5)
    assert rel(o, ro) < TOL and rel(s, rs) < TOL


@pytest.mark.parametrize("fn", [kda.kda_chunk, kda.kda_step], ids=["chunk", "step"])
def test_kda_varlen_packed_sequences(fn):
    lens = [33, 1, 20]
    H, K, V = 2, 16, 16
    q, k, v, f, b, A, dt = kda_inputs(1, sum(lens), H, K, V)
    s0 = torch.randn(len(lens), H, K, V)
    cu = torch.tensor([0, 33, 34, 54], dtype=torch.int32)
    o, s = fn(q, k, v, f, b, A, dt, 0.25, state=s0, cu_seqlens=cu)
    for i in range(len(lens)):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        ro, rs = kda_loop(q[:, sl], k[:, sl], v[:, sl], f[:, sl], b[:, sl], A, dt, s0[i:i + 1], 0.25)
        assert rel(o[:, sl], ro) < TOL and rel(s[i:i + 1], rs) < TOL


def test_kda_chunk_k_slices_and_strong_decay():
    """K = 32: the intra products run in two 16-wide slices of K (the interpreter's KH); a decay
    strong enough that a ratio G_i/G_j formed from G alone would overflow fp32."""
    q, k, v, f, b, A, dt = kda_inputs(1, 45, 2, 32, 16)
    f = 4 * f + 6
    s0 = torch.randn(1, 2, 32, 16)
    o, s = kda.kda_chunk(q, k, v, f, b, A, dt, 32 ** -0.5, state=s0)
    ro, rs = kda_loop(q, k, v, f, b, A, dt, s0, 32 ** -0.5)
    assert torch.isfinite(o).all() and rel(o, ro) < 1e-4 and rel(s, rs) < 1e-4



@pytest.mark.parametrize("modes", [{"diag": "token", "wu": "fused", "BH": 2, "diag_unroll": True},
                                   {"diag": "token", "wu": "split", "diag_store": "column", "prep_kg": "prepass",
                                    "bkg_fp32": False},
                                   {"diag": "token", "wu": "fused", "BH": 2, "diag_unroll": True,
                                    "diag_store": "column", "prep_kg": "prepass", "bkg_fp32": False},
                                   {"diag": "block", "wu": "split", "prep_kg": "prepass", "ftz_exp": True},
                                   {"diag": "token", "wu": "fused", "prep_kg": "intra", "BH": 2},
                                   {"diag": "prep", "wu": "fused", "bkg_fp32": False, "ftz_exp": True},
                                   {"diag": "levels", "wu": "split", "prep_rows": 32},
                                   {"diag": "levels", "wu": "fused"},
                                   {"diag": "intra", "wu": "fused", "prep_kg": "inline"},
                                   {"diag": "intra", "wu": "split", "ftz_exp": True, "bkg_fp32": False},
                                   {"diag": "block", "wu": "fused", "diag_form": "rows", "ftz_exp": True,
                                    "scan_many": 4, "warps_many": 2},
                                   {"diag": "intra", "wu": "fused", "diag_form": "rows", "prep_kg": "intra"},
                                   {"diag": "prep", "wu": "split", "diag_form": "rows", "scan_ks": 16}],
                         ids=["token-unrolled-fused-BH2", "token-columns-prepass-split", "token-unrolled-columns-fused",
                              "block-prepass-split", "token-kg-in-intra", "in-prep-fused", "levels-split-prep32", "levels-fused",
                              "intra-fused-inline", "intra-split", "block-rows-scan-many", "intra-rows-kg", "in-prep-rows-scan2"])
def test_kda_chunk_kernel_modes(modes, monkeypatch):
    """Each generated layout of the chunk kernels (diagonal blocks token-parallel, by sub-chunk
    blocks, in the prep kernel or in the intra kernel by levels or by the block kernel's code, W/U
    in their own kernel or in it, the token-parallel columns unrolled or stored one by one, prep a
    whole chunk at a time or summing the decay first or k G_L/G in the same pass or in the intra
    kernel, the diagonal blocks pair by pair or row by row, the scan's state in two K tiles or its
    own tiles for many programs (9 here: 3 sequences x 3 heads), beta k G in the activation dtype,
    exponentials as exp2; the default token loop / split runs in the tests above), on 3 heads (a
    partial head group for BH=2), K in two slices, ragged packed sequences under a strong decay."""
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "kda_chunk",
                        {**TARGETS["interpret"]["configs"]["kda_chunk"], **modes})
    kda.chunk_specs.cache_clear()
    lens, H, K, V = [37, 1, 18], 3, 32, 16
    q, k, v, f, b, A, dt = kda_inputs(1, sum(lens), H, K, V)
    f = 4 * f + 6
    s0 = torch.randn(len(lens), H, K, V)
    cu = torch.tensor([0, 37, 38, 56], dtype=torch.int32)
    try:
        names = [sp.name for sp in kda.chunk_specs(H, K, V, "f32", True, 0.2, 1e-6, True, "interpret")]
        o, s = kda.kda_chunk(q, k, v, f, b, A, dt, 0.2, state=s0, cu_seqlens=cu)
    finally:
        kda.chunk_specs.cache_clear()
    assert ("kda_chunk_diag" in names) == (modes["diag"] == "token")
    assert ("kda_chunk_diag_block" in names) == (modes["diag"] == "block")
    assert ("kda_chunk_wu" in names) == (modes["wu"] == "split")
    assert ("kda_chunk_scan_many" in names) == bool(modes.get("scan_many"))
    for i in range(len(lens)):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        ro, rs = kda_loop(q[:, sl], k[:, sl], v[:, sl], f[:, sl], b[:, sl], A, dt, s0[i:i + 1], 0.2)
        assert rel(o[:, sl], ro) < 1e-4 and rel(s[i:i + 1], rs) < 1e-4


@pytest.mark.parametrize("seg,seg_min,inplace", [(1, 2, False), (1, 0, False), (2, 0, False), (1, 0, True)])
def test_kda_chunk_scan_segments(seg, seg_min, inplace, monkeypatch):
    """The chunk table in segments of `seg` chunks (each segment's kernels, then its scan: a
    sequence's state continues across segments); an empty sequence keeps its initial state; the
    states in place (SlotRows: slots in another order, the storage read and written); with
    `seg_min` past the sequences' average chunk count (a table of 7 chunks of 32 / 4 sequences), one launch
    of each kernel; in place, the segmented scan's own tiles (BV_seg, warps_seg)."""
    from kimi_graph.runtime.views import SlotRows
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "kda_chunk",
                        {**TARGETS["interpret"]["configs"]["kda_chunk"], "scan_seg": seg, "scan_seg_min": seg_min,
                         "BV_seg": 16 * inplace, "warps_seg": 2})
    kda.chunk_specs.cache_clear()
    preps = []
    launch = kda.launch
    scans = []
    monkeypatch.setattr(kda, "launch", lambda sp, *a: (preps.append(sp.name == "kda_chunk_prep"),
                                                        scans.append(sp.name), launch(sp, *a)))
    lens, H, K, V = [70, 0, 5, 33], 2, 16, 16
    cu = torch.tensor([0, 70, 70, 75, 108], dtype=torch.int32)
    q, k, v, f, b, A, dt = kda_inputs(1, sum(lens), H, K, V)
    s0 = torch.randn(len(lens), H, K, V)
    slots = torch.tensor([2, 0, 4, 1])
    storage = torch.randn(5, H, K, V)
    storage[slots] = s0
    try:
        o, s = kda.kda_chunk(q, k, v, f, b, A, dt, 0.25, cu_seqlens=cu,
                             state=SlotRows(storage, slots) if inplace else s0)
    finally:
        kda.chunk_specs.cache_clear()
    if inplace:
        s = storage[slots]
    assert sum(preps) == (1 if seg == 0 or seg_min else -(-(108 // 32 + 4) // seg))
    assert ("kda_chunk_scan_seg" in scans) == (inplace and not seg_min)
    assert torch.equal(s[1], s0[1])
    for i in (0, 2, 3):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        ro, rs = kda_loop(q[:, sl], k[:, sl], v[:, sl], f[:, sl], b[:, sl], A, dt, s0[i:i + 1], 0.25)
        assert rel(o[:, sl], ro) < TOL and rel(s[i:i + 1], rs) < TOL


def test_kda_chunk_refuses_an_unknown_mode(monkeypatch):
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "kda_chunk",
                        {**TARGETS["interpret"]["configs"]["kda_chunk"], "diag": "columns"})
    kda.chunk_specs.cache_clear()
    try:
        with pytest.raises(ValueError, match="diag must be one of"):
            kda.chunk_specs(2, 16, 16, "f32", True, 0.25, 1e-6, False, "interpret")
    finally:
        kda.chunk_specs.cache_clear()

def test_kda_chunk_tables_follow_cu_seqlens():
    """The chunk tables kept for a cu_seqlens tensor are rebuilt once it changes in place."""
    H, K = 1, 16
    q, k, v, f, b, A, dt = kda_inputs(1, 40, H, K, K)
    cu = torch.tensor([0, 5, 40], dtype=torch.int32)
    for split in (5, 33):
        cu[1] = split
        o, s = kda.kda_chunk(q, k, v, f, b, A, dt, 0.25, cu_seqlens=cu)
        for i in range(2):
            sl = slice(int(cu[i]), int(cu[i + 1]))
            ro, rs = kda_loop(q[:, sl], k[:, sl], v[:, sl], f[:, sl], b[:, sl], A, dt, None, 0.25)
            assert rel(o[:, sl], ro) < TOL and rel(s[i:i + 1], rs) < TOL


@pytest.mark.parametrize("kind", ["kda_fused_chunk", "kda_fused_recurrent", "kda_recurrent"])
def test_kda_ops_match_references(kind):
    from kimi_graph.lowering.triton.backend import KERNELS
    B, T, H, K = 2, (1 if kind == "kda_fused_recurrent" else 21), 2, 16
    q, k, v, f, b, A, dt = kda_inputs(B, T, H, K, K)
    s0 = torch.randn(B, H, K, K)
    if kind == "kda_recurrent":     # the unfused op: normalised q, k; g and beta given
        from kimi_graph.ops.fused import kda_gate, l2_normalize
        args = [l2_normalize(q, 1e-6), l2_normalize(k, 1e-6), v, kda_gate(f.flatten(2), A, dt, torch.float32),
                torch.sigmoid(b), s0]
        attrs = {"scale": K ** -0.5}
        ref = get_op(kind).ref(args, attrs)
    else:
        args = [q, k, v, f.flatten(2), b, A, dt, s0]
        attrs = {"scale": K ** -0.5, "l2norm_eps": 1e-6, "chunk_size": 64}
        ref = kda_loop(q, k, v, f, b, A, dt, s0, K ** -0.5)
    out = KERNELS[kind][0](args, attrs)
    assert rel(out[0], ref[0]) < TOL and rel(out[1], ref[1]) < TOL


def test_kda_step_inplace_updates_state():
    q, k, v, f, b, A, dt = kda_inputs(3, 1, 2, 16, 16)
    st = torch.randn(3, 2, 16, 16)
    expect = kda_loop(q, k, v, f, b, A, dt, st, 0.25)
    _, s = kda.kda_step(q, k, v, f, b, A, dt, 0.25, state=st, inplace=True)
    assert s.data_ptr() == st.data_ptr() and rel(st, expect[1]) < TOL


def test_kda_bad_inputs_raise():
    q, k, v, f, b, A, dt = kda_inputs(1, 4, 2, 16, 16)
    with pytest.raises(ValueError, match="state"):
        kda.kda_step(q, k, v, f, b, A, dt, 0.25, state=torch.zeros(1, 2, 16, 8))
    with pytest.raises(ValueError, match="cu_seqlens"):
        kda.kda_chunk(q, k, v, f, b, A, dt, 0.25, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(TypeError):
        kda.kda_step(q.double(), k, v, f, b, A, dt, 0.25)


# -- conv, norms, elementwise --------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 2, 13])
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d(T, with_state):
    B, C, W = 2, 20, 4
    x, w = torch.randn(B, T, C), torch.randn(C, 1, W)
    st = torch.randn(B, C, W - 1) if with_state else None
    y, sn = conv.causal_conv1d(x, w, st, "silu")
    full = torch.cat([st if with_state else torch.zeros(B, C, W - 1), x.transpose(1, 2)], 2).double()
    ref = torch.stack([(full[:, :, t:t + W] * w[:, 0].double()).sum(-1) for t in range(T)], 1)
    assert rel(y, torch.nn.functional.silu(ref)) < TOL
    assert torch.equal(sn, full[:, :, -(W - 1):].float())
    args = [x, w] + ([st] if with_state else [])
    r = get_op("causal_conv1d").ref(args, {"activation": "none"})
    assert rel(conv.op_causal_conv1d(args, {"activation": "none"})[0], r[0]) < TOL


@pytest.mark.parametrize("B,T", [(3, 1), (1, 6), (2, 13)])
def test_causal_conv1d_reads_a_slice_in_place(B, T):
    """x a column slice of a wider tensor (fuse-linears' output): same as its contiguous copy."""
    wide, w, st = torch.randn(B, T, 52), torch.randn(20, 1, 4), torch.randn(B, 20, 3)
    x = wide[..., 24:44]
    y, sn = conv.causal_conv1d(x, w, st, "silu")
    y2, sn2 = conv.causal_conv1d(x.contiguous(), w, st, "silu")
    assert torch.equal(y, y2) and torch.equal(sn, sn2)


@pytest.mark.parametrize("B,T,launches", [(3, 1, 1), (2, 13, 2)])     # T past a block: outputs, then states
def test_causal_conv1d_group_equals_each_conv(B, T, launches, monkeypatch):
    wide = torch.randn(B, T, 70)
    xs = [wide[..., i * 20:(i + 1) * 20] for i in range(3)]
    ws, sts = [torch.randn(20, 1, 4) for _ in range(3)], [torch.randn(B, 20, 3) for _ in range(3)]
    names = []
    monkeypatch.setattr(conv, "launch", lambda spec, *a: names.append(spec.name) or codegen.launch(spec, *a))
    got = conv.causal_conv1d_group(xs, ws, sts, "silu")
    assert len(names) == launches and all(n.endswith("_group") for n in names)
    for (y, sn), x, w, st in zip(got, xs, ws, sts):
        y2, sn2 = conv.causal_conv1d(x, w, st, "silu")
        assert torch.equal(y, y2) and torch.equal(sn, sn2)


@pytest.mark.parametrize("kind", ["rmsnorm", "add_rmsnorm", "gated_rmsnorm"])
def test_norms(kind):
    x, r, w = torch.randn(3, 5, 40), torch.randn(3, 5, 40), torch.randn(40)
    args = {"rmsnorm": [x, w], "add_rmsnorm": [x, r, w], "gated_rmsnorm": [x, w, r]}[kind]
    fn = {"rmsnorm": norm.op_rmsnorm, "add_rmsnorm": norm.op_add_rmsnorm, "gated_rmsnorm": norm.op_gated_rmsnorm}
    out, ref = fn[kind](args, {"eps": 1e-5}), get_op(kind).ref(args, {"eps": 1e-5})
    assert len(out) == len(ref) and all(rel(a, b) < TOL for a, b in zip(out, ref))


@pytest.mark.parametrize("kind", elementwise.KINDS)
def test_elementwise_single_ops(kind):
    attrs = {"cast": {"dtype": "f64"}, "scale": {"factor": -1.5}}.get(kind, {})
    args = [torch.randn(3, 4, 5) * 4] + ([torch.randn(4, 1) + 3] if kind in ("add", "sub", "mul", "div") else [])
    out, ref = elementwise.op_elementwise(kind)(args, attrs)[0], get_op(kind).ref(args, attrs)[0]
    assert out.dtype == ref.dtype and out.shape == ref.shape and rel(out, ref) < TOL


def test_elementwise_chain_fuses_a_dag_with_broadcast_and_two_outputs():
    # the KDA decay chain: g = softplus(cast(f) + dt) * -exp(A), also returning the sum
    C = elementwise.Chain(
        inputs=(("%f", "f32"), ("%dt", "f32"), ("%A", "f32")),
        steps=(("%s", "add", ("%f", "%dt"), ()), ("%sp", "softplus", ("%s",), ()),
               ("%e", "exp", ("%A",), ()), ("%n", "neg", ("%e",), ()), ("%g", "mul", ("%sp", "%n"), ())),
        outputs=(("%s", "f32"), ("%g", "f32")), rank=3)
    f, dt, A = torch.randn(2, 7, 12), torch.randn(12), torch.randn(2, 1, 1)
    s, g = elementwise.run_chain(C, [f, dt, A], (2, 7, 12))
    assert rel(s, f + dt) < TOL and rel(g, torch.nn.functional.softplus(f + dt) * -A.exp()) < TOL
    with pytest.raises(ValueError, match="broadcast"):
        elementwise.run_chain(C, [f, torch.randn(5), A], (2, 7, 12))


# -- MLA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,q_start,splits,merge,cols", [(1, [36, 5, 20], None, 1, 0), (1, [36, 5, 20], 3, 1, 0),
                                                         (4, None, 2, 1, 16), (3, [0, 10, 33], 1, 1, 0),
                                                         (1, [36, 5, 20], 3, 2, 16), (1, [36, 5, 20], None, 4, 0),
                                                         (2, [0, 10, 33], 5, 4, 16)])
def test_mla_latent_attention(T, q_start, splits, merge, cols, monkeypatch):
    """merge: the merge's splits a step (mla_decode merge_splits; 3 and 5 splits: a ragged last step);
    cols: the latent columns a merge program takes (merge_cols; 16 of 32: two programs a row)."""
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "mla_decode",
                        {**TARGETS["interpret"]["configs"]["mla_decode"], "merge_splits": merge, "merge_cols": cols,
                         "merge_cols_small": 16 if splits == 3 else 0})     # 3 query tokens: small
    mla.latent_specs.cache_clear()
    B, H, R, P, S = 3, 4, 32, 8, 37                     # S not a multiple of the key block
    ql, qr, c, kr = torch.randn(B, T, H, R), torch.randn(B, T, H, P), torch.randn(B, S, R), torch.randn(B, S, P)
    qs = None if q_start is None else torch.tensor(q_start)
    out = mla.mla_latent_attention(ql, qr, c, kr, qs, scale=0.2, splits=splits)
    q = torch.cat([ql, qr], -1)
    kk = torch.cat([c, kr], -1).unsqueeze(2).expand(B, S, H, R + P)
    assert rel(out, attention_loop(q, kk, c.unsqueeze(2).expand(B, S, H, R), qs, 0.2)) < TOL
    args = [ql, qr, c, kr] + ([qs] if qs is not None else [])
    assert rel(out, get_op("mla_latent_attention").ref(args, {"scale": 0.2})[0]) < TOL
    mla.latent_specs.cache_clear()


@pytest.mark.parametrize("page_size", [16, 5])   # whole key blocks (BS 16) per page / blocks straddling pages
def test_mla_latent_attention_reads_paged_caches(page_size):
    B, H, R, P, pages_per_slot = 2, 4, 32, 8, 4
    S = page_size * pages_per_slot
    table = torch.randperm(B * pages_per_slot + 3)[:B * pages_per_slot].view(B, -1).to(torch.int32)
    pool_c, pool_k = torch.randn(B * pages_per_slot + 3, page_size, R), torch.randn(B * pages_per_slot + 3, page_size, P)
    slots = torch.tensor([1, 0])
    c, kr = (PagedRows(pool, slots, table, S, S) for pool in (pool_c, pool_k))
    ql, qr, qs = torch.randn(B, 1, H, R), torch.randn(B, 1, H, P), torch.tensor([S - 1, S // 2])
    out = mla.mla_latent_attention(ql, qr, c, kr, qs, scale=0.2)
    dense_c, dense_k = c.dense(), kr.dense()
    assert torch.equal(dense_c[0, :page_size], pool_c[table[1, 0]])       # the view is the pages' order
    ref = get_op("mla_latent_attention").ref([ql, qr, dense_c, dense_k, qs], {"scale": 0.2})[0]
    assert rel(out, ref) < TOL


@pytest.mark.parametrize("T,S,q_start", [(7, 7, None), (1, 30, [29, 3, 15]), (20, 40, [0, 20, 5])])
def test_causal_attention_qk_pieces(T, S, q_start):
    B, H, D, DV = 3, 2, 24, 16                          # D = 16 + 8: two dot pieces, the last masked
    kv = torch.randn(B, S, H, D + DV)
    q, k, v = torch.randn(B, T, H, D), kv[..., :D], kv[..., D:]   # strided k, v views
    qs = None if q_start is None else torch.tensor(q_start)
    out = mla.causal_attention(q, k, v, qs, scale=0.3)
    assert rel(out, attention_loop(q, k, v, qs, 0.3)) < TOL



@pytest.mark.parametrize("variant", [{}, {"split": False, "order": "forward", "BN": 32}, {"overlap": True, "tma": True}],
                         ids=["base", "one-loop", "overlap"])
def test_causal_attention_rope_key_apart(variant, monkeypatch):
    """MLA's prefill keys k ‖ rope_key with the rope key [B,S,P] read apart (shared by every
    head; the tma form falls back to pointer loads): equal to attention over the concatenated
    keys, with masked pieces on both sides (N 24 = 16 + 8, P 8), a continuation and ragged starts."""
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "attention",
                        {**TARGETS["interpret"]["configs"]["attention"], **variant})
    mla.flash_spec.cache_clear()
    B, H, N, P, DV = 3, 2, 24, 8, 12
    try:
        for T, S, q_start in ((37, 60, [23, 0, 10]), (21, 21, None)):
            kv = torch.randn(B, S, H, N + DV)
            q, kr, qs = 3 * torch.randn(B, T, H, N + P), torch.randn(B, S, P), q_start and torch.tensor(q_start)
            k = torch.cat([kv[..., :N], kr[:, :, None].expand(B, S, H, P)], -1)
            out = mla.causal_attention(q, kv[..., :N], kv[..., N:], qs, scale=0.5, rope_key=kr)
            assert rel(out, attention_loop(q, k, kv[..., N:], qs, 0.5)) < TOL
        with pytest.raises(ValueError, match="do not fit"):
            mla.causal_attention(q, kv[..., :N], kv[..., N:], scale=0.5, rope_key=kr[:, :, :4])
    finally:
        mla.flash_spec.cache_clear()


def test_mla_prefill_attention_runs_without_its_key_concat():
    """The backend's plan takes each MLA prefill attention with its concat(k, expand(reshape(rope
    key))) as one step (no concatenated key copy); with rope_apart off the step runs the concat,
    and both give the same tokens (test_triton_backend checks the model against the interpreter)."""
    import kimi_graph
    from kimi_graph.lowering.triton import backend
    from kimi_graph.lowering.triton.targets import TARGETS
    model = kimi_graph.load("tiny", pipeline="default", backend="triton", device="cpu")
    g = model.get_graph("prefill", True, "last")
    steps = [s for s in backend.plan(g) if isinstance(s, (mla.SplitKeyAttention, mla.PrefixAttention))]
    n_mla = sum(op.kind == "causal_attention" for op in g.ops())
    assert n_mla and len(steps) == n_mla
    assert [op.kind for op in steps[0].ops][-2:] == ["concat", "causal_attention"]
    prompt, attention = [[1, 2, 3, 4, 5, 6, 7] * 3], TARGETS["interpret"]["configs"]["attention"]
    apart = model.generate(prompt, max_new_tokens=2)
    try:
        attention["rope_apart"] = False
        assert model.generate(prompt, max_new_tokens=2) == apart
    finally:
        attention["rope_apart"] = True


ATTENTION_VARIANTS = [{}, {"split": False, "order": "forward"}, {"BN": 32}, {"BM": 32, "BN": 16},
                      {"fold_scale": True}, {"lazy_rescale": 8.0}, {"lazy_rescale": 3.0, "BN": 32, "order": "forward"},
                      {"tma": True}, {"tma": True, "split": False, "fold_scale": True, "BN": 32},
                      {"overlap": True}, {"overlap": True, "tma": True, "lazy_rescale": 8.0, "BM": 32, "BN": 16}]


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "base")
def test_causal_attention_variants(variant, monkeypatch):
    """Each generated form of the prefill kernel (loop split or one masked loop, heavy blocks
    first or forward, key tiles wider / narrower than the query tiles, the scale folded into q,
    lazy rescaling) against the fp64 loop: ragged q_start with S > T (a continuation), T and S
    that no tile divides, a v dim (12) and a qk dim (24 = 16 + 8) that need masked pieces, and
    one-shot prefill (S = T). Scores are spread wide so rows' maxima grow by > 8 (log2)."""
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "attention",
                        {**TARGETS["interpret"]["configs"]["attention"], **variant})
    mla.flash_spec.cache_clear()
    B, H, D, DV = 3, 2, 24, 12
    try:
        for T, S, q_start in ((37, 60, [23, 0, 10]), (37, 37, None)):
            q, k, v = 3 * torch.randn(B, T, H, D), torch.randn(B, S, H, D), torch.randn(B, S, H, DV)
            qs = None if q_start is None else torch.tensor(q_start)
            out = mla.causal_attention(q, k, v, qs, scale=0.5)
            assert rel(out, attention_loop(q, k, v, qs, 0.5)) < TOL
    finally:
        mla.flash_spec.cache_clear()


def test_causal_attention_tma_only_on_aligned_tensors(monkeypatch):
    """The tma form reads through tensor descriptors only where bases and strides are 16-byte
    aligned; other tensors take pointer loads, with the same result."""
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "attention",
                        {**TARGETS["interpret"]["configs"]["attention"], "tma": True})
    mla.flash_spec.cache_clear()
    B, T, H, D, DV = 2, 21, 2, 24, 12
    kv = torch.randn(B, T, H, D + DV + 1)
    q, k, v = torch.randn(B, T, H, D), kv[..., 1:D + 1], kv[..., D + 1:]    # k, v 4 bytes off 16
    try:
        assert mla.tma_aligned(D, q, q, q) and not mla.tma_aligned(D, q, k, v)
        assert not mla.flash_spec(H, D, DV, "f32", 0.5, "interpret", False).config["tma"]
        assert rel(mla.causal_attention(q, k, v, scale=0.5), attention_loop(q, k, v, None, 0.5)) < TOL
    finally:
        mla.flash_spec.cache_clear()

def test_causal_attention_refuses_an_unknown_order(monkeypatch):
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "attention",
                        {**TARGETS["interpret"]["configs"]["attention"], "order": "backward"})
    mla.flash_spec.cache_clear()
    try:
        with pytest.raises(ValueError, match="attention order"):
            mla.flash_spec(2, 24, 12, "f32", 0.5, "interpret")
    finally:
        mla.flash_spec.cache_clear()

# -- MoE ------------------------------------------------------------------------------------

# the router and the permutation on random shapes: tests/test_triton_moe.py

@pytest.mark.parametrize("D,I", [(40, 24), (32, 48)])       # tiles that do / do not divide the dims
def test_moe_permute_swiglu_unpermute(D, I):
    E, k, N = 6, 2, 19                          # 38 rows: several row tiles, one expert left empty
    x = torch.randn(N, D)
    ids = torch.stack([torch.randperm(E - 1)[:k] for _ in range(N)])
    rows, off, order = moe_permute.moe_permute(x, ids, E)
    ref = get_op("moe_permute").ref([x, ids], {"num_experts": E})
    assert torch.equal(rows, ref[0]) and torch.equal(off, ref[1]) and torch.equal(order, ref[2])
    w13, w2 = torch.randn(E, 2 * I, D) * 0.2, torch.randn(E, D, I) * 0.2
    y = moe.grouped_swiglu(rows, off, w13, w2)
    expect = torch.zeros(rows.shape[0], D, dtype=torch.float64)
    for e in range(E):
        s, t = int(off[e]), int(off[e + 1])
        h = rows[s:t].double() @ w13[e].double().T
        expect[s:t] = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ w2[e].double().T
    assert rel(y, expect) < TOL
    wts, acc = torch.rand(N, k), torch.randn(N, D)
    out = moe_permute.moe_unpermute(y, order, wts, acc)
    assert rel(out, get_op("moe_unpermute").ref([y, order, wts, acc], {})[0]) < TOL


# -- launch ---------------------------------------------------------------------------------

def test_dependent_launch_prologue_leads_the_entry_and_changes_nothing_else():
    from kimi_graph.lowering.triton.codegen import with_pdl
    split, _ = mla.latent_specs(4, 32, 8, "f32", 0.2, 4, "interpret")   # multi-line signature, comments
    pdl = with_pdl(split)
    import ast
    entry = next(n for n in ast.parse(pdl.source).body if getattr(n, "name", "") == split.entry)
    asm = [ast.unparse(st) for st in entry.body[:2]]
    assert "griddepcontrol.launch_dependents" in asm[0] and "griddepcontrol.wait" in asm[1]
    assert [ln for ln in pdl.source.splitlines() if "griddepcontrol" not in ln] == split.source.splitlines()
    assert pdl.hash != split.hash and with_pdl(split) is pdl
    merge = with_pdl(mla.latent_specs(4, 32, 8, "f32", 0.2, 4, "interpret")[1])   # same source, other entry
    assert merge.entry == "mla_latent_merge" and "griddepcontrol" in merge.source.split("def mla_latent_merge")[1]
    late = with_pdl(split, "wait")      # the trigger after the wait: one kernel ahead
    body = next(n for n in ast.parse(late.source).body if getattr(n, "name", "") == split.entry).body
    assert "griddepcontrol.wait" in ast.unparse(body[0]) and "launch_dependents" in ast.unparse(body[1])
    assert late.hash != pdl.hash


def test_dependent_launch_prologue_goes_to_the_mark_after_the_early_prefetch(monkeypatch):
    """A kernel with a `# pdl: wait` line (gemv_rows) takes the prologue there, after its W
    lines' L2 prefetch, which only the dependent form turns on (PDL_EARLY); pdl_kernels names
    the entries launched dependently (empty: all)."""
    from kimi_graph.lowering.triton import codegen, gemv
    from kimi_graph.lowering.triton.targets import TARGETS
    spec = gemv.gemv_spec(64, 256, 1, "f32", None, 0.0, "interpret")
    pdl = codegen.with_pdl(spec)
    lines = pdl.source.splitlines()
    at = [i for i, ln in enumerate(lines) if "griddepcontrol" in ln]
    assert len(at) == 2 and lines[at[1] + 1].strip() == codegen.PDL_MARK
    assert "_prefetch_l2(" in "\n".join(lines[at[0] - 4:at[0]]) and "PDL_EARLY = tl.constexpr(True)" in pdl.source
    assert "PDL_EARLY = tl.constexpr(False)" in spec.source and "griddepcontrol" not in spec.source
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "launch", {"pdl": True, "pdl_kernels": ["gemv_rows"]})
    codegen._pdl_config.cache_clear()
    try:
        assert codegen.pdl_launched("gemv_rows") and not codegen.pdl_launched("moe_router")
    finally:
        codegen._pdl_config.cache_clear()


def test_dependent_launches_by_step_rows(monkeypatch):
    """launch.pdl_rows: launches of graph calls of at most that many token rows (step_rows) are
    dependent, others plain; the environment overrides both; never below sm_90."""
    from kimi_graph.lowering.triton import codegen
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.delenv(codegen.PDL_ENV, raising=False)
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "launch", {"pdl": False, "pdl_rows": 2,
                                                                    "pdl_trigger": "wait"})
    codegen._pdl_config.cache_clear()
    try:
        assert not codegen.pdl_enabled(90)
        with codegen.step_rows(2):
            assert codegen.pdl_enabled(90) and not codegen.pdl_enabled(80)
            with codegen.step_rows(3):
                assert not codegen.pdl_enabled(90)
        monkeypatch.setenv(codegen.PDL_ENV, "1")
        assert codegen.pdl_enabled(90)
        assert codegen.pdl_trigger() == "wait"
        monkeypatch.setenv(codegen.PDL_ENV, "start")
        assert codegen.pdl_enabled(90) and codegen.pdl_trigger() == "start"
        monkeypatch.setenv(codegen.PDL_ENV, "0")
        with codegen.step_rows(1):
            assert not codegen.pdl_enabled(90)
    finally:
        codegen._pdl_config.cache_clear()


@pytest.mark.parametrize("T,inplace", [(37, True), (2, None)], ids=["slot-states", "short-no-conv-state"])
def test_kda_chunk_conv_matches_conv_then_chunk(T, inplace):
    """KDA's q/k/v convs (SiLU, width 4) inside the prep kernel (kda_chunk_conv, the projections
    read as slices of one fused row) equal the conv group then kda_chunk: outputs, KDA states and
    new conv states, from carried conv states updated in place (SlotRows, slots out of order) or
    from none (a prompt shorter than the conv's window)."""
    from kimi_graph.runtime.views import SlotRows
    torch.manual_seed(7)
    B, H, K, W = 2, 2, 16, 4
    C = H * K
    fused = torch.randn(B, T, 3 * C + H + 3)
    xs = [fused[..., i * C:(i + 1) * C] for i in range(3)]
    b = fused[..., 3 * C:3 * C + H]
    ws = [0.5 * torch.randn(C, 1, W) for _ in range(3)]
    f = torch.randn(B, T, C)
    A, dt = 0.3 * torch.randn(H), 0.1 * torch.randn(C)
    s0 = torch.randn(B, H, K, K)
    cs = [torch.randn(B, C, W - 1) for _ in range(3)] if inplace else [None] * 3
    outs = conv.causal_conv1d_group(xs, ws, cs, "silu")
    q, k, v = (y.view(B, T, H, K) for y, _ in outs)
    ro, rs = kda.kda_chunk(q, k, v, f.view(B, T, H, K), b, A, dt, 0.25, state=s0)
    states = cs
    if inplace:
        slots = torch.tensor([2, 0])
        storage = [torch.randn(3, C, W - 1) for _ in range(3)]
        for st, c in zip(storage, cs):
            st[slots] = c
        states = [SlotRows(st, slots) for st in storage]
    o, s, new = kda.kda_chunk_conv(xs, ws, states, f, b, A, dt, 0.25, H, state=s0)
    assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5
    for n, (_, want), i in zip(new, outs, range(3)):
        assert torch.equal(storage[i][slots] if inplace else n, want)
