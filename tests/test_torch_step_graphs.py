"""The torch backend's whole-step CUDA graphs (lowering/torch/step_graphs.py): which call
warms up, which captures and which replays, per signature, and that every call returns its own
inputs' result. On CPU a stand-in graph replays by running the function on the static buffers
and writing into the captured outputs, as a real replay would; on the GPU the same test runs
real CUDA graphs."""
from __future__ import annotations

import contextlib

import pytest
import torch

from kimi_graph.lowering.torch import step_graphs
from kimi_graph.lowering.torch.step_graphs import StepGraphs

CUDA = torch.cuda.is_available()


@pytest.fixture
def graphs(monkeypatch):
    """StepGraphs on CUDA, or on CPU with a stand-in for torch.cuda's graph API."""
    if CUDA:
        return lambda fn: StepGraphs(fn, torch.device("cuda"))
    built: list[StepGraphs] = []

    class Graph:
        def replay(self):
            sg, static, outs = next((sg, st, o) for sg in built for g, st, o in sg.graphs.values() if g is self)
            for o, n in zip(outs, sg.fn(*static)):
                o.copy_(n)

    monkeypatch.setattr(step_graphs.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(step_graphs.torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(step_graphs.torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())

    def build(fn):
        built.append(StepGraphs(fn, torch.device("cpu")))
        return built[-1]
    return build


def test_warm_up_then_capture_then_replay_per_signature(graphs):
    dev = "cuda" if CUDA else "cpu"
    calls = []

    def step(x, state):
        calls.append(x.shape)
        return x * 2 + state.sum(), state + 1

    sg = graphs(step)
    state = torch.zeros(3, device=dev)
    for i in range(5):
        x = torch.full((2, 1), float(i), device=dev)
        out, new = [t.clone() for t in sg(x, state)]
        assert torch.equal(out, x * 2 + state.sum()) and torch.equal(new, state + 1)
        state = new
    # the first call warmed up, the second captured and replayed; a real replay runs no Python
    # (the stand-in's replay does)
    assert len(sg.graphs) == 1 and len(calls) == (2 if CUDA else 6)
    wide = torch.ones(4, 1, device=dev)          # a new signature: its own warm-up and graph
    assert torch.equal(sg(wide, state)[0], wide * 2 + state.sum())
    assert torch.equal(sg(wide, state)[0], wide * 2 + state.sum())
    assert len(sg.graphs) == 2
    # buffers are shared between signatures: the state's buffer serves both graphs
    assert len(sg.buffers[((3,), (1,), torch.float32)]) == 1
