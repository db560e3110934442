"""Sampling the next token: greedy, temperature, top-k, top-p; one seeded generator per
sequence, so a sequence's tokens depend on its prompt and seed, not on its batch."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from kimi_graph.finite import check_finite_logits


@dataclass
class SamplingParams:
    """temperature 0 is greedy (argmax, lowest id on ties). top_k 0 and top_p 1 are off.
    Generation stops after `max_new_tokens`, or at a stop token (the config's eos ids unless
    `ignore_eos`, plus `stop_ids`), which is kept as the last generated token."""
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        stop = self.stop_ids if self.stop_ids is not None else ()
        if isinstance(stop, (str, bytes, int)) or not hasattr(stop, "__iter__"):
            raise ValueError(f"stop_ids must be a list of token ids, got {type(stop).__name__} {stop!r:.40}")
        self.stop_ids = tuple(stop)
        bad = [x for x in self.stop_ids if not isinstance(x, int) or isinstance(x, bool) or x < 0]
        if bad:
            raise ValueError(f"stop_ids must be token ids (integers >= 0), got {bad[:4]!r:.60}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r:.40}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 is off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 is off), got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def stop_set(self, eos_ids, vocab_size: int | None = None) -> set[int]:
        """The stop tokens: stop_ids (checked against `vocab_size` when given) and eos."""
        out = [x for x in self.stop_ids if vocab_size is not None and x >= vocab_size]
        if out:
            raise ValueError(f"stop_ids {out[:4]} are outside the vocabulary [0, {vocab_size})")
        return set(self.stop_ids) | (set() if self.ignore_eos else set(eos_ids))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [N, V] (fp32) with tokens outside the top-k and the top-p nucleus set to -inf.
    The nucleus is the smallest set of most likely tokens whose probability reaches top_p."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs          # mass of the more likely tokens
        drop = before >= top_p
        drop[..., 0] = False                            # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


class Sampler:
    """Draws next tokens for a batch of sequences, each with its own generator."""

    def __init__(self, params: SamplingParams, num_sequences: int):
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        self.generators = []
        if not params.greedy:
            for _ in range(num_sequences):
                g = torch.Generator(device="cpu")
                g.manual_seed(seed)
                self.generators.append(g)

    def __call__(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """logits [N, V] for the sequences `rows` (indices into this sampler's sequences)."""
        logits = logits.detach()
        check_finite_logits(logits, "next-token logits")
        p = self.params
        if p.greedy:                    # on the logits' device: only the ids come back
            return logits.argmax(dim=-1).tolist()
        logits = logits.to("cpu", torch.float32)     # CPU generators: same draws on any device
        probs = filter_logits(logits / p.temperature, p.top_k, p.top_p).softmax(dim=-1)
        return [int(torch.multinomial(probs[i], 1, generator=self.generators[r]))
                for i, r in enumerate(rows)]
