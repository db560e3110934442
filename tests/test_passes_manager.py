"""The pass manager: pipeline text, option checking, verification after every pass,
instrumentation, and `kimi_graph.load(..., pipeline=...)`."""
from __future__ import annotations

import pytest
import torch

import kimi_graph
from kimi_graph.api import resolve_config
from kimi_graph.model import build_graph
from kimi_graph.passes import (DEFAULT_PIPELINE, PASSES, Pass, PassError, PassManager,
                               format_timing, parse_pipeline, register_pass, run_pipeline)
from kimi_graph.printer import print_graph


def tiny(mode="prefill"):
    cfg, _ = resolve_config("tiny")
    return build_graph(cfg, mode, dtype="f32")


def test_pipeline_text_and_named_default():
    steps = parse_pipeline(" canonicalize , chunk-kda{chunk-size=16}, absorb-mla{mode=fold},cse ")
    assert steps == [("canonicalize", {}), ("chunk-kda", {"chunk-size": 16}),
                     ("absorb-mla", {"mode": "fold"}), ("cse", {})]
    assert parse_pipeline("default") == parse_pipeline(DEFAULT_PIPELINE)
    assert parse_pipeline("default,dce")[-1] == ("dce", {})
    assert parse_pipeline("") == []
    issue = "canonicalize,fuse-kda-gating,chunk-kda{chunk-size=64},absorb-mla,fuse-moe-dispatch,cse,dce"
    assert [n for n, _ in parse_pipeline(issue)] == issue.replace("{chunk-size=64}", "").split(",")


@pytest.mark.parametrize("text,message", [
    ("canonicalise", "unknown pass 'canonicalise'; passes: absorb-mla, canonicalize"),
    ("chunk-kda{chunk=8}", "pass 'chunk-kda' has no option 'chunk'; its options: chunk-size"),
    ("chunk-kda{chunk-size=big}", "option chunk-size='big' is not a int"),
    ("chunk-kda{chunk-size}", "needs the form key=value"),
    ("absorb-mla{mode=sideways}", "choose one of auto, per-head, fold"),
    ("cse{x=1}", "pass 'cse' has no option 'x'; its options: none"),
    ("chunk-kda{chunk-size=8", "unbalanced '{'"),
    ("cse}", "unbalanced '}'"),
    ("default{x=1}", "named pipeline 'default' takes no options"),
])
def test_bad_pipelines_are_clear_errors(text, message):
    with pytest.raises(PassError) as e:
        parse_pipeline(text)
    assert message in str(e.value)


def test_bad_option_value_fails_when_run():
    with pytest.raises(ValueError, match="chunk-size must be >= 1"):
        run_pipeline(tiny(), "fuse-kda-gating,chunk-kda{chunk-size=0}")


def test_instrumentation_records_and_prints_ir():
    printed = []
    seen = []
    pm = PassManager("canonicalize,fuse-kda-gating,dce", print_ir_before=["fuse-kda-gating"],
                     print_ir_after="all", out=printed.append,
                     after_pass=lambda name, g, rec: seen.append((name, len(g))))
    g = tiny()
    out = pm.run(g)
    assert [r.name for r in pm.records] == ["canonicalize", "fuse-kda-gating", "dce"]
    assert [s[0] for s in seen] == ["canonicalize", "fuse-kda-gating", "dce"]
    rec = pm.records[1]
    assert rec.ops_before["kda_recurrent"] == 2 and rec.ops_after.get("kda_recurrent", 0) == 0
    assert rec.ops_after["kda_fused_recurrent"] == 2 and rec.stats["kda-gating"] == 2
    assert rec.seconds >= 0 and rec.verify_seconds >= 0
    heads = [p.split("\n", 1)[0] for p in printed]
    assert heads == ["// -----// IR Dump After canonicalize //----- //",
                     "// -----// IR Dump Before fuse-kda-gating //----- //",
                     "// -----// IR Dump After fuse-kda-gating //----- //",
                     "// -----// IR Dump After dce //----- //"]
    assert printed[1].split("\n", 1)[1].startswith("graph @prefill(")
    assert printed[-1].endswith(print_graph(out))
    table = format_timing(pm.records)
    assert "fuse-kda-gating" in table and "kda-gating=2" in table and "total" in table
    assert rec.as_dict()["num_ops_before"] == sum(rec.ops_before.values())
    # the input graph is left as it was
    assert g.op_counts()["kda_recurrent"] == 2
    with pytest.raises(PassError, match="unknown pass"):
        PassManager("cse", print_ir_after=["nope"])


def test_verifier_runs_after_every_pass_and_names_the_culprit():
    @register_pass
    class Breaker(Pass):
        name = "test-breaker"

        def run(self, g, ctx):
            op = next(o for o in g.ops() if o.kind == "rmsnorm")
            op.attrs["eps"] = "tiny"                   # fine for the pass, not for rmsnorm
            op.inputs[1] = "@no.such.param"
    try:
        with pytest.raises(PassError, match="IR after pass test-breaker does not verify"):
            run_pipeline(tiny(), "canonicalize,test-breaker,dce")
        run_pipeline(tiny(), "test-breaker", verify=False)      # opt-out works
    finally:
        del PASSES["test-breaker"]


def test_load_with_pipeline_runs_the_optimized_graph():
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    plain = kimi_graph.load("tiny", seed=3)
    opt = kimi_graph.load("tiny", seed=3, pipeline="default")
    g = opt.graph
    assert "kda_fused_chunk" in g.op_counts() and "moe_expert" not in g.op_counts()
    assert "moe_expert" in plain.graph.op_counts()
    a, b = plain(ids), opt(ids)
    assert float((a - b).norm() / a.norm()) < 5e-5
    # the packed experts are new weights under the names printed in the IR
    packed = [p[1:] for p in g.params if p.endswith("experts.w13")]
    assert packed and all(name in opt.weights for name in packed)
    assert opt.weights[packed[0]].shape == g.params["@" + packed[0]].shape


def test_pipeline_is_idempotent_and_graphs_share_folded_weights():
    model = kimi_graph.load("tiny", seed=1, pipeline="default")
    pre = model.get_graph("prefill")
    dec = model.get_graph("decode")
    n = len(model.weights)
    # a second graph of the same model folds to the same names and tensors: no copies
    assert not any(".folded" in k for k in model.weights)
    assert {p for p in pre.params if "experts.w" in p} == {p for p in dec.params if "experts.w" in p}
    again = run_pipeline(dec, "default", weights=model.weights)
    assert print_graph(again) == print_graph(dec) and len(model.weights) == n
