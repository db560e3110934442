"""Per-sequence cache slots for the stateful graphs: MLA latent caches and KDA states.

Every state a stateful graph takes (`g.meta["state_inputs"]`) gets storage shaped by the
graph's input type: "B" becomes the slot axis, "S" (the MLA caches' sequence axis) the
capacity in tokens, or, paged, a pool of fixed-size pages shared by all slots. A sequence
owns one slot from `allocate` to `free`. A backend that aliases states (the triton
backend) gets `views` of the storage and updates it in place; for the others `gather` /
`scatter` move a batch of slots in and out of a graph call, cut to a window of the
sequence axis so a call attends over the rows in use rather than the whole capacity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_graph.ir import DTYPE_BYTES, Graph, eval_dim
from kimi_graph.ops import TORCH_DTYPES

from .views import PagedRows, SlotRows, to_device

SEQ_DIM = "S"      # the sequence axis of the MLA caches
BATCH_DIM = "B"


def runs(slots: list[int]) -> list[tuple[int, int]]:
    """`slots` as ascending [start, end) runs of consecutive indices (sorted, duplicates dropped)."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(slots)):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def zero_all(tensors: list[torch.Tensor]) -> None:
    """Zero `tensors` with one multi-tensor launch per device and dtype (torch._foreach_zero_;
    on CUDA it packs up to ~110 dense tensors a launch), not a launch each: a batch's states
    are zeroed in a number of launches that does not grow with its sequences. (A strided
    tensor would send its whole group down the per-tensor path: it is zeroed on its own.)"""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if not t.is_contiguous():
            t.zero_()
        elif t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        torch._foreach_zero_(group)


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
    for n, out in zip(names, g.outputs[1:]):
        ty = g.inputs[n]
        if g.types[out] != ty:
            raise CacheError(f"graph {g.name!r} takes state {n} as {ty} but returns it as "
                             f"{g.types[out]} ({out})")
        if not ty.shape or ty.shape[0] != BATCH_DIM:
            raise CacheError(f"state {n} {ty} must have the batch dim {BATCH_DIM!r} first")
        rest = ty.shape[1:]
        odd = [d for d in rest if isinstance(d, str) and d != SEQ_DIM]
        if odd:
            raise CacheError(f"state {n} {ty}: cannot allocate symbolic dims {odd}")
        specs.append(StateSpec(n.lstrip("%"), rest, ty.dtype))
    return specs


class CacheManager:
    """Cache storage for `num_slots` sequences of up to `capacity` tokens each.

    Fixed-size states (KDA, conv) get one row per slot. The MLA caches are either
    preallocated (`page_size=None`: `capacity` rows per slot) or paged: a shared pool of
    `num_pages` pages of `page_size` rows (default: as many as preallocation would hold;
    fewer to overcommit), handed to a sequence as it grows and returned when it is freed.
    Page 0 is an all-zero page that fills the window past a sequence's own pages.

    With `allocate=False` nothing is allocated: sizes (`allocation_bytes`,
    `bytes_per_token`, `fixed_bytes_per_sequence`) still answer, which is how the published
    model's cache is accounted without its weights or its memory."""

    def __init__(self, graph: Graph, num_slots: int, capacity: int, *, device="cpu",
                 allocate: bool = True, page_size: int | None = None, num_pages: int | None = None):
        for name, v in (("num_slots", num_slots), ("capacity", capacity), ("page_size", page_size),
                        ("num_pages", num_pages)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise CacheError(f"{name} must be a positive integer, got {v!r}")
        self.specs = state_specs(graph)
        self.num_slots, self.capacity, self.device = num_slots, capacity, device
        self.page_size = page_size
        if page_size is None and num_pages is not None:
            raise CacheError("num_pages needs page_size")
        if page_size is not None:
            bad = [s.name for s in self.specs if s.seq_axis not in (None, 0)]
            if bad:
                raise CacheError(f"paged storage needs the sequence axis first; not so in {bad}")
            num_pages = num_pages or num_slots * -(-capacity // page_size)
        self.num_pages = num_pages
        self.storage: dict[str, torch.Tensor] = {}
        if allocate:
            self.storage = {s.name: torch.zeros(self._storage_shape(s), dtype=TORCH_DTYPES[s.dtype],
                                                device=device) for s in self.specs}
        self.lengths = [0] * num_slots      # tokens stored per slot
        self._written = [0] * num_slots     # rows ever written (zeroed again on reuse)
        self._free = list(range(num_slots))
        self._used: set[int] = set()
        self.pages: list[list[int]] = [[] for _ in range(num_slots)]   # page table per slot
        self._free_pages = list(range(1, (num_pages or 0) + 1))
        # the page tables on the device, for in-place views (unpaged: page s is slot s)
        if page_size:
            self.table = torch.zeros(num_slots, self.pages_for(capacity), dtype=torch.int32, device=device)
        else:
            self.table = torch.arange(num_slots, dtype=torch.int32, device=device).view(-1, 1)
        self._slots_key, self._slots_dev = None, None

    def _storage_shape(self, s: StateSpec) -> tuple[int, ...]:
        if self.page_size is not None and s.seq_axis is not None:
            return (self.num_pages + 1,) + s.per_sequence_shape(self.page_size)
        return (self.num_slots,) + s.per_sequence_shape(self.capacity)

    # -- sizes ----------------------------------------------------------------
    def allocation_bytes(self) -> dict[str, int]:
        """Bytes each storage tensor takes (allocated or not)."""
        out = {}
        for s in self.specs:
            n = DTYPE_BYTES[s.dtype]
            for d in self._storage_shape(s):
                n *= d
            out[s.name] = n
        return out

    @property
    def bytes_per_token(self) -> int:
        """Bytes one more token adds to one sequence's caches."""
        return sum(s.nbytes(self.capacity + 1) - s.nbytes(self.capacity) for s in self.specs)

    @property
    def fixed_bytes_per_sequence(self) -> int:
        """Bytes of the states that do not grow with length (KDA state, conv states)."""
        return sum(s.nbytes(self.capacity) for s in self.specs if s.seq_axis is None)

    # -- slots and pages --------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def free_pages(self) -> int | None:
        return len(self._free_pages) if self.page_size else None

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size) if self.page_size else 0

    def allocate(self, n: int = 1) -> list[int]:
        """Take `n` free slots (lowest first, so a batch gets a contiguous range when it can);
        their states start at zero and their length at 0."""
        if n > len(self._free):
            raise CacheError(f"batch of {n} sequences does not fit the cache: {len(self._free)} "
                             f"of {self.num_slots} slots free")
        self._free.sort()
        slots, self._free = self._free[:n], self._free[n:]
        self._reset(slots)
        self._used.update(slots)
        return slots

    def free(self, slots) -> None:
        slots = [slots] if isinstance(slots, int) else list(slots)
        for s in slots:
            self._check(s)
        if len(set(slots)) != len(slots):
            raise CacheError(f"slots {sorted(s for s in set(slots) if slots.count(s) > 1)} freed twice")
        paged = [s for s in slots if self.page_size and self.pages[s]]
        zero_all([self.table[a:b] for a, b in runs(paged)])
        for s in slots:
            self._used.discard(s)
            self._free.append(s)
            self._free_pages += self.pages[s]
            self.pages[s] = []

    def _reset(self, slots: list[int]) -> None:
        """Zero the states of `slots` (and the cache rows they wrote before, unpaged): a few
        launches for the whole batch, not one per slot and state (see zero_all)."""
        if self.storage:
            rows = []
            for spec in self.specs:
                t = self.storage[spec.name]
                if spec.seq_axis is None:
                    rows += [t[a:b] for a, b in runs(slots)]
                elif not self.page_size:
                    rows += [t[s].narrow(spec.seq_axis, 0, self._written[s]) for s in slots if self._written[s]]
            zero_all(rows)
        for s in slots:
            self.lengths[s] = self._written[s] = 0

    def _check(self, s: int) -> None:
        if s not in self._used:
            raise CacheError(f"slot {s} is not allocated")

    def reserve(self, slots: list[int], n: int) -> None:
        """Make room for `n` more tokens in each slot (before running a step): check the
        capacity, and with paging take the pages the step writes into (zeroed)."""
        need = 0
        for s in slots:
            self._check(s)
            if self.lengths[s] + n > self.capacity:
                raise CacheError(f"slot {s} holds {self.lengths[s]} tokens; {n} more exceed the "
                                 f"cache capacity of {self.capacity}")
            need += max(0, self.pages_for(self.lengths[s] + n) - len(self.pages[s]))
        if need > len(self._free_pages):
            raise CacheError(f"out of cache pages: {need} more needed, {len(self._free_pages)} of "
                             f"{self.num_pages} free")
        taken = []                          # (slot, column of its table, page)
        for s in slots:
            for _ in range(self.pages_for(self.lengths[s] + n) - len(self.pages[s])):
                taken.append((s, len(self.pages[s]), self._free_pages.pop()))
                self.pages[s].append(taken[-1][2])
        if taken:                           # one table write and a few zeroing launches per step
            at = self.device_ints([v for col in zip(*taken) for v in col]).view(3, -1)
            self.table.index_put_((at[0], at[1]), at[2].to(self.table.dtype))
            zero_all([self.storage[spec.name][p] for spec in self.specs if spec.seq_axis is not None
                      and self.storage for _, _, p in taken])

    def advance(self, slots: list[int], n: int) -> None:
        for s in slots:
            self.lengths[s] += n
            self._written[s] = max(self._written[s], self.lengths[s])

    # -- a batch's states in place (backends that alias states) ----------------
    def device_ints(self, values: list[int]) -> torch.Tensor:
        """int64 values on the cache's device, copied without waiting for the device."""
        return to_device(torch.tensor(values, dtype=torch.int64), self.device)

    def slot_index(self, slots: list[int]) -> torch.Tensor:
        """`slots` as a device tensor (kept while the batch stays the same)."""
        key = tuple(slots)
        if key != self._slots_key:
            self._slots_key, self._slots_dev = key, self.device_ints(slots)
        return self._slots_dev

    def positions(self, slots: list[int]) -> torch.Tensor:
        """Each slot's length (where its next token goes) as a device tensor [B]."""
        return self.device_ints([self.lengths[s] for s in slots])

    def views(self, slots: list[int], window: int, index: torch.Tensor | None = None
              ) -> dict[str, SlotRows | PagedRows]:
        """The states of `slots` as in-place views (runtime/views.py), caches seen `window`
        rows long; `index`: the slots as a device tensor (default: made from `slots`)."""
        idx = self.slot_index(slots) if index is None else index
        out, memo = {}, {}
        for spec in self.specs:
            t = self.storage[spec.name]
            if spec.seq_axis is None:
                out[spec.name] = SlotRows(t, idx)
            elif spec.seq_axis == 0:
                out[spec.name] = PagedRows(t, idx, self.table, window, self.capacity, memo)
            else:
                raise CacheError(f"state {spec.name}: in-place views need the sequence axis first")
        return out

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

    def _page_rows(self, slots: list[int], pos: torch.Tensor) -> torch.Tensor:
        """Flat pool rows [B, N] of sequence positions `pos` [B, N]; page 0 past a slot's pages."""
        P = self.page_size
        width = max(1, -(-(int(pos.max()) + 1) // P))
        table = torch.zeros(len(slots), width, dtype=torch.int64)
        for b, s in enumerate(slots):
            pages = self.pages[s][:width]
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int64)
        table = table.to(self.device)
        return table.gather(1, pos // P) * P + pos % P

    def gather(self, slots: list[int], window: int) -> dict[str, torch.Tensor]:
        """The states of `slots` as graph inputs ([len(slots), ...]), caches cut to `window`."""
        rows = self._rows(slots)
        paged = None
        if self.page_size:
            pos = torch.arange(window, device=self.device).expand(len(slots), window)
            paged = self._page_rows(slots, pos)
        out = {}
        for spec in self.specs:
            t = self.storage[spec.name]
            if spec.seq_axis is not None and paged is not None:
                out[spec.name] = t.flatten(0, 1)[paged]
                continue
            if spec.seq_axis is not None:
                t = t.narrow(spec.seq_axis + 1, 0, window)
            out[spec.name] = t[rows] if isinstance(rows, slice) else t.index_select(0, rows)
        return out

    def scatter(self, slots: list[int], window: int, states: list[torch.Tensor],
                new_tokens: int) -> None:
        """Store a graph call's returned states (in `specs` order) back into `slots`. Paged
        caches take only the `new_tokens` rows written at each slot's position (the graph
        writes nothing else: `cache_write` at cache_pos)."""
        rows = self._rows(slots)
        if self.page_size:
            start = torch.tensor([self.lengths[s] for s in slots], device=self.device)
            pos = start.view(-1, 1) + torch.arange(new_tokens, device=self.device).view(1, -1)
            flat = self._page_rows(slots, pos).flatten()
            batch = torch.arange(len(slots), device=self.device).view(-1, 1)
        for spec, new in zip(self.specs, states, strict=True):
            t = self.storage[spec.name]
            if spec.seq_axis is not None and self.page_size:
                t.flatten(0, 1).index_copy_(0, flat, new[batch, pos].flatten(0, 1).to(t.dtype))
                continue
            if spec.seq_axis is not None:
                t = t.narrow(spec.seq_axis + 1, 0, window)
            if isinstance(rows, slice):
                dst = t[rows]
                if dst.data_ptr() != new.data_ptr():      # a backend may have written in place
                    dst.copy_(new)
            else:
                t.index_copy_(0, rows, new.to(t.dtype))

    # -- one slot's contents copied out and back (prefix caching) ------------------
    def _seq_rows(self, slot: int, n: int):
        """Flat pool rows of `slot`'s first n positions (paged), else None."""
        if not self.page_size:
            return None
        return self._page_rows([slot], torch.arange(n, device=self.device).view(1, n))[0]

    def save(self, slot: int) -> dict[str, torch.Tensor]:
        """A copy of what `slot` holds: its fixed-size states and its cache rows up to its
        length (`restore` puts it into another slot)."""
        self._check(slot)
        n = self.lengths[slot]
        rows = self._seq_rows(slot, n)
        out = {}
        for spec in self.specs:
            t = self.storage[spec.name]
            if spec.seq_axis is None:
                out[spec.name] = t[slot].clone()
            elif rows is not None:
                out[spec.name] = t.flatten(0, 1)[rows]
            else:
                out[spec.name] = t[slot].narrow(spec.seq_axis, 0, n).clone()
        return out

    def restore(self, slot: int, saved: dict[str, torch.Tensor], length: int) -> None:
        """Make the empty `slot` hold `saved`, what `save` took from a slot of `length` tokens."""
        self._check(slot)
        if self.lengths[slot]:
            raise CacheError(f"slot {slot} is not empty: it holds {self.lengths[slot]} tokens")
        self.reserve([slot], length)
        rows = self._seq_rows(slot, length)
        for spec in self.specs:
            t, src = self.storage[spec.name], saved[spec.name]
            if spec.seq_axis is None:
                t[slot].copy_(src)
            elif rows is not None:
                t.flatten(0, 1).index_copy_(0, rows, src)
            else:
                t[slot].narrow(spec.seq_axis, 0, length).copy_(src)
        self.advance([slot], length)
