"""The decode step's fused launches, through the Triton interpreter, fp32: the routed experts of
decode-sized batches read by their top-k ids (lowering/triton/moe_decode) against an fp64 loop
written here, the op library's moe_experts reference and moe.moe_experts; the backend's plan
running the routed (and shared) experts as one step and KDA's three convs as one launch.
Tolerance: rel. error <= 1e-5 (the conv group: bitwise, tests/test_triton_kernels.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kimi_graph.lowering.triton import backend, moe, moe_decode  # noqa: E402
from kimi_graph.ops import get_op  # noqa: E402
from reference_kimi import rel_err as rel  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _interpret(triton_interpret):
    pass


_DOWN_APART = {"acc_down": "row", "unroll_down": True, "x_load_down": "vector"}


@pytest.fixture(params=[{"acc": "row", "unroll": False, "x_load": "vector"},
                        {"acc": "tile", "unroll": False, "x_load": "tile", **_DOWN_APART},
                        {"acc": "row", "unroll": True, "x_load": "tile"},
                        {"acc": "tile", "unroll": True, "x_load": "vector"}],
                ids=["row", "tile-xtile-down-apart", "row-unrolled-xtile", "tile-unrolled"])
def forms(request, monkeypatch):
    """Each form of the bf16 experts' K loops (moe_decode.FORMS: each x_load beside each acc and
    unroll, and the down kernel's own), in the base and bucket tiles."""
    from kimi_graph.lowering.triton.targets import TARGETS
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "moe_decode",
                        {**TARGETS["interpret"]["configs"]["moe_decode"], **request.param})
    moe_decode.decode_specs.cache_clear()
    yield request.param
    moe_decode.decode_specs.cache_clear()


def swiglu64(x, wg, wu, wd):
    return wd.double() @ (torch.nn.functional.silu(wg.double() @ x.double()) * (wu.double() @ x.double()))


def experts_fp64(x, ids, w, w13, w2, acc, shared=None):
    I = w2.shape[2]
    out = acc.double().clone() if shared is None else torch.stack([swiglu64(r, *shared) for r in x])
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j])
            h = w13[e].double() @ x[n].double()
            out[n] += w[n, j].double() * (w2[e].double() @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    return out


def draw(N, E, k, D, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, acc = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    ids[-1] = ids[0]                                 # two tokens on the same experts
    w = torch.rand(N, k, generator=g)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g) * 0.2, torch.randn(E, D, I, generator=g) * 0.2
    return x, ids, w, w13, w2, acc


@pytest.mark.parametrize("N,E,k,D,I", [(1, 16, 8, 40, 24), (3, 6, 2, 32, 48), (16, 9, 4, 24, 20)])
def test_direct_path_matches_fp64_and_the_batched_path(N, E, k, D, I, forms):
    """Tiles that do and do not divide D and I; repeated experts across tokens."""
    args = draw(N, E, k, D, I, seed=N)
    out = moe_decode.direct(*args)
    assert rel(out, experts_fp64(*args)) < TOL
    assert rel(out, get_op("moe_experts").ref(list(args), {})[0]) < TOL
    assert rel(out, moe.moe_experts(*args)) < TOL


@pytest.mark.parametrize("N,IS", [(1, 24), (4, 56)])       # shared width below and above I
def test_shared_expert_folded_in(N, IS, forms, monkeypatch):
    x, ids, w, w13, w2, _ = draw(N, 7, 3, 40, 24, seed=N + 10)
    g = torch.Generator().manual_seed(IS)
    shared = (torch.randn(IS, 40, generator=g) * 0.2, torch.randn(IS, 40, generator=g) * 0.2,
              torch.randn(40, IS, generator=g) * 0.2)
    out = moe_decode.direct(x, ids, w, w13, w2, None, shared)
    assert rel(out, experts_fp64(x, ids, w, w13, w2, None, shared)) < TOL
    assert rel(out, moe.moe_experts(x, ids, w, w13, w2, moe_decode.shared_swiglu(x, *shared))) < TOL
    from kimi_graph.lowering.triton.targets import TARGETS        # the shared programs first: the same bits
    monkeypatch.setitem(TARGETS["interpret"]["configs"]["moe_decode"], "shared_first", True)
    moe_decode.decode_specs.cache_clear()
    assert torch.equal(moe_decode.direct(x, ids, w, w13, w2, None, shared), out)


@pytest.mark.parametrize("shared", [False, True])
def test_down_kernel_combines(monkeypatch, shared):
    """Two launches: the down kernel's last program per (token, D block) does the combine, as
    moe_permute.moe_combine sums (bitwise), and leaves its tickets zero (a second run, as a CUDA
    graph's replay, gives the same)."""
    from kimi_graph.lowering.triton import codegen, moe_permute
    x, ids, w, w13, w2, acc = draw(3, 9, 4, 40, 24, seed=11)
    sh = tuple(torch.randn(*s, generator=torch.Generator().manual_seed(5)) * 0.2 for s in ((24, 40), (24, 40), (40, 24)))
    args = (x, ids, w, w13, w2, None, sh) if shared else (x, ids, w, w13, w2, acc)
    names = []
    monkeypatch.setattr(moe_decode, "launch", lambda spec, *a: names.append(spec.name) or codegen.launch(spec, *a))
    out = moe_decode.direct(*args)
    assert names == ["moe_decode_gate_up", "moe_decode_down"] and not codegen._TICKETS["cpu"][-1].any()
    assert torch.equal(moe_decode.direct(*args), out)
    ys = []                            # the rows the down kernel combined, through the combine kernel
    monkeypatch.setattr(moe_decode.torch, "empty", lambda *a, _f=torch.empty, **k: ys.append(_f(*a, **k)) or ys[-1])
    moe_decode.direct(*args)
    y = ys[1]                          # h, y, (hs), out
    base = y[ids.numel():] if shared else acc
    assert torch.equal(moe_permute.moe_combine(y[:ids.numel()], w, base), out)
    want = experts_fp64(x, ids, w, w13, w2, None, sh) if shared else experts_fp64(x, ids, w, w13, w2, acc)
    assert rel(out, want) < TOL


def test_tiles_by_token_count(monkeypatch):
    """token_tiles: one or two tokens take the bucket's tiles (the interpreter's differ from its
    base tiles), three the base ones; each token is bitwise the same alone as in a batch of its
    bucket, and every bucket agrees with fp64; the AOT list holds every bucket's kernels."""
    from kimi_graph.lowering.triton import targets
    cfg = targets.config("moe_decode", "interpret")
    assert [moe_decode.bucket_of(cfg, n) for n in (1, 2, 3)] == [2, 2, None]
    x, ids, w, w13, w2, acc = draw(3, 9, 4, 40, 24, seed=7)
    specs = {n: moe_decode._specs(x[:n], ids[:n], w[:n], w13, w2, None, None)[0].config for n in (1, 2, 3)}
    assert (specs[1]["BN"], specs[1]["BK"], specs[3]["BN"], specs[3]["BK"]) == (16, 32, 8, 16)
    out = moe_decode.direct(x, ids, w, w13, w2, acc)
    assert rel(out, experts_fp64(x, ids, w, w13, w2, acc)) < TOL
    pair = moe_decode.direct(x[1:], ids[1:], w[1:], w13, w2, acc[1:])
    for n in (1, 2):
        one = moe_decode.direct(x[n:n + 1], ids[n:n + 1], w[n:n + 1], w13, w2, acc[n:n + 1])
        assert torch.equal(one, pair[n - 1:n])
        assert rel(one, out[n:n + 1]) < TOL
    from types import SimpleNamespace
    ins = [SimpleNamespace(shape=tuple(t.shape), dtype="i64" if t is ids else "f32") for t in (x, ids, w, w13, w2, acc)]
    got = {s.config["BN"] for s in moe_decode.specs_for("moe_experts", ins, [x], {}, "interpret") if "BN" in s.config
           and s.name.startswith("moe_decode")}
    assert got == {8, 16}
    monkeypatch.setitem(targets.TARGETS["interpret"]["configs"]["moe_decode"], "token_tiles", [[2, {"max_pairs": 9}]])
    moe_decode.decode_specs.cache_clear()
    with pytest.raises(ValueError, match="not tile keys"):
        moe_decode.direct(x[:1], ids[:1], w[:1], w13, w2, acc[:1])


def test_low_bit_tiles_by_token_bucket():
    """quant_token_tiles (and quant_token_tiles_FMT) give low-bit experts their own tiles in a
    token bucket, over the bucket's float tiles and quant_tiles; float experts never take them; a
    bound that is not a token_tiles bound is refused."""
    cfg = {"BN": 16, "BK": 256, "num_warps": 4, "token_tiles": [[1, {"BN": 2, "x_load": "tile"}], [4, {"BN": 8}]],
           "quant_tiles": {"BK": 512, "num_warps": 8}, "quant_token_tiles": [[1, {"x_load": "vector"}]],
           "quant_token_tiles_fp8": [[1, {"BN": 4, "BK": 1024}]]}
    bc = moe_decode.bucket_config
    assert bc(cfg, 1)["BN"] == 2 and bc(cfg, 1)["x_load"] == "tile" and bc(cfg, None)["BN"] == 16
    int4 = bc(cfg, 1, quant="int4")
    assert (int4["BN"], int4["BK"], int4["num_warps"], int4["x_load"]) == (2, 512, 8, "vector")
    fp8 = bc(cfg, 1, quant="fp8")
    assert (fp8["BN"], fp8["BK"], fp8["num_warps"], fp8["x_load"]) == (4, 1024, 8, "vector")
    assert bc(cfg, 4, quant="fp8")["BN"] == 8 and bc(cfg, 4, quant="fp8")["BK"] == 512
    with pytest.raises(ValueError, match="not token_tiles bounds"):
        bc({**cfg, "quant_token_tiles": [[2, {"BN": 4}]]}, 1, quant="int8")
    with pytest.raises(ValueError, match="not tile keys"):
        bc({**cfg, "quant_token_tiles": [[1, {"max_pairs": 4}]]}, 1, quant="int8")


def test_moe_experts_chooses_by_batch_size(monkeypatch):
    args = draw(5, 6, 2, 24, 16)
    calls = []
    monkeypatch.setattr(moe_decode, "direct", lambda *a, _f=moe_decode.direct, **k: calls.append("direct") or _f(*a, **k))
    monkeypatch.setattr(moe, "moe_experts", lambda *a, _f=moe.moe_experts: calls.append("moe") or _f(*a))
    moe_decode.moe_experts(*args)
    big = draw(70, 6, 2, 24, 16)                     # 140 copies > max_pairs
    assert rel(moe_decode.moe_experts(*big), experts_fp64(*big)) < TOL
    assert calls == ["direct", "moe"]
    with pytest.raises(ValueError, match="do not fit"):
        moe_decode.direct(args[0], args[1][:, :1], *args[2:])


def test_plan_runs_the_routed_and_shared_experts_as_one_step():
    import kimi_graph
    model = kimi_graph.load("tiny", dtype=torch.float32, device="cpu", pipeline="default")
    g = backend.legalize(model.get_graph("decode", True))
    items = backend.plan(g)
    chains = [i for i in items if isinstance(i, backend.Experts)]
    moe_layers = sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))
    assert len(chains) == moe_layers
    kinds = {getattr(i, "kind", None) for i in items}
    assert not kinds & {"moe_permute", "grouped_swiglu", "moe_unpermute", "moe_experts"}
    assert all(len(c.inputs) == 8 for c in chains)         # the shared experts folded in
    assert not [i for i in items if ".shared." in i.outputs[0]]


def test_plan_runs_the_kda_convs_as_one_launch():
    import kimi_graph
    model = kimi_graph.load("tiny", dtype=torch.float32, device="cpu", pipeline="default")
    g = model.get_graph("decode", True)
    items = backend.plan(g)
    groups = [i for i in items if isinstance(i, backend.Convs)] + [   # decode: inside the KDA step
        i.parts[0] for i in items if isinstance(i, backend.kda_decode.DecodeStep)]
    assert len(groups) == model.config.layer_kinds.count("kda")
    assert all(len(c.ops) == 3 for c in groups)
    assert not [i for i in items if getattr(i, "kind", None) == "causal_conv1d"]


@pytest.mark.parametrize("B", [1, 3])           # the norm inside the router's launch, and past fused_max
def test_router_runs_with_its_norm(monkeypatch, B):
    """Each MoE layer's add_rmsnorm and router are one step (moe_route.NormRoute); with
    norm_inline on, a decode step of at most fused_max tokens launches the router with the norm
    inside (no norm kernel for it) and its outputs match the reference interpreter's."""
    import kimi_graph
    from kimi_graph.lowering.triton import codegen, moe_route
    from kimi_graph.lowering.triton.targets import TARGETS
    from test_triton_backend import state_inputs
    ref = kimi_graph.load("tiny", pipeline="default")
    tri = kimi_graph.load("tiny", pipeline="default", backend="triton")
    g = backend.legalize(tri.get_graph("decode", True))
    steps = [i for i in backend.plan(g) if isinstance(i, moe_route.NormRoute)]
    moe_layers = sum(tri.config.is_moe_layer(i) for i in range(tri.config.num_hidden_layers))
    assert len(steps) == moe_layers and not [i for i in backend.plan(g) if getattr(i, "kind", None) == "moe_route"]
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "moe_route",
                        {**TARGETS["interpret"]["configs"]["moe_route"], "norm_inline": True, "select": "packed"})
    moe_route.fused_spec.cache_clear()
    moe_route.select_spec.cache_clear()
    names = []
    for mod in (moe_route, backend.norm):
        monkeypatch.setattr(mod, "launch", lambda spec, *a, _l=mod.launch: names.append(spec.name) or _l(spec, *a))
    inputs = state_inputs(tri.get_graph("decode", True), torch.arange(B)[:, None] + 3, torch.arange(B) + 4, B=B)
    outs, expect = tri.execute("decode", True, inputs), ref.execute("decode", True, inputs)
    moe_route.fused_spec.cache_clear()
    moe_route.select_spec.cache_clear()
    inline = B <= TARGETS["interpret"]["configs"]["moe_route"]["fused_max"]
    assert names.count("moe_router_norm") == (moe_layers if inline else 0)
    assert not codegen._TICKETS["cpu"][-1].any()
    for a, b in zip(outs, expect):
        assert a.shape == b.shape and rel(a, b) < TOL


def test_plan_writes_the_mla_cache_rows_as_one_step():
    """Each MLA layer's kv_a_layernorm and its two cache writes are one step (mla.CacheRows)."""
    import kimi_graph
    from kimi_graph.lowering.triton import mla
    model = kimi_graph.load("tiny", dtype=torch.float32, device="cpu", pipeline="default")
    items = backend.plan(backend.legalize(model.get_graph("decode", True)))
    steps = [i for i in items if isinstance(i, mla.CacheRows)]
    assert len(steps) == model.config.layer_kinds.count("mla")
    assert [o.kind for o in steps[0].ops] == ["rmsnorm", "cache_write", "cache_write"]
    assert not [i for i in items if getattr(i, "kind", None) == "cache_write"]


def test_l2_prefetch_plan_on_the_published_decode_step():
    """prefetch.plan over the published model's decode schedule (weights on the meta device):
    each KDA step takes its layer's o_proj, each router its layer's shared expert, MLA's
    attention its o_proj; never a routed expert bank; each weight once, at most max_bytes before
    an item; off in the interpreter. The prefetch kernel builds for sm_90."""
    import torch as _torch
    from kimi_graph.api import KimiModel, resolve_config
    from kimi_graph.lowering.triton import prefetch
    from kimi_graph.lowering.triton.aot import compile_spec
    from kimi_graph.lowering.triton.targets import config
    from kimi_graph.model import build_graph
    from kimi_graph.passes import DEFAULT_PIPELINE, PassManager
    cfg, _ = resolve_config("kimi-linear-48b-a3b")
    model = KimiModel(cfg, {}, dtype=_torch.bfloat16, device="meta", router_weights="official")
    legal = backend.legalize(PassManager(DEFAULT_PIPELINE).run(build_graph(cfg, "decode", stateful=True, dtype="bf16"),
                                                                transforms=model.transforms))
    schedule = backend.plan(legal)
    sizes = prefetch.weight_bytes(legal)
    pcfg = config("l2_prefetch", "sm_90")
    ahead = prefetch.plan(schedule, backend.prefetchable, sizes, pcfg, backend.launches)
    kinds = {type(schedule[i]).__name__ + "." + getattr(schedule[i], "kind", ""): [] for i in ahead}
    for i, picks in ahead.items():
        kinds[type(schedule[i]).__name__ + "." + getattr(schedule[i], "kind", "")].append([w for w, _ in picks])
        assert sum(n for _, n in picks) <= pcfg["max_bytes"] and all(n <= sizes[w] for w, n in picks)
    names = [w for picks in ahead.values() for w, _ in picks]
    assert len(names) == len(set(names)) and not any("experts.w" in w or "w13" in w for w in names)
    steps = kinds["DecodeStep."]
    assert len(steps) == 20 and all(any(w.endswith("self_attn.o_proj.weight") for w in p) for p in steps)
    routes = kinds["NormRoute."]
    assert len(routes) == 26 and all(any("shared_experts" in w for w in p) for p in routes)
    assert len(kinds["Op.mla_latent_attention"]) == 7
    assert not prefetch.enabled(1)                      # the interpreter never prefetches
    ptx = compile_spec(prefetch.prefetch_spec("sm_90"), "sm_90").asm["ptx"]
    assert "prefetch.global.L2" in ptx


@pytest.mark.parametrize("B", [1, 3])
def test_shared_expert_beside_the_router(monkeypatch, B):
    """moe_decode shared_beside: each MoE layer's shared expert runs apart from its routed
    experts (its own norm, then the direct kernels with no routed pairs; off CUDA in turn), its
    output the routed experts' acc: every router feeds one such step, the direct kernels run once
    more a layer, and the step's outputs match the reference interpreter's and the plain step's."""
    import kimi_graph
    from kimi_graph.lowering.triton.targets import TARGETS
    from test_triton_backend import state_inputs
    ref = kimi_graph.load("tiny", pipeline="default")
    tri = kimi_graph.load("tiny", pipeline="default", backend="triton")
    g = backend.legalize(tri.get_graph("decode", True))
    schedule = backend.plan(g)
    moe_layers = sum(tri.config.is_moe_layer(i) for i in range(tri.config.num_hidden_layers))
    assert len(backend.routed_experts(schedule)) == moe_layers
    inputs = state_inputs(tri.get_graph("decode", True), torch.arange(B)[:, None] + 3, torch.arange(B) + 4, B=B)
    plain = tri.execute("decode", True, {k: v.clone() for k, v in inputs.items()})
    monkeypatch.setitem(TARGETS["interpret"]["configs"], "moe_decode",
                        {**TARGETS["interpret"]["configs"]["moe_decode"], "shared_beside": 4})
    moe_decode.decode_specs.cache_clear()
    names = []
    monkeypatch.setattr(moe_decode, "launch", lambda spec, *a, _l=moe_decode.launch: names.append(spec.name) or _l(spec, *a))
    outs = tri.execute("decode", True, {k: v.clone() for k, v in inputs.items()})
    expect = ref.execute("decode", True, {k: v.clone() for k, v in inputs.items()})
    moe_decode.decode_specs.cache_clear()
    assert names.count("moe_decode_gate_up") == 2 * moe_layers
    from kimi_graph.lowering.triton import codegen
    assert not codegen._TICKETS["cpu/beside"][-1].any()     # the side stream's own counters, left zero
    for a, b, c in zip(outs, expect, plain):
        assert a.shape == b.shape and rel(a, b) < TOL and rel(a, c) < TOL
