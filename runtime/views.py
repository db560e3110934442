"""In-place state views: how a backend that aliases state outputs to their inputs receives
the engine's storage instead of per-call copies (see ARCHITECTURE.md, Principles).

A view stands where the graph expects a state input [B, ...]; it carries the engine's whole
storage plus the device tensors that locate each batch row in it. A backend's kernels read
and write through it and return the same view as the state output, so a step moves no
cache: nothing is gathered before the call nor scattered after it.

- `SlotRows`: fixed-size states (KDA state, conv states); batch row b is storage[slots[b]].
- `PagedRows`: sequence caches ([B, S, C] in the graph); position p of batch row b is row
  `table[slots[b], p // page_size] * page_size + p % page_size` of storage viewed as [-1, C].
  Unpaged storage [num_slots, capacity, C] is the same with one page of `capacity` rows per
  slot (table[s, 0] = s).

Ops that do not understand views get `dense()`: a [B, S, C] copy of the rows in use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class _View:
    """What a graph input needs to look like: shape, dtype, device, dim()."""
    storage: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def dim(self) -> int:
        return len(self.shape)


@dataclass(eq=False)
class SlotRows(_View):
    storage: torch.Tensor       # [num_slots, ...]
    slots: torch.Tensor         # [B] int64 on the storage's device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.slots.shape[0],) + tuple(self.storage.shape[1:]))

    def dense(self) -> torch.Tensor:
        return self.storage.index_select(0, self.slots)


@dataclass(eq=False)
class PagedRows(_View):
    storage: torch.Tensor       # [pages, page_size, C]
    slots: torch.Tensor         # [B] int64
    table: torch.Tensor         # [num_slots, pages per slot] int32: page of each block of positions
    window: int                 # S as the graph sees it: positions 0 .. window-1
    capacity: int               # the most positions a slot can hold (bounds kernel grids)
    # shared by the views of one call (CacheManager.views): the storage rows `dense` reads,
    # computed once for every cache of the call rather than once per cache
    memo: dict = field(default_factory=dict, repr=False)

    @property
    def page_size(self) -> int:
        return self.storage.shape[1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.slots.shape[0], self.window, self.storage.shape[2]))

    def rows(self, pos: torch.Tensor) -> torch.Tensor:
        """Flat storage rows of positions `pos` [B, N] (long)."""
        P = self.page_size
        pages = self.table.index_select(0, self.slots).long().gather(1, pos // P)
        return pages * P + pos % P

    def dense(self) -> torch.Tensor:
        """[B, window, C]: the rows in use (rows past a sequence's pages read its table's
        page, masked by every consumer as positions past the sequence's end)."""
        key = ("dense", self.window, self.page_size, self.device, id(self.slots), id(self.table))
        rows = self.memo.get(key)
        if rows is None:
            B = self.slots.shape[0]
            pos = torch.arange(self.window, device=self.device).expand(B, self.window)
            rows = self.memo[key] = self.rows(pos)
        return self.storage.flatten(0, 1)[rows]

    def write(self, new: torch.Tensor, pos: torch.Tensor) -> None:
        """Rows new [B, T, C] at positions pos[b] + t (the torch form of the write kernel)."""
        T = new.shape[1]
        at = pos.view(-1, 1).long() + torch.arange(T, device=self.device).view(1, -1)
        self.storage.flatten(0, 1).index_copy_(0, self.rows(at).flatten(), new.flatten(0, 1).to(self.dtype))


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for it (pinned, asynchronous copy to CUDA)."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def copy_from_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (a device buffer) <- src (host) without waiting for the device."""
    if dst.device.type == "cuda":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


VIEWS = (SlotRows, PagedRows)


def is_view(x) -> bool:
    return isinstance(x, VIEWS)
