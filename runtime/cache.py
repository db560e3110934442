"""Per-sequence cache slots for the stateful graphs: MLA latent caches and KDA states.

Every state a stateful graph takes (`g.meta["state_inputs"]`) gets one preallocated
storage tensor `[num_slots, ...]` whose shape comes from the graph's input type: "B" becomes
the slot axis, "S" (the MLA caches' sequence axis) the capacity in tokens. A sequence owns
one slot from `allocate` to `free`; `gather`/`scatter` move a batch of slots in and out of
a graph call, cut to a window of the sequence axis so a call attends over the rows in use
rather than the whole capacity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_graph.ir import DTYPE_BYTES, Graph, eval_dim
from kimi_graph.ops import TORCH_DTYPES

SEQ_DIM = "S"      # the sequence axis of the MLA caches
BATCH_DIM = "B"


class CacheError(ValueError):
    """A request the cache cannot hold (no free slot, past capacity) or a bad slot."""


@dataclass(frozen=True)
class StateSpec:
    """One state input as stored per sequence: `shape` without the batch axis, with the
    sequence axis still symbolic ("S") when the state grows with length."""
    name: str            # graph input name without "%", e.g. "cache.l3.latent"
    shape: tuple
    dtype: str

    @property
    def seq_axis(self) -> int | None:
        """Axis of `shape` that grows with tokens, or None for fixed-size states."""
        return self.shape.index(SEQ_DIM) if SEQ_DIM in self.shape else None

    def per_sequence_shape(self, capacity: int) -> tuple[int, ...]:
        return tuple(eval_dim(d, {SEQ_DIM: capacity}) for d in self.shape)

    def nbytes(self, capacity: int) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.per_sequence_shape(capacity):
            n *= d
        return n


def state_specs(g: Graph) -> list[StateSpec]:
    """The state inputs of a stateful graph, in the order its outputs[1:] return them."""
    names = g.meta.get("state_inputs")
    if not g.meta.get("stateful") or names is None:
        raise CacheError(f"graph {g.name!r} is not stateful: it takes no caches or states")
    if len(g.outputs) != 1 + len(names):
        raise CacheError(f"graph {g.name!r} returns {len(g.outputs) - 1} states for "
                         f"{len(names)} state inputs")
    specs = []
    for n in names:
        ty = g.inputs[n]
        if not ty.shape or ty.shape[0] != BATCH_DIM:
            raise CacheError(f"state {n} {ty} must have the batch dim {BATCH_DIM!r} first")
        rest = ty.shape[1:]
        odd = [d for d in rest if isinstance(d, str) and d != SEQ_DIM]
        if odd:
            raise CacheError(f"state {n} {ty}: cannot allocate symbolic dims {odd}")
        specs.append(StateSpec(n.lstrip("%"), rest, ty.dtype))
    return specs


class CacheManager:
    """Preallocated slots for `num_slots` sequences of up to `capacity` tokens each.

    With `allocate=False` nothing is allocated: sizes (`allocation_bytes`,
    `bytes_per_token`, `fixed_bytes_per_sequence`) still answer, which is how the published
    model's cache is accounted without its weights or its memory."""

    def __init__(self, graph: Graph, num_slots: int, capacity: int, *, device="cpu",
                 allocate: bool = True):
        if not isinstance(num_slots, int) or num_slots < 1:
            raise CacheError(f"num_slots must be a positive integer, got {num_slots!r}")
        if not isinstance(capacity, int) or capacity < 1:
            raise CacheError(f"capacity must be a positive number of tokens, got {capacity!r}")
        self.specs = state_specs(graph)
        self.num_slots, self.capacity, self.device = num_slots, capacity, device
        self.storage: dict[str, torch.Tensor] = {}
        if allocate:
            self.storage = {s.name: torch.zeros((num_slots,) + s.per_sequence_shape(capacity),
                                                dtype=TORCH_DTYPES[s.dtype], device=device)
                            for s in self.specs}
        self.lengths = [0] * num_slots      # tokens stored per slot
        self._written = [0] * num_slots     # rows ever written (zeroed again on reuse)
        self._free = list(range(num_slots))
        self._used: set[int] = set()

    # -- sizes ----------------------------------------------------------------
    def allocation_bytes(self) -> dict[str, int]:
        """Bytes each storage tensor takes (allocated or not)."""
        return {s.name: self.num_slots * s.nbytes(self.capacity) for s in self.specs}

    @property
    def bytes_per_token(self) -> int:
        """Bytes one more token of capacity adds to one sequence's slot."""
        return sum(s.nbytes(self.capacity + 1) - s.nbytes(self.capacity) for s in self.specs)

    @property
    def fixed_bytes_per_sequence(self) -> int:
        """Bytes of the states that do not grow with length (KDA state, conv states)."""
        return sum(s.nbytes(self.capacity) for s in self.specs if s.seq_axis is None)

    # -- slots ----------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self, n: int = 1) -> list[int]:
        """Take `n` free slots (lowest first, so a batch gets a contiguous range when it can);
        their states start at zero and their length at 0."""
        if n > len(self._free):
            raise CacheError(f"batch of {n} sequences does not fit the cache: {len(self._free)} "
                             f"of {self.num_slots} slots free")
        self._free.sort()
        slots, self._free = self._free[:n], self._free[n:]
        for s in slots:
            self._reset(s)
            self._used.add(s)
        return slots

    def free(self, slots) -> None:
        for s in ([slots] if isinstance(slots, int) else slots):
            self._check(s)
            self._used.discard(s)
            self._free.append(s)

    def _reset(self, s: int) -> None:
        if self.storage:
            for spec in self.specs:
                t = self.storage[spec.name][s]
                if spec.seq_axis is None:
                    t.zero_()
                elif self._written[s]:
                    t.narrow(spec.seq_axis, 0, self._written[s]).zero_()
        self.lengths[s] = self._written[s] = 0

    def _check(self, s: int) -> None:
        if s not in self._used:
            raise CacheError(f"slot {s} is not allocated")

    def reserve(self, slots: list[int], n: int) -> None:
        """Check that `n` more tokens fit each slot (before running a step)."""
        for s in slots:
            self._check(s)
            if self.lengths[s] + n > self.capacity:
                raise CacheError(f"slot {s} holds {self.lengths[s]} tokens; {n} more exceed the "
                                 f"cache capacity of {self.capacity}")

    def advance(self, slots: list[int], n: int) -> None:
        for s in slots:
            self.lengths[s] += n
            self._written[s] = max(self._written[s], self.lengths[s])

    # -- moving a batch in and out of a graph call ------------------------------
    def window(self, slots: list[int], new_tokens: int, block: int | None) -> int:
        """Sequence rows a call needs: the longest slot after the step, rounded up to
        `block` (fewer distinct shapes for compiled backends), at most the capacity."""
        need = max(self.lengths[s] for s in slots) + new_tokens
        if block:
            need = -(-need // block) * block
        return min(need, self.capacity)

    def _rows(self, slots: list[int]):
        """Index for `slots`: a slice when they are a contiguous ascending run (no copy)."""
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, device=self.device)

    def gather(self, slots: list[int], window: int) -> dict[str, torch.Tensor]:
        """The states of `slots` as graph inputs ([len(slots), ...]), caches cut to `window`."""
        rows = self._rows(slots)
        out = {}
        for spec in self.specs:
            t = self.storage[spec.name]
            if spec.seq_axis is not None:
                t = t.narrow(spec.seq_axis + 1, 0, window)
            out[spec.name] = t[rows] if isinstance(rows, slice) else t.index_select(0, rows)
        return out

    def scatter(self, slots: list[int], window: int, states: list[torch.Tensor]) -> None:
        """Store a graph call's returned states (in `specs` order) back into `slots`."""
        rows = self._rows(slots)
        for spec, new in zip(self.specs, states, strict=True):
            t = self.storage[spec.name]
            if spec.seq_axis is not None:
                t = t.narrow(spec.seq_axis + 1, 0, window)
            if isinstance(rows, slice):
                dst = t[rows]
                if dst.data_ptr() != new.data_ptr():      # a backend may have written in place
                    dst.copy_(new)
            else:
                t.index_copy_(0, rows, new.to(t.dtype))
