"""Prefix caching for the scheduler: what a slot holds after a prompt's prefill reaches a
multiple of `block` tokens (the KDA and conv states, the MLA cache rows) is saved, keyed by
those tokens; a later prompt that starts with them continues from a copy instead of running
them again. Blocks are the scheduler's prefill chunks, so a restored prompt runs the same
chunks it would have run from the start: its outputs do not change. The least recently
used entries go when the saved bytes pass `max_bytes`."""
from __future__ import annotations

from collections import OrderedDict

from .cache import CacheManager


class PrefixCache:
    def __init__(self, cache: CacheManager, block: int, max_bytes: int):
        self.cache, self.block, self.max_bytes = cache, block, max_bytes
        self.entries: OrderedDict[tuple, tuple[dict, int]] = OrderedDict()
        self.bytes = 0

    def save(self, slot: int, prompt: list[int]) -> None:
        """After a prefill: save the slot if it holds a whole number of blocks of `prompt`."""
        n = self.cache.lengths[slot]
        if n == 0 or n % self.block:
            return
        key = tuple(prompt[:n])
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        saved = self.cache.save(slot)
        size = sum(t.nbytes for t in saved.values())
        if size > self.max_bytes:
            return
        self.entries[key] = (saved, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self.entries.popitem(last=False)
            self.bytes -= dropped

    def restore(self, slot: int, prompt: list[int]) -> int:
        """Fill the empty slot with the longest saved prefix of `prompt` that leaves at least
        one token to run (its logits give the first new token) -> tokens restored."""
        for n in range((len(prompt) - 1) // self.block * self.block, 0, -self.block):
            hit = self.entries.get(tuple(prompt[:n]))
            if hit is not None:
                self.entries.move_to_end(tuple(prompt[:n]))
                self.cache.restore(slot, hit[0], n)
                return n
        return 0
