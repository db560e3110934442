"""The IR: types and dims, graph construction and mutation, the verifier's errors (each names
the op and the value), and the printer/parser round trip on tiny and published graphs."""
from __future__ import annotations

import pytest

from kimi_graph import IRError, VerifyError, verify
from kimi_graph.api import resolve_config
from kimi_graph.builder import GraphBuilder
from kimi_graph.ir import TensorType, eval_dim
from kimi_graph.model import build_graph
from kimi_graph.printer import parse_graph, print_graph, structurally_equal


def small():
    """x [B, 4] -> linear(@w [3, 4]) -> %y -> silu -> %z -> silu -> %out."""
    b = GraphBuilder("small")
    x = b.input("x", ("B", 4), "f32")
    y = b("linear", x, b.param("w", (3, 4), "f32"), name="y")
    z = b("silu", y, name="z")
    b.output(b("silu", z, name="out"))
    return b.graph


def verify_errors(g) -> str:
    with pytest.raises(VerifyError) as e:
        verify(g)
    return str(e.value)


# -- types and dims -------------------------------------------------------------------------

def test_types_and_dims():
    t = TensorType(("B", "T*8", 16), "bf16")
    assert str(t) == "tensor<B x T*8 x 16 x bf16>"
    assert t.numel({"B": 2, "T": 3}) == 2 * 24 * 16 and t.nbytes({"B": 2, "T": 3}) == 2 * 2 * 24 * 16
    assert eval_dim("S+1", {"S": 4}) == 5 and eval_dim("B*T-2", {"B": 2, "T": 3}) == 4
    with pytest.raises(IRError, match="'T' has no value"):
        eval_dim("B*T", {"B": 1})
    with pytest.raises(IRError, match="unknown dtype"):
        TensorType((1,), "f8")
    with pytest.raises(IRError, match="bad dim"):
        TensorType((-1,), "f32")


def test_graph_queries_and_mutation():
    g = small()
    verify(g)
    assert [o.kind for o in g.ops()] == ["linear", "silu", "silu"]
    assert [o.outputs[0] for o in g.users("%y")] == ["%z"]
    assert g.defining_op("%z").kind == "silu" and g.defining_op("%x") is None
    assert g.op_counts() == {"linear": 1, "silu": 2}
    h = g.copy()
    h.replace_uses("%z", "%y")          # %out = silu(%y); the middle silu is now dead
    h.remove_op(h.defining_op("%z").id)
    verify(h)
    assert len(h) == 2 and len(g) == 3 and g.defining_op("%out").inputs == ["%z"]
    with pytest.raises(IRError, match="defined twice"):
        g.add_op("silu", ["%x"], [g.types["%x"]], out_names=["%z"])
    with pytest.raises(IRError, match="operand %nope is not defined"):
        g.add_op("silu", ["%nope"], [g.types["%x"]])


def test_replace_uses_keeps_the_edge_of_another_result():
    """A user reading two results of one op keeps its def-use edge when one is replaced."""
    b = GraphBuilder("two")
    x = b.input("x", ("B", 2, 2), "f32")
    y, state = b.emit("causal_conv1d", x, b.param("w", (2, 1, 3), "f32"), name="c")   # both [B, 2, 2]
    s = b("silu", x, name="s")
    b.output(b("add", y, state, name="z"))
    g = b.graph
    g.replace_uses(y, s)
    assert g.defining_op("%z").inputs == ["%s", state]
    verify(g)
    assert [o.kind for o in g.ops()] == ["causal_conv1d", "silu", "add"]


# -- the verifier: one test per class of error ----------------------------------------------

def test_verifier_undefined_operand():
    g = small()
    g.remove_op(g.defining_op("%y").id)      # %z's operand is gone
    msg = verify_errors(g)
    assert "silu#" in msg and "(%z)" in msg and "operand %y is not defined" in msg


def test_verifier_undeclared_parameter():
    g = small()
    g.remove_param("@w")
    msg = verify_errors(g)
    assert "linear#" in msg and "(%y)" in msg and "parameter @w is not declared" in msg


def test_verifier_result_type_mismatch():
    g = small()
    g.types["%z"] = TensorType(("B", 5), "f32")
    msg = verify_errors(g)
    assert "silu#" in msg and "result %z is typed tensor<B x 5 x f32> but the op gives tensor<B x 3 x f32>" in msg


def test_verifier_operand_type_mismatch():
    g = small()
    g.params["@w"] = g.types["@w"] = TensorType((3, 5), "f32")
    msg = verify_errors(g)
    assert "linear#" in msg and "(%y)" in msg and "@w: tensor<3 x 5 x f32>" in msg
    assert "does not match weight" in msg
    g = small()
    g.types["%y"] = TensorType(("B", 3), "i64")      # silu of an integer tensor
    msg = verify_errors(g)
    assert "(%z) on (%y: tensor<B x 3 x i64>)" in msg and "expects a float tensor" in msg


def test_verifier_cycle():
    g = small()
    g.replace_uses("%y", "%out")             # %z = silu(%out), %out = silu(%z)
    msg = verify_errors(g)
    assert "cycle:" in msg and "-(%out)->" in msg and "-(%z)->" in msg and "silu#" in msg


def test_verifier_double_definition():
    g = small()
    g.defining_op("%out").outputs = ["%z"]    # a second op claims %z
    msg = verify_errors(g)
    assert "result %z is defined by another op too" in msg and "silu#" in msg
    g = small()
    g.defining_op("%y").outputs = ["%x"]      # an op result shadows a graph input
    assert "result %x redefines a graph input or parameter" in verify_errors(g)


def test_verifier_signature_errors():
    g = small()
    g.defining_op("%z").kind = "no_such_op"
    assert "no_such_op#" in verify_errors(g) and "unknown op 'no_such_op'" in verify_errors(g)
    g = small()
    g.defining_op("%z").attrs["bogus"] = 1
    assert "unknown attribute(s) ['bogus']" in verify_errors(g)
    g = small()
    g.defining_op("%z").inputs.append("%x")
    assert "silu: takes operands (x), got 2" in verify_errors(g)
    g = small()
    g.outputs.append("%ghost")
    assert "graph output %ghost is not defined" in verify_errors(g)


# -- printer / parser ------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny", "kimi-linear-48b-a3b"])
@pytest.mark.parametrize("mode,stateful", [("prefill", False), ("prefill", True), ("decode", True)])
def test_print_parse_round_trip(model, mode, stateful):
    cfg, _ = resolve_config(model)
    g = build_graph(cfg, mode, stateful=stateful, dtype="bf16" if model != "tiny" else "f32")
    verify(g)
    text = print_graph(g)
    h = parse_graph(text)
    assert structurally_equal(g, h)
    assert h.meta == g.meta and h.types == g.types and h.name == g.name
    assert print_graph(h) == text
    verify(h)


def test_structurally_equal_sees_differences():
    g, h = small(), small()
    assert structurally_equal(g, h)
    h.defining_op("%z").kind = "sigmoid"
    assert not structurally_equal(g, h)
    h = small()
    h.types["%out"] = TensorType(("B", 3), "f64")
    assert not structurally_equal(g, h)


def test_parser_errors_name_the_line():
    text = print_graph(small())
    with pytest.raises(IRError, match="empty IR text"):
        parse_graph("")
    with pytest.raises(IRError, match="line 1: expected 'graph @name"):
        parse_graph("grph @x() -> () {")
    bad = text.replace("= silu(%y)", "= silu(%undefined)")
    with pytest.raises(IRError, match=r"line \d+: silu: operand %undefined is not defined"):
        parse_graph(bad)
    with pytest.raises(IRError, match="cannot parse op"):
        parse_graph(text.replace(" = silu(%y)", " silu %y"))
    with pytest.raises(IRError, match="bad type"):
        parse_graph(text.replace("tensor<3 x 4 x f32>", "tensor[3, 4]"))
    with pytest.raises(IRError, match="never defined"):
        parse_graph(text.replace("-> (%out)", "-> (%gone)").replace("return %out", "return %gone"))
