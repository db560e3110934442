"""`mode="reduce-overhead"` on CUDA: each compiled decode call as one CUDA graph of the whole
step, captured by the executor.

Inductor's own CUDA-graph trees record one graph per compiled function and track every live
tensor of their memory pool between them. Regional compilation calls one compiled function per
layer, each reading the previous one's outputs, and the trees stop there ("tensor in the
cudagraph pool not tracked as outputs", H200, 27 layers). So the executor compiles with
Inductor's graphs off and captures the whole step, every region, itself:

- one graph per call signature (the inputs' shapes, strides and dtypes). A growing cache
  window is a new signature once per window block, not once per token;
- the first call of a signature warms up on the static input buffers (compiles, JITs the
  kernels) and runs eagerly; the second captures, and every call then copies its inputs into
  the static buffers and replays;
- static buffers are shared between signatures (a graph takes the k-th buffer of each
  shape), and all graphs share one memory pool, so memory follows the largest signature;
- the outputs live in the pool and the next replay overwrites them: callers copy them out.
"""
from __future__ import annotations

from typing import Callable

import torch

Signature = tuple[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], ...]


def signature(args) -> Signature:
    return tuple((tuple(a.shape), tuple(a.stride()), a.dtype) for a in args)


class StepGraphs:
    """`fn(*args)` replayed from CUDA graphs, one per signature (see the module docstring)."""

    def __init__(self, fn: Callable, device: torch.device):
        self.fn, self.device = fn, device
        self.pool = torch.cuda.graph_pool_handle()
        self.buffers: dict[tuple, list[torch.Tensor]] = {}
        self.warm: dict[Signature, list[torch.Tensor]] = {}
        self.graphs: dict[Signature, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple]] = {}

    def _static(self, sig: Signature) -> list[torch.Tensor]:
        taken: dict[tuple, int] = {}
        out = []
        for key in sig:
            k = taken[key] = taken.get(key, -1) + 1
            have = self.buffers.setdefault(key, [])
            if k == len(have):
                shape, stride, dtype = key
                have.append(torch.empty_strided(shape, stride, dtype=dtype, device=self.device))
            out.append(have[k])
        return out

    def __call__(self, *args):
        sig = signature(args)
        if sig in self.graphs:
            graph, static, outs = self.graphs[sig]
            for s, a in zip(static, args):
                s.copy_(a)
            graph.replay()
            return outs
        static = self._static(sig)
        for s, a in zip(static, args):
            s.copy_(a)
        if sig not in self.warm:        # warm up: compile and JIT on the very buffers captured
            self.warm[sig] = static
            return self.fn(*static)
        del self.warm[sig]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outs = self.fn(*static)
        except RuntimeError as err:
            raise RuntimeError(f"mode='reduce-overhead': the step could not be captured as a CUDA "
                               f"graph ({err}); use mode=None") from err
        self.graphs[sig] = (graph, static, outs)
        graph.replay()
        return outs
