"""The whole decode step as one CUDA graph: embedding, every layer, the final norm, lm_head
and the sampling of the next token, captured once per batch-size bucket and replayed.

A batch pads to its bucket (1, 2, 4, ..., 256; past that, multiples of 256). Padding rows
carry slot -1: every state kernel reads zeros for them and writes nothing, so they never
touch a real sequence. The graph's inputs are static device buffers written before each
replay (token ids, slot indices, positions, sampling seeds and parameters: one
asynchronous copy per dtype); the caches are in-place views over the engine's storage seen
at their full capacity, and the kernels read each sequence's length from its position, so
contexts grow with no recapture. Two graphs per bucket at most: greedy (argmax) and
sampling (filtering, Gumbel-max).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample
from .views import copy_from_host

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PAD_SLOT = -1


def bucket(n: int) -> int:
    """The batch size a batch of `n` sequences pads to."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // BUCKETS[-1]) * BUCKETS[-1]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None      # None: run eagerly (capture=False)
    ints: torch.Tensor          # [6, Bp] int64: ids, slots, positions, seeds, steps, top_k
    floats: torch.Tensor        # [2, Bp] float32: temperature, top_p
    logits: torch.Tensor        # [Bp, V] (graph output)
    tokens: torch.Tensor        # [Bp] int64 (graph output)


class DecodeGraphs:
    """Captured decode steps of one Engine (see the module docstring)."""

    def __init__(self, engine, capture: bool = True):
        """`capture=False` runs the padded step eagerly from the same static buffers (what
        the CPU tests check: padding rows, buffers, bucket handling; no CUDA needed)."""
        self.engine, self.enabled = engine, capture
        self.graphs: dict[tuple[int, bool], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def _step(self, ints: torch.Tensor, floats: torch.Tensor, greedy: bool):
        e = self.engine
        Bp = ints.shape[1]
        inputs = {"input_ids": ints[0].view(Bp, 1), "cache_pos": ints[2]}
        inputs.update(e.cache.views([], e.cache.capacity, index=ints[1]))
        logits = e.model.execute("decode", True, inputs)[0][:, 0]
        return logits, sample(logits, ints[3], ints[4], floats[0], ints[5], floats[1], greedy)

    def capture(self, Bp: int, greedy: bool) -> _Captured:
        """Warm the kernels up (padding rows only: no state changes), then capture."""
        dev = self.engine.model.device
        ints = torch.zeros(6, Bp, dtype=torch.int64, device=dev)
        ints[1] = PAD_SLOT
        floats = torch.ones(2, Bp, dtype=torch.float32, device=dev)
        if not self.enabled:
            return _Captured(None, ints, floats, *self._step(ints, floats, greedy))
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(ints, floats, greedy)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits, tokens = self._step(ints, floats, greedy)
        except RuntimeError as err:
            raise RuntimeError(f"cuda_graphs=True: the decode step (batch {Bp}) could not be captured "
                               f"as a CUDA graph: {err}") from err
        return _Captured(graph, ints, floats, logits, tokens)

    def capture_all(self, batch_sizes: list[int], greedy: bool = True) -> None:
        """Capture ahead of time the buckets of `batch_sizes` (not yet captured)."""
        for Bp in sorted({bucket(n) for n in batch_sizes}):
            if (Bp, greedy) not in self.graphs:
                self.graphs[(Bp, greedy)] = self.capture(Bp, greedy)

    def run(self, slots: list[int], ids, sampler, rows: list[int]):
        """Replay the step for `slots` fed `ids` (a list, or a [B] int64 tensor on the device) ->
        (logits [B, V], tokens [B]) as views of the graph's outputs (valid until the next replay
        of the same bucket)."""
        B, Bp = len(slots), bucket(len(slots))
        on_device = ids if isinstance(ids, torch.Tensor) else None
        ids = [0] * B if on_device is not None else ids
        key = (Bp, sampler.params.greedy)
        if key not in self.graphs:
            self.graphs[key] = self.capture(*key)
        c = self.graphs[key]
        lengths = self.engine.cache.lengths
        s_ints, s_floats = sampler.inputs(rows)
        pad = Bp - B
        ints = (ids + [0] * pad + slots + [PAD_SLOT] * pad + [lengths[s] for s in slots] + [0] * pad
                + s_ints[:B] + [0] * pad + s_ints[B:2 * B] + [0] * pad + s_ints[2 * B:] + [0] * pad)
        floats = s_floats[:B] + [0.0] * pad + s_floats[B:] + [1.0] * pad
        copy_from_host(c.ints, torch.tensor(ints, dtype=torch.int64).view(6, Bp))
        copy_from_host(c.floats, torch.tensor(floats, dtype=torch.float32).view(2, Bp))
        if on_device is not None:           # behind the host copy, in stream order
            c.ints[0, :B].copy_(on_device)
        sampler.advance(rows)
        if c.graph is None:
            c.logits, c.tokens = self._step(c.ints, c.floats, key[1])
        else:
            c.graph.replay()
        return c.logits[:B], c.tokens[:B]
