"""`kimi-graph inspect --pipeline`: the optimized IR, the before/after table, --json with op
counts, FLOPs and bytes per token before and after, the per-pass IR dumps and the SVG."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from kimi_graph.api import resolve_config
from kimi_graph.cli import main
from kimi_graph.model import build_graph
from kimi_graph.svg import render_svg
from kimi_graph.printer import parse_graph
from kimi_graph.summary import graph_cost
from kimi_graph.verifier import verify

SVG = "{http://www.w3.org/2000/svg}"


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_reports_before_and_after_for_the_published_model(capsys):
    code, out, err = run_main(capsys, "inspect", "kimi-linear-48b-a3b", "--pipeline", "default",
                              "--mode", "decode", "--json", "--context", "4096")
    assert code == 0, err
    p = json.loads(out)["pipeline"]
    before, after = p["before"], p["after"]
    assert p["dims"] == {"B": 1, "T": 1, "S": 4096}
    assert before["op_counts"]["moe_expert"] == 26 * 256 and "moe_expert" not in after["op_counts"]
    assert after["op_counts"]["mla_latent_attention"] == 7 and after["num_ops"] < 900
    # cross-check the numbers against graph_cost on graphs built here
    cfg, _ = resolve_config("kimi-linear-48b-a3b")
    ref = graph_cost(build_graph(cfg, "decode", dtype="bf16"), p["dims"])
    assert before["flops_per_token"] == ref["flops"] and before["bytes_per_token"] == ref["bytes"]
    # decode at 4k context: the decompressed form up-projects 4096 cached rows per MLA layer
    # (2 * S * R * H * (N + V) FLOPs each); the absorbed form does not
    up = 7 * 2 * 4096 * 512 * 32 * 256
    assert before["flops_per_token"] > up > 10 * after["flops_per_token"]
    assert after["bytes_per_token"] < before["bytes_per_token"]
    assert [r["pass"] for r in p["passes"]][0] == "fuse-moe-dispatch"
    assert all(r["num_ops_after"] == sum(r["ops_after"].values()) for r in p["passes"])
    assert set(p["absorb_mla"]) == {f"l{i}.mla" for i in (3, 7, 11, 15, 19, 23, 26)}


def test_text_output_ir_tables_and_ir_dumps(capsys):
    code, out, err = run_main(capsys, "inspect", "tiny", "--pipeline", "canonicalize,fuse-kda-gating,dce",
                              "--dtype", "f32", "--print-ir-after-all")
    assert code == 0, err
    ir, _, rest = out.partition("\n}\n")
    g = parse_graph(ir + "\n}")
    verify(g)
    assert "kda_fused_recurrent" in g.op_counts() and "l2norm" not in g.op_counts()
    assert "fuse-kda-gating" in rest and "kda-gating=2" in rest
    assert "before" in rest and "after" in rest and "kda_fused_recurrent" in rest
    assert err.count("// -----// IR Dump After") == 3
    dumped = err.split("// -----// IR Dump After dce //----- //\n")[1].split("\nwrote")[0]
    verify(parse_graph(dumped))


def test_print_ir_around_named_passes(capsys):
    code, out, err = run_main(capsys, "inspect", "tiny", "--pipeline", "default", "--mode", "decode",
                              "--no-ir", "--print-ir-before", "absorb-mla",
                              "--print-ir-after", "absorb-mla,dce")
    assert code == 0, err
    heads = [ln for ln in err.splitlines() if ln.startswith("// -----// IR Dump")]
    assert heads == ["// -----// IR Dump Before absorb-mla //----- //",
                     "// -----// IR Dump After absorb-mla //----- //",
                     "// -----// IR Dump After dce //----- //"]
    before = parse_graph(err.split(heads[0] + "\n")[1].split("\n// -----//")[0])
    after = parse_graph(err.split(heads[1] + "\n")[1].split("\n// -----//")[0])
    assert "causal_attention" in before.op_counts() and "mla_latent_attention" in after.op_counts()


@pytest.mark.parametrize("layer", [None, 1])
def test_svg_picture(tmp_path, capsys, layer):
    path = tmp_path / "g.svg"
    args = ["inspect", "tiny", "--pipeline", "default", "--mode", "decode", "--no-ir", "--svg", str(path)]
    if layer is not None:
        args += ["--layer", str(layer)]
    code, out, err = run_main(capsys, *args)
    assert code == 0, err
    root = ET.parse(path).getroot()
    texts = [t.text for t in root.iter(SVG + "text")]
    tips = [t.text for t in root.iter(SVG + "title")]
    assert "mla_latent_attention" in texts and "head_matmul" in texts
    if layer == 1:     # layer 1 of tiny is MLA + MoE: only its ops, inputs as ovals
        assert "kda_fused_recurrent" not in texts and "moe_route" in texts
        assert all(not t.startswith("%l3.") for t in tips)
        assert any(e.get("stroke-dasharray") for e in root.iter(SVG + "ellipse"))
    else:
        assert "kda_fused_recurrent" in texts and "embedding" in texts
    # every op box carries its full IR line as a tooltip
    assert any(t.startswith("%l1.mla.attn_latent = mla_latent_attention(") for t in tips)
    width, height = float(root.get("width")), float(root.get("height"))
    assert width > 100 and height > 100


def test_svg_of_a_missing_layer_is_an_error():
    cfg, _ = resolve_config("tiny")
    with pytest.raises(ValueError, match=r"no ops in layer 9; layers: \[0, 1, 2, 3\]"):
        render_svg(build_graph(cfg), layer=9)


@pytest.mark.parametrize("args,message", [
    (["--pipeline", "cse,nope"], "unknown pass 'nope'"),
    (["--pipeline", "chunk-kda{size=3}"], "pass 'chunk-kda' has no option 'size'"),
    (["--layer", "1"], "--layer selects what --svg draws"),
    (["--print-ir-after-all"], "give one"),
    (["--pipeline", "cse", "--print-ir-after", "cse,fold"], "cannot print IR around unknown pass(es) ['fold']"),
])
def test_cli_errors_exit_2(capsys, args, message):
    code, out, err = run_main(capsys, "inspect", "tiny", *args)
    assert code == 2 and message in err and not out
