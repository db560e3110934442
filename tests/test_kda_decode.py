"""KDA's decode step in one launch (lowering/triton/kda_decode.py) through the Triton interpreter,
fp32: the backend's plan takes each KDA layer's conv group, reshapes, f_b / g_b pair and KDA op
into one step; a one-token step launches one kernel a KDA layer and equals the plain kernels
(convs, pair, kda_recurrent_step) step by step, padding rows (slot -1) included, with every
state. Tolerance: rel. error <= 1e-5 (fp32, summation order)."""
from __future__ import annotations

import collections

import pytest
import torch

pytest.importorskip("triton")

import kimi_graph  # noqa: E402
from kimi_graph.lowering.triton import backend, kda_decode  # noqa: E402
from kimi_graph.lowering.triton.gemv import LinearPair  # noqa: E402
from kimi_graph.lowering.triton.targets import TARGETS  # noqa: E402
from kimi_graph.runtime import Engine, SamplingParams  # noqa: E402
from reference_kimi import rel_err  # noqa: E402

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("triton_interpret")


def test_plan_takes_each_kda_layer_into_one_step():
    """The decode graph's KDA layers each one step; the prefill graph's (chunked KDA) untouched."""
    model = kimi_graph.load("tiny", dtype=torch.float32, device="cpu", pipeline="default")
    items = backend.plan(backend.legalize(model.get_graph("decode", True)))
    steps = [i for i in items if isinstance(i, kda_decode.DecodeStep)]
    assert len(steps) == model.config.layer_kinds.count("kda")
    for st in steps:
        assert isinstance(st.parts[0], backend.Convs) and len(st.parts[0].ops) == 3
        assert [p.kind for p in st.parts[1:4]] == ["reshape"] * 3
        assert isinstance(st.parts[4], LinearPair) and st.parts[5].kind == "kda_fused_recurrent"
        assert len(st.outputs) == 6             # o, KDA state, three conv states, the gate
    top = {getattr(i, "kind", type(i).__name__) for i in items}
    assert not {"causal_conv1d", "kda_fused_recurrent", "Convs", "LinearPair"} & top
    prefill = backend.plan(backend.legalize(model.get_graph("prefill", True)))
    assert not [i for i in prefill if isinstance(i, kda_decode.DecodeStep)]


def _script(engine: Engine, launches: collections.Counter) -> list[torch.Tensor]:
    """Ragged prefills, decodes padded to their bucket (slot -1 rows), a slot freed and reused
    -> each step's logits and every state; `launches`: the decode steps' kernels."""
    from kimi_graph.lowering.triton.launches import counting
    from kimi_graph.runtime.graphs import DecodeGraphs
    from kimi_graph.runtime.sampling import Sampler
    engine.graphs = DecodeGraphs(engine, capture=False)
    sampler = Sampler(SamplingParams(temperature=0.0), 3)
    a, b, c = engine.cache.allocate(3)
    out = engine.prefill([a, b, c], [[1, 5, 9, 14], [7, 2], [3]])
    for ids, slots, rows in (([4, 8, 15], [b, a, c], [1, 0, 2]), ([16, 23], [c, a], [2, 0])):
        with counting() as cnt:
            logits, _ = engine.decode_sample(slots, ids, sampler, rows)
        launches.update(k for by in cnt.by_item.values() for k, n in by.items() for _ in range(n))
        out.append(logits.clone())
    engine.cache.free([a])
    (d,) = engine.cache.allocate(1)
    out += engine.prefill([d], [[42, 43]])
    out.append(engine.decode([b, d], [5, 6]).clone())
    return out + [t.flatten().clone() for t in engine.cache.storage.values()]


def test_one_launch_step_equals_the_plain_kernels(kda_mla_checkpoint, monkeypatch):
    model = kimi_graph.load(kda_mla_checkpoint, pipeline="default", backend="triton")
    kw = dict(max_batch=4, max_len=12)
    runs = {}
    cfg = TARGETS["interpret"]["configs"]["kda_recurrent"]
    # both load orders of the one-launch step, its V columns split over 2 programs a head, the plain kernels
    for fused, early, split in ((256, 16, 1), (256, 0, 1), (256, 16, 2), (0, 16, 1)):
        for key, value in (("fused_decode", fused), ("decode_early_rows", early), ("decode_split", split),
                           ("decode_split_rows", 4)):
            monkeypatch.setitem(cfg, key, value)
        launches = collections.Counter()
        runs[fused, early, split] = (_script(Engine(model, **kw), launches), launches)
    (got, one), (late, _), (split, _), (want, plain) = (runs[k] for k in ((256, 16, 1), (256, 0, 1), (256, 16, 2),
                                                                        (0, 16, 1)))
    assert len(got) == len(want) == len(late) == len(split)
    for x, y, z, s in zip(got, want, late, split):
        assert rel_err(x, y) <= TOL and torch.equal(x, z) and rel_err(s, y) <= TOL
    steps = plain["triton.kda_recurrent_step"]      # a KDA layer's steps (each bucket's first runs twice)
    assert steps >= 2 and plain["triton.causal_conv1d_group"] == steps and not plain["triton.kda_decode_step"]
    assert one["triton.kda_decode_step"] == steps
    assert kda_decode.step_spec(2, 8, 8, 8, 4, (0,) * 6, True, "f32", 1.0, 1e-6, "interpret", True, 2).config["NVB"] == 2
    assert not one["triton.kda_recurrent_step"] and not one["triton.causal_conv1d_group"]


def test_a_step_kernel_that_does_not_build_falls_back_to_the_plain_kernels(kda_mla_checkpoint, monkeypatch):
    """A compile failure (raised before the kernel runs) is said once; the step runs its parts."""
    from triton.runtime.errors import OutOfResources
    model = kimi_graph.load(kda_mla_checkpoint, pipeline="default", backend="triton")

    def refuse(spec, grid, *args):
        raise OutOfResources(1 << 20, 1 << 16, "shared memory")
    monkeypatch.setattr(kda_decode, "launch", refuse)
    monkeypatch.setattr(kda_decode, "_UNBUILT", set())
    engine = Engine(model, max_batch=2, max_len=8)
    slots = engine.cache.allocate(2)
    engine.prefill(slots, [[1, 2, 3], [4]])
    with pytest.warns(RuntimeWarning, match="kda_decode_step does not build"):
        got = engine.decode(slots, [5, 6])
    assert len(kda_decode._UNBUILT) == 1 and torch.isfinite(got).all()
