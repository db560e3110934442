"""The torch lowering, eagerly (no Inductor): the op table, the custom ops (schemas, fake
implementations, the set_impl registration point), the static forms against the op
references, lowered modules against the interpreter, the backend="torch" executor, and the
way back (FX -> layer graph) behind the "kimi_graph" torch.compile backend.

References: the interpreter (kimi_graph/interpreter.py, op by op with each OpDef.ref) for
whole graphs; OpDef.ref for the static forms. Tolerances (relative Frobenius error per
output): fp32 1e-5, fp64 1e-12; lowered modules run the same references eagerly, so in
practice they agree exactly."""
from __future__ import annotations

import pytest
import torch

from checkpoints import random_config
from kimi_graph.api import KimiModel, load
from kimi_graph.config import KimiLinearConfig
from kimi_graph.interpreter import run_graph
from kimi_graph.ir import IRError
from kimi_graph.lowering.mlir.export import example_inputs
from kimi_graph.lowering.torch import custom_ops, import_fx, lower, set_impl
from kimi_graph.lowering.torch import functional as kf
from kimi_graph.lowering.torch.backend import make_backend
from kimi_graph.lowering.torch.ops import (CUSTOM, INLINE, LOWERING, custom_kinds, decomposed_form,
                                           node_function, static_form)
from kimi_graph.model import build_graph
from kimi_graph.ops import REGISTRY, TORCH_DTYPES, get_op
from kimi_graph.passes import run_pipeline
from kimi_graph.weights import random_weights
from reference_kimi import rel_err as rel

TOL = {"f32": 1e-5, "f64": 1e-12}
GRAPHS = [("prefill", False), ("prefill", True), ("decode", True)]
FUSED = {"kda_fused_recurrent", "kda_fused_chunk", "gated_rmsnorm", "add_rmsnorm", "head_matmul",
         "mla_latent_attention", "moe_route", "moe_permute", "grouped_swiglu", "moe_unpermute"}
DATA_DEPENDENT = {"grouped_topk", "moe_expert", "moe_permute", "cache_write", "kda_recurrent"}



def config(seed: int) -> KimiLinearConfig:
    """A random tiny config with at least one KDA and one MLA layer and a grouped MoE."""
    return KimiLinearConfig.from_dict(random_config(
        seed, num_hidden_layers=3, first_k_dense_replace=1, num_experts=6, num_expert_group=2,
        topk_group=1, num_experts_per_token=2,
        linear_attn_config={"kda_layers": [1, 3], "full_attn_layers": [2], "num_heads": 2,
                            "head_dim": 4, "short_conv_kernel_size": 3}))


def graph_and_weights(seed, mode, stateful, dtype="f32", pipeline=None):
    g = build_graph(config(seed), mode, stateful=stateful, dtype=dtype)
    w = random_weights(g, seed=seed)
    if pipeline:
        g = run_pipeline(g, pipeline, weights=w)
    return g, w



def check_outputs(outs, refs, dtype):
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert rel(o, r) <= TOL[dtype], rel(o, r)


# -- the table and the custom ops ----------------------------------------------------------

def test_table_maps_every_registered_op_once():
    assert set(LOWERING) == set(REGISTRY)
    assert FUSED - {"stack"} <= set(custom_kinds())
    assert DATA_DEPENDENT <= set(custom_kinds())
    assert all(low.how in (CUSTOM, INLINE) for low in LOWERING.values())
    for kind in custom_kinds():
        op = custom_ops.custom_op(kind)
        assert op is getattr(torch.ops.kimi_graph, kind).default


def captured_samples() -> dict[str, tuple[list, dict]]:
    """Real operands of every custom op kind, captured while the interpreter runs the tiny
    graphs before and after the default pipeline (which introduces the fused ops), and with
    int4 experts."""
    seen: dict[str, tuple[list, dict]] = {}

    def spy(kind):
        def fn(args, attrs):
            seen.setdefault(kind, ([a.clone() if a is not None else None for a in args], dict(attrs)))
            return get_op(kind).ref(args, attrs)
        return fn

    impls = {k: spy(k) for k in custom_kinds()}
    for pipeline in (None, "default", "default,quantize-experts,fold-constants"):
        for mode, stateful in GRAPHS:
            g, w = graph_and_weights(1, mode, stateful, pipeline=pipeline)
            run_graph(g, example_inputs(g, batch=2, seq=5, cache_len=8), w, impls=impls)
    return seen


@pytest.fixture(scope="module")
def samples():
    s = captured_samples()
    assert set(s) == set(custom_kinds()), f"no sample for {set(custom_kinds()) - set(s)}"
    return s


@pytest.mark.parametrize("kind", sorted(custom_kinds()))
def test_custom_op_schema_fake_and_result(kind, samples):
    args, attrs = samples[kind]
    op = custom_ops.custom_op(kind)
    attrs = custom_ops.coerce_attrs(kind, attrs)
    # schema, fake (meta) implementation against the real one, dispatch under tracing
    torch.library.opcheck(op, tuple(args), attrs,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    out = op(*args, **attrs)
    out = list(out) if isinstance(out, tuple) else [out]
    ref = get_op(kind).ref(args, attrs)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
        assert o.is_contiguous()


@pytest.mark.parametrize("kind", sorted(k for k, low in LOWERING.items() if (low.static or low.export)
                                         and get_op(k).family != "collective"))
def test_static_and_export_forms_match_the_reference(kind, samples):
    """The sync-free forms (CUDA defaults) and the forms the MLIR export decomposes into
    compute the reference's function. (Collectives run only in a process group:
    tests/test_parallel.py runs their functional forms on the torch backend.)"""
    if kind == "embedding":
        ids, w = torch.randint(0, 9, (2, 5)), torch.randn(9, 4)
        cases = [([ids, w], {})]
    else:
        args, attrs = samples[kind]
        cases = [(args, attrs), ([a.double() if a is not None and a.is_floating_point() else a
                                  for a in args], attrs)]
    for args, attrs in cases:
        forms = {static_form(kind), decomposed_form(kind)} - {get_op(kind).ref}
        assert forms
        for form in forms:
            out, ref = form(args, attrs), get_op(kind).ref(args, attrs)
            for o, r in zip(out, ref):
                assert o.dtype == r.dtype and o.shape == r.shape
                if o.is_floating_point():
                    assert rel(o, r) <= (1e-12 if o.dtype == torch.float64 else 2e-6)
                else:
                    assert torch.equal(o, r)


def test_static_cache_write_still_refuses_overflow():
    cache, new = torch.zeros(1, 4, 2), torch.ones(1, 2, 2)
    with pytest.raises(RuntimeError):
        static_form("cache_write")([cache, new, torch.tensor([3])], {})


def test_set_impl_swaps_the_implementation_and_restores_it():
    g, w = graph_and_weights(2, "decode", True, pipeline="default")
    assert "gated_rmsnorm" in g.op_counts()
    gm = lower(g, w)
    inputs = example_inputs(g, batch=2, cache_len=8)
    args = [inputs[n] for n in g.inputs]
    ref = gm(*args)
    calls = []

    def doubled(a, attrs):
        calls.append(attrs["eps"])
        return [2 * get_op("gated_rmsnorm").ref(a, attrs)[0]]

    set_impl("gated_rmsnorm", "cpu", doubled)
    try:
        changed = gm(*args)          # the module lowered before the swap uses the new kernel
        assert len(calls) == g.op_counts()["gated_rmsnorm"]
        assert not torch.allclose(changed[0], ref[0])
    finally:
        set_impl("gated_rmsnorm", "cpu", None)
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), ref))
    assert custom_ops.get_impl("moe_expert", "cuda") is LOWERING["moe_expert"].static
    assert custom_ops.get_impl("moe_expert", "cpu") == get_op("moe_expert").ref
    with pytest.raises(ValueError, match="not a custom op"):
        set_impl("linear", "cpu", doubled)


# -- lowered modules against the interpreter -----------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pipeline", [None, "default"])
@pytest.mark.parametrize("mode,stateful", GRAPHS)
def test_lowered_module_matches_interpreter(seed, pipeline, mode, stateful):
    dtype = "f64" if seed == 2 else "f32"
    g, w = graph_and_weights(seed, mode, stateful, dtype, pipeline)
    gm = lower(g, w)
    inputs = example_inputs(g, batch=2, seq=6, cache_len=10, seed=seed)
    # cache positions that differ per sequence, with room for the new rows
    if "%cache_pos" in inputs:
        inputs["%cache_pos"] = torch.tensor([0, 3])
    check_outputs(gm(*[inputs[n] for n in g.inputs]), run_graph(g, inputs, w), dtype)


def test_one_module_serves_every_batch_and_length():
    g, w = graph_and_weights(0, "prefill", False)
    gm = lower(g, w)
    for B, T in [(1, 1), (3, 4), (2, 9)]:
        ids = torch.randint(0, config(0).vocab_size, (B, T))
        check_outputs(gm(ids), run_graph(g, {"input_ids": ids}, w), "f32")


def test_lowered_module_is_readable_and_names_its_io():
    g, w = graph_and_weights(0, "decode", True, pipeline="default")
    gm = lower(g, w)
    assert gm.input_names == list(g.inputs) and gm.output_names == list(g.outputs)
    code = gm.code
    assert "torch.ops.kimi_graph.kda_fused_recurrent.default" in code
    assert "state__l0__kda" in code                                  # mangled input names
    assert hasattr(gm, "model__layers__0__self_attn__o_proj__weight")  # buffers: the weights
    assert gm.model__layers__0__self_attn__o_proj__weight is w["model.layers.0.self_attn.o_proj.weight"]


def test_torch_export_keeps_the_custom_ops_opaque():
    g, w = graph_and_weights(0, "decode", True, pipeline="default")
    inputs = example_inputs(g, batch=2, cache_len=8)
    args = tuple(inputs[n] for n in g.inputs)
    ep = torch.export.export(lower(g, w), args)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {f"kimi_graph.{k}.default" for k in ("kda_fused_recurrent", "mla_latent_attention",
                                                "moe_route", "grouped_swiglu", "cache_write")} <= targets
    check_outputs(ep.module()(*args), run_graph(g, inputs, w), "f32")


def test_functional_names_every_op():
    assert all(getattr(kf, k) is node_function(k) for k in LOWERING)
    assert kf.moe_route is torch.ops.kimi_graph.moe_route.default


def test_lower_reports_missing_weights():
    g, w = graph_and_weights(0, "prefill", False)
    w.pop("model.norm.weight")
    with pytest.raises(IRError, match="no weight for parameter @model.norm.weight"):
        lower(g, w)


# -- the backend="torch" executor -----------------------------------------------------------

def zero_states(g, B: int, S: int, device="cpu") -> dict[str, torch.Tensor]:
    out = {}
    for n in g.meta["state_inputs"]:
        ty = g.types[n]
        out[n] = torch.zeros([B if d == "B" else S if d == "S" else d for d in ty.shape],
                             dtype=TORCH_DTYPES[ty.dtype], device=device)
    return out


def generate_states(model: KimiModel, ids: torch.Tensor, steps: int, S: int = 12):
    """Stateful prefill of `ids`, then `steps` greedy decode steps: every step's outputs."""
    B, T = ids.shape
    g = model.get_graph("prefill", True)
    states = zero_states(g, B, S, ids.device)
    pos = torch.zeros(B, dtype=torch.long, device=ids.device)
    outs = model.execute("prefill", True, {"input_ids": ids, "cache_pos": pos, **states})
    history = [outs]
    for _ in range(steps):
        states = dict(zip(g.meta["state_inputs"], outs[1:]))
        pos = pos + ids.shape[1]
        ids = outs[0][:, -1:].argmax(-1)
        outs = model.execute("decode", True, {"input_ids": ids, "cache_pos": pos, **states})
        history.append(outs)
    return history


@pytest.mark.parametrize("pipeline", [None, "default"])
def test_torch_backend_runs_prefill_and_decode_like_the_interpreter(pipeline):
    cfg = config(3)
    ref = load(cfg, pipeline=pipeline, seed=3)
    mod = load(cfg, pipeline=pipeline, seed=3, backend="torch")
    ids = torch.randint(0, cfg.vocab_size, (2, 4))
    check_outputs([mod(ids)], [ref(ids)], "f32")
    for a, b in zip(generate_states(mod, ids, 3), generate_states(ref, ids, 3)):
        check_outputs(a, b, "f32")


def test_torch_backend_can_take_the_triton_kernels_on_cuda():
    triton_backend = pytest.importorskip("kimi_graph.lowering.triton.backend")
    cfg = config(3)
    try:
        model = load(cfg, backend="torch", kernels="triton")
        ids = torch.randint(0, cfg.vocab_size, (1, 3))
        check_outputs([model(ids)], [load(cfg)(ids)], "f32")      # the CPU keeps the references
        for kind in ("kda_fused_recurrent", "grouped_swiglu"):
            assert custom_ops.get_impl(kind, "cuda") is triton_backend.KERNELS[kind][0]
    finally:
        for kind in custom_kinds():
            set_impl(kind, "cuda", None)
    assert custom_ops.get_impl("grouped_swiglu", "cuda") is LOWERING["grouped_swiglu"].static
    with pytest.raises(ValueError, match="kernels must be"):
        load(cfg, backend="torch", kernels="cuda").execute("prefill", False, {})


def test_torch_backend_refuses_bad_input_clearly():
    cfg = config(3)
    with pytest.raises(ValueError, match="unknown option"):
        load(cfg, backend="torch", compil=True).execute("prefill", False, {})
    with pytest.raises(ValueError, match="mode is an Inductor option"):
        load(cfg, backend="torch", compile=True, compile_backend="kimi_graph",
             mode="reduce-overhead").execute("prefill", False, {})
    model = load(cfg, backend="torch")
    with pytest.raises(ValueError, match="out of range"):
        model.execute("prefill", False, {"input_ids": torch.tensor([[0, cfg.vocab_size]])})
    with pytest.raises(IRError, match="expected dtype i64"):
        model.execute("prefill", False, {"input_ids": torch.tensor([[0.0, 1.0]])})
    g = model.get_graph("decode")
    states = zero_states(g, 1, 4)
    with pytest.raises(ValueError, match="cache overflow"):
        model.execute("decode", True, {"input_ids": torch.tensor([[1]]), "cache_pos": torch.tensor([4]),
                                       **states})


# -- the way back: FX -> layer graph, and the "kimi_graph" compile backend ------------------

def test_kimi_graph_backend_is_registered():
    assert "kimi_graph" in torch._dynamo.list_backends()


def test_import_gives_back_the_lowered_graph():
    g, w = graph_and_weights(0, "decode", True, pipeline="default")
    gm = lower(g, w)
    inputs = example_inputs(g, batch=2, cache_len=8)
    args = [inputs[n] for n in g.inputs]
    seen = []
    compiled = torch.compile(gm, backend=make_backend(None, "eager", seen.append), fullgraph=True)
    check_outputs(compiled(*args), gm(*args), "f32")
    (back,) = seen
    assert back.op_counts() == g.op_counts()
    assert set(back.params) == set(g.params)              # HF names, unmangled
    assert set(back.inputs) == set(g.inputs)
    assert back.outputs and len(back.outputs) == len(g.outputs)


def test_kimi_graph_backend_optimizes_our_modules():
    """An unoptimized lowered module compiled with the backend runs the default pipeline:
    the graph it runs has the fused ops, and its outputs match the interpreter's (5e-5: the
    passes reassociate sums)."""
    g, w = graph_and_weights(1, "decode", True)
    gm = lower(g, w)
    inputs = example_inputs(g, batch=2, cache_len=8)
    seen = []
    compiled = torch.compile(gm, backend=make_backend("default", "eager", seen.append), fullgraph=True)
    outs = compiled(*[inputs[n] for n in g.inputs])
    for o, r in zip(outs, run_graph(g, inputs, w)):
        assert rel(o, r) <= 5e-5
    assert {"kda_fused_recurrent", "moe_route", "grouped_swiglu"} <= set(seen[0].op_counts())
    assert "moe_expert" not in seen[0].op_counts()


class UserBlock(torch.nn.Module):
    """A user module written with our op functions (the accepted input besides lower())."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.Parameter(1 + 0.1 * torch.randn(8))
        self.proj = torch.nn.Parameter(torch.randn(8, 8) / 8 ** 0.5)

    def forward(self, x):
        h = kf.rmsnorm(x, self.norm, eps=1e-5)
        return kf.add(x, kf.silu(kf.linear(h, self.proj)))


def test_kimi_graph_backend_takes_user_modules_of_our_ops():
    m, x = UserBlock(), torch.randn(2, 3, 8)
    seen = []
    compiled = torch.compile(m, backend=make_backend("default", "eager", seen.append), fullgraph=True)
    with torch.no_grad():
        assert rel(compiled(x), m(x)) <= 1e-6
    assert {"norm", "proj"} <= {p[1:] for p in seen[0].params}
    assert seen[0].op_counts() == {"add": 1, "linear": 1, "rmsnorm": 1, "silu": 1}


def test_kimi_graph_backend_refuses_other_torch_ops():
    class Foreign(torch.nn.Module):
        def forward(self, x):
            return node_function("silu")(torch.sin(x))

    with pytest.raises(Exception, match="not a kimi_graph op"):
        torch.compile(Foreign(), backend="kimi_graph", fullgraph=True)(torch.randn(3))


def test_import_fx_refuses_dynamic_sizes():
    g, w = graph_and_weights(0, "prefill", False)
    gm = lower(g, w)
    ids = torch.randint(0, config(0).vocab_size, (2, 5))
    torch._dynamo.mark_dynamic(ids, 1)
    with pytest.raises(Exception, match="static shapes"):
        torch.compile(gm, backend=make_backend(None, "eager"), fullgraph=True)(ids)


def test_import_fx_of_a_traced_module_directly():
    """import_fx also reads a lowered module's own FX graph (get_attr weights)."""
    g, w = graph_and_weights(0, "prefill", False)
    gm = lower(g, w)
    ids = torch.randint(0, config(0).vocab_size, (1, 3))
    back, weights = import_fx(gm, [ids])
    assert back.op_counts() == g.op_counts() and set(weights) == {p[1:] for p in g.params}
    check_outputs(run_graph(back, {"input_ids": ids}, weights), run_graph(g, {"input_ids": ids}, w), "f32")
