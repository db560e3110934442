"""Sampling the next token: greedy, temperature, top-k, top-p, on the logits' device. Draws
are Gumbel-max with counter-based noise hashed from (seed, the sequence's draw count, token
id), so a sequence's tokens depend on its prompt and seed, not on its batch, and the whole
draw runs inside a CUDA graph (no generator state, no wait for the device)."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from kimi_graph.finite import NonFiniteError

from .views import to_device


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


_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h, c < 2^32, exact in int64 (no overflow on any device)."""
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & 0xFFFF) << 16)) & _M32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche of h < 2^32."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): one per (seed[b], step[b], ids[b, v]), the same on
    every device and whatever else the batch holds."""
    key = _fmix(_fmix((seed & _M32) ^ _fmix((seed >> 32) & _M32)) ^ (step & _M32))
    h = _fmix(key.view(-1, 1) ^ _fmix(ids & _M32))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, temperature: torch.Tensor,
           top_k: torch.Tensor, top_p: torch.Tensor, greedy: bool = False) -> torch.Tensor:
    """Next tokens [N] from logits [N, V], on the logits' device with no wait for it (a CUDA
    graph can hold it). Per row: temperature 0 is argmax (lowest id on ties); else the
    Gumbel-max draw from softmax(filter_logits(logits / temperature, top_k, top_p)), its
    noise hashed from (seed, step, token id). `greedy`: every row is greedy (argmax only).
    Rows whose logits are not all finite get -1."""
    x = logits.float()
    finite = torch.isfinite(x).all(-1)
    if greedy:
        return torch.where(finite, x.argmax(-1), -1)
    N, V = x.shape
    hot = temperature > 0
    x = x / torch.where(hot, temperature, 1.0).view(-1, 1)
    sx, order = torch.sort(x, dim=-1, descending=True, stable=True)
    k = torch.where((top_k > 0) & (top_k < V), top_k, V)
    keep = sx >= sx.gather(1, (k - 1).view(-1, 1))                # ties with the k-th stay
    sx = sx.masked_fill(~keep, float("-inf"))
    probs = sx.softmax(-1)
    before = probs.cumsum(-1) - probs                            # mass of the more likely tokens
    keep &= before < top_p.view(-1, 1)
    keep[:, 0] = True                                            # the most likely always stays
    noise = -torch.log(-torch.log(uniform(seed, step, order)))
    score = torch.where(keep, sx + torch.where(hot.view(-1, 1), noise, 0.0), float("-inf"))
    tokens = order.gather(1, score.argmax(-1, keepdim=True)).view(N)
    return torch.where(finite, tokens, -1)


class Sampler:
    """Draws next tokens for a batch of sequences: sequence i's n-th draw depends only on its
    logits, the seed and n (see `sample`), so never on the rest of the batch."""

    def __init__(self, params: SamplingParams, num_sequences: int):
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        self.seed = seed % (1 << 63)
        self.steps = [0] * num_sequences           # draws so far per sequence

    def inputs(self, rows: list[int]) -> tuple[list[int], list[float]]:
        """The per-row sampling inputs of `sample` for `rows`, as host lists: ints (seed,
        step, top_k per row, in that order) and floats (temperature, top_p per row)."""
        p, n = self.params, len(rows)
        steps = [0] * n if p.greedy else [self.steps[r] for r in rows]     # greedy draws no noise
        ints = [self.seed] * n + steps + [p.top_k] * n
        return ints, [float(p.temperature)] * n + [float(p.top_p)] * n

    def advance(self, rows: list[int]) -> None:
        if not self.params.greedy:
            for r in rows:
                self.steps[r] += 1

    def draw(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Tokens [N] on the logits' device for the sequences `rows` (no wait for the device)."""
        if self.params.greedy:          # no noise: neither seeds nor draw counts matter
            return sample(logits.detach(), *(None,) * 5, greedy=True)
        ints, floats = self.inputs(rows)
        n = len(rows)
        i = to_device(torch.tensor(ints, dtype=torch.int64).view(3, n), logits.device)
        f = to_device(torch.tensor(floats, dtype=torch.float32).view(2, n), logits.device)
        self.advance(rows)
        return sample(logits.detach(), i[0], i[1], f[0], i[2], f[1], self.params.greedy)

    def __call__(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """logits [N, V] for the sequences `rows` (indices into this sampler's sequences)."""
        return tokens_of(self.draw(logits, rows))


def tokens_of(tokens: torch.Tensor) -> list[int]:
    """Sampled tokens as a list (the one wait for the device per step), or a clear error."""
    out = tokens.tolist()
    bad = [i for i, t in enumerate(out) if t < 0]
    if bad:
        raise NonFiniteError(f"next-token logits hold NaN or inf in {len(bad)} of {len(out)} rows "
                             f"(first at index {bad[0]}); the weights or inputs make the model overflow")
    return out
