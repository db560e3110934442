"""The generation engine: prefill and decode steps over cache slots, driven only through
`model.execute`, so it runs unchanged on every backend.

Sequences never share a padded prefill: pad tokens would flow through the KDA recurrence
and conv states. Each prompt is prefilled on its own slot (prompts of equal length
together), then the batch decodes together, one token per sequence per step; `cache_pos`
tells MLA attention where each sequence ends, so rows past it are masked.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Iterator

import torch

from .cache import CacheError, CacheManager, state_specs
from .sampling import Sampler, SamplingParams, tokens_of
from .views import to_device


class GenerationError(ValueError):
    """A generation request that cannot run as asked (bad prompt, too long, too many)."""


PREFILL_CHUNK = 4096    # tokens per prefill call off CUDA (and the auto size's fallback)
# prefill="auto" on CUDA: the largest power of two up to MAX_PREFILL_CHUNK whose activations fit
# ACTIVATION_SHARE of the memory free once the caches are allocated. Activations: the prefill
# graph's intermediate values at their peak (kimi_graph.liveness: freed after their last reader,
# as the Triton backend runs it; published model ~80 KB per token, plus the MLA keys and values
# rebuilt from the latent for every cached row, ~37 KB a row, or for a block of key_rows rows
# where the backend's prefill attention runs in key blocks) times KERNEL_SCRATCH for what
# kernels allocate inside an op (the MoE's 8 token copies' gate_up and down rows, KDA's fp32
# chunk intermediates). Why 16384: on the H200 (27 layers, bf16, bench/prefill_split.py, with
# every position's logits then) 16k-token calls prefilled 1x16k 19% faster than 4k-token calls
# and 32x1k 17% faster, and 32k calls only 2% more than 16k for twice the activations; beside
# 98 GB of weights on a 141 GB GPU a 16k call's estimate (2.6 GB) fits many times over, and a
# GPU with less free memory, or caches of long contexts, get smaller calls.
MAX_PREFILL_CHUNK = 16384
MIN_PREFILL_CHUNK = 512
ACTIVATION_SHARE = 0.5
KERNEL_SCRATCH = 2.0


def auto_prefill_chunk(graph, capacity: int, free_bytes: int, key_rows: int | None = None) -> int:
    """Tokens per prefill call for `graph` (a stateful prefill graph) whose cache windows reach
    `capacity` rows, with `free_bytes` of device memory free (see MAX_PREFILL_CHUNK). `key_rows`:
    the most cached rows whose MLA keys and values the backend rebuilds at once (the Triton
    backend's prefix attention runs in key blocks), else every row of the window."""
    from kimi_graph.liveness import peak_activation_bytes
    chunk = MAX_PREFILL_CHUNK
    rows = lambda chunk: max(chunk, capacity if key_rows is None else min(capacity, key_rows))  # noqa: E731
    while chunk > MIN_PREFILL_CHUNK and KERNEL_SCRATCH * peak_activation_bytes(
            graph, {"B": 1, "T": chunk, "S": rows(chunk)}) > ACTIVATION_SHARE * free_bytes:
        chunk //= 2
    return chunk


class Engine:
    """Runs a model's stateful prefill and decode graphs for up to `max_batch` sequences of
    up to `max_len` tokens (default: config.model_max_length).

    `window_block`: caches are passed cut to the rows in use, rounded up to this many tokens
    (None: always the whole capacity). `prefill_chunk`: the most tokens (sequences x tokens)
    one prefill call runs; longer prompts continue through the states chunk by chunk, so
    activations stay bounded by the chunk ("auto": sized from the free memory on CUDA, see
    MAX_PREFILL_CHUNK, else PREFILL_CHUNK; None: whole batches). `page_size`, `num_pages`: paged MLA
    caches (see CacheManager). `cuda_graphs`: replay each decode step as one CUDA graph per
    batch-size bucket (runtime/graphs.py; needs a backend that updates states in place, on
    CUDA: backend="triton" with the default pipeline). `overlap`: generation (`iterate`,
    `generate`, `stream`) queues each decode step, fed the previous draw on the device, before
    the host reads that draw, so the host's work between steps runs beside the device's; a
    sequence that stops has run one step more, discarded with its slot (`Sequence` turns, which
    keep their slot, never overlap). None (the default): on where the model runs on CUDA (the
    27-layer step on an H200 at B=1 / 32: 2.704 -> 2.627 / 16.39 -> 15.92 ms,
    bench/results/e2e-overlap*.json), off on the CPU (host and device are one)."""

    def __init__(self, model, max_batch: int = 1, max_len: int | None = None, *,
                 window_block: int | None = 64, prefill_chunk: int | str | None = "auto",
                 page_size: int | None = None, num_pages: int | None = None,
                 cuda_graphs: bool = False, overlap: bool | None = None):
        limit = model.config.model_max_length
        max_len = limit if max_len is None else max_len
        if isinstance(max_len, int) and max_len > limit:
            raise GenerationError(f"max_len {max_len} exceeds the model's model_max_length {limit}")
        for name, v in (("prefill_chunk", prefill_chunk), ("window_block", window_block)):
            if v is None or (name == "prefill_chunk" and isinstance(v, str) and v == "auto"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                also = " or 'auto'" if name == "prefill_chunk" else ""
                raise GenerationError(f"{name} must be a positive integer{also} or None, got {v!r:.40}")
        if overlap is not None and not isinstance(overlap, bool):
            raise GenerationError(f"overlap must be True, False or None, got {overlap!r:.40}")
        self.model, self.window_block, self.prefill_chunk = model, window_block, prefill_chunk
        self.overlap = torch.device(model.device).type == "cuda" if overlap is None else overlap
        decode = model.get_graph("decode")
        if state_specs(model.get_graph("prefill", stateful=True)) != state_specs(decode):
            raise GenerationError("the stateful prefill and decode graphs take different states")
        self.cache = CacheManager(decode, max_batch, max_len, device=model.device,
                                  page_size=page_size, num_pages=num_pages)
        if prefill_chunk == "auto":
            self.prefill_chunk = PREFILL_CHUNK
            dev = torch.device(model.device)
            if dev.type == "cuda":
                key_rows = getattr(model.executor, "attention_key_rows", None)
                self.prefill_chunk = auto_prefill_chunk(model.get_graph("prefill", True, "last"),
                                                        self.cache.capacity, torch.cuda.mem_get_info(dev)[0],
                                                        key_rows() if key_rows else None)
        self._in_place: dict[str, bool] = {}
        self.graphs = None
        if cuda_graphs:
            if torch.device(model.device).type != "cuda":
                raise GenerationError(f"cuda_graphs=True needs a CUDA device, got {model.device!r}")
            if not self.in_place("decode"):
                raise GenerationError("cuda_graphs=True needs a backend that updates states in place "
                                      "(backend='triton' with the default pipeline)")
            from .graphs import DecodeGraphs
            self.graphs = DecodeGraphs(self)

    # -- one graph call ---------------------------------------------------------
    def in_place(self, mode: str) -> bool:
        """Does the backend update this mode's states in place (views of the cache storage)?"""
        if mode not in self._in_place:
            accepts = getattr(self.model.executor, "accepts_views", None)
            self._in_place[mode] = bool(accepts and accepts(self.model.get_graph(mode, True)))
        return self._in_place[mode]

    def step(self, mode: str, slots: list[int], ids: torch.Tensor, logits: str = "all") -> torch.Tensor:
        """Run `ids` [len(slots), T] at the end of each slot's sequence -> logits [B, T, V]
        ([B, 1, V], the last position's, with logits="last"); the slots' states advance by
        T tokens. In place when the backend can (no cache moves
        and no wait for the device: positions and slots go over as device tensors), else the
        states of `slots` are gathered in and scattered back."""
        T = ids.shape[1]
        self.cache.reserve(slots, T)
        window = self.cache.window(slots, T, self.window_block)
        inputs = {"input_ids": to_device(ids, self.model.device), "cache_pos": self.cache.positions(slots)}
        if self.in_place(mode):
            inputs.update(self.cache.views(slots, window))
            outs = self.model.execute(mode, True, inputs, logits)
        else:
            inputs.update(self.cache.gather(slots, window))
            outs = self.model.execute(mode, True, inputs, logits)
            self.cache.scatter(slots, window, outs[1:], T)
        self.cache.advance(slots, T)
        return outs[0]

    def prefill(self, slots: list[int], prompts: list[list[int]], last_only: bool = False
                ) -> list[torch.Tensor]:
        """Append each prompt to its slot (continuing what the slot holds) -> logits [T_i, V]
        per prompt ([1, V], the next-token logits, with `last_only`: the graph then computes
        the head at the last position of each call only). Prompts of equal length run
        together, no padding, at most `prefill_chunk` tokens per call (long prompts in chunks,
        many short ones in sub-batches)."""
        if len(slots) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts for {len(slots)} slots")
        ids = [self.check_prompt(p) for p in prompts]
        out: list[torch.Tensor | None] = [None] * len(ids)
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(ids):
            groups.setdefault(len(t), []).append(i)
        for T, members in groups.items():
            chunk = min(T, self.prefill_chunk or T)
            rows = max(1, (self.prefill_chunk or T * len(members)) // chunk)
            for r in range(0, len(members), rows):
                part = members[r:r + rows]
                batch = torch.tensor([ids[i] for i in part], dtype=torch.int64)
                pieces = [self.step("prefill", [slots[i] for i in part], batch[:, a:a + chunk],
                                    "last" if last_only else "all") for a in range(0, T, chunk)]
                logits = pieces[-1] if last_only or len(pieces) == 1 else torch.cat(pieces, dim=1)
                for j, i in enumerate(part):
                    out[i] = logits[j]
        return out

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One token per slot -> logits [len(slots), V]."""
        if self.graphs is not None:
            return self.decode_sample(slots, tokens, Sampler(SamplingParams(), len(slots)),
                                      list(range(len(slots))))[0].clone()
        ids = torch.tensor(self.check_prompt(tokens), dtype=torch.int64).view(-1, 1)
        if ids.shape[0] != len(slots):
            raise GenerationError(f"{ids.shape[0]} tokens for {len(slots)} slots")
        return self.step("decode", slots, ids)[:, 0]

    def decode_sample(self, slots: list[int], tokens: list[int], sampler: Sampler,
                      rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step and the draw of each slot's next token (sequence `rows[i]` of
        `sampler` for slots[i]) -> (logits [B, V], tokens [B]) on the device, nothing waited
        for. With cuda_graphs both are the graph's outputs, valid until its next replay."""
        ids = self.check_prompt(tokens)
        if len(ids) != len(slots) or len(rows) != len(slots):
            raise GenerationError(f"{len(ids)} tokens and {len(rows)} rows for {len(slots)} slots")
        return self._decode(slots, ids, sampler, rows)

    def _decode(self, slots: list[int], ids, sampler: Sampler, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """decode_sample's step for checked `ids`: a list, or a [B] int64 tensor on the device."""
        if self.graphs is None:
            ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.int64)
            logits = self.step("decode", slots, ids.view(-1, 1))[:, 0]
            return logits, sampler.draw(logits, rows)
        self.cache.reserve(slots, 1)
        out = self.graphs.run(slots, ids, sampler, rows)
        self.cache.advance(slots, 1)
        return out

    def capture_graphs(self, batch_sizes: list[int] | None = None, sampling: bool = False) -> None:
        """With cuda_graphs: capture the decode step ahead of time for the buckets of
        `batch_sizes` (default: every bucket up to max_batch's), greedy and, with `sampling`,
        sampling graphs too (otherwise each is captured on first use)."""
        if self.graphs is None:
            raise GenerationError("capture_graphs needs Engine(..., cuda_graphs=True)")
        from .graphs import BUCKETS, bucket
        sizes = batch_sizes or [b for b in BUCKETS if b <= bucket(self.cache.num_slots)]
        for greedy in (True, False) if sampling else (True,):
            self.graphs.capture_all(sizes, greedy)

    def fill_context(self, slots: list[int], length: int, seed: int = 0) -> None:
        """Set each slot to hold `length` tokens of random cache and state contents, with no
        prefill: a decode step at that context can then be timed (benchmarks only)."""
        c = self.cache
        for s in slots:
            c._check(s)
            if c.lengths[s]:
                raise GenerationError(f"slot {s} already holds {c.lengths[s]} tokens")
        c.reserve(slots, length)
        gen = torch.Generator(device=c.device).manual_seed(seed)
        for spec in c.specs:
            t = c.storage[spec.name]
            if spec.seq_axis is None:
                for s in slots:
                    t[s].normal_(generator=gen).mul_(0.05 if t.dtype == torch.float32 else 1.0)
            else:
                flat = t.flatten(0, 1)
                for s in slots:
                    rows = torch.arange(length, device=c.device)
                    if c.page_size:
                        pages = torch.tensor(c.pages[s], device=c.device)
                        rows = pages[rows // c.page_size] * c.page_size + rows % c.page_size
                    else:
                        rows = rows + s * c.capacity
                    flat[rows] = torch.randn(length, t.shape[-1], generator=gen, device=c.device).to(t.dtype)
        c.advance(slots, length)

    # -- generation ---------------------------------------------------------------
    def check_prompt(self, prompt) -> list[int]:
        """A prompt as a list of in-vocabulary token ids, or a clear error."""
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex():
                raise GenerationError(f"a prompt tensor must be 1-D integer ids, got "
                                      f"{tuple(prompt.shape)} {prompt.dtype}")
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Iterable):
            raise GenerationError(f"a prompt must be a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        if not ids:
            raise GenerationError("empty prompt: give at least one token id")
        if set(map(type, ids)) != {int}:     # plain ints (the common case) skip the slow ABC checks
            bad_type = [x for x in ids if not isinstance(x, numbers.Integral) or isinstance(x, bool)]
            if bad_type:
                raise GenerationError(f"token ids must be integers, got {bad_type[:4]!r}")
            ids = [int(x) for x in ids]
        V = self.model.config.vocab_size
        if not 0 <= min(ids) <= max(ids) < V:
            bad = sorted({x for x in ids if not 0 <= x < V})
            raise GenerationError(f"token ids out of range [0, {V}): {bad[:8]}")
        return ids

    def check_request(self, prompts: list[list[int]], params: SamplingParams) -> None:
        params.stop_set((), self.model.config.vocab_size)       # stop ids inside the vocabulary
        if len(prompts) > self.cache.free_slots:
            raise GenerationError(f"batch of {len(prompts)} prompts is larger than the cache: "
                                  f"{self.cache.free_slots} of {self.cache.num_slots} slots free")
        limit, what = self.cache.capacity, "cache capacity"
        if self.model.config.model_max_length <= limit:
            limit, what = self.model.config.model_max_length, "model_max_length"
        for i, p in enumerate(prompts):
            if len(p) + params.max_new_tokens > limit:
                raise GenerationError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={params.max_new_tokens} "
                    f"it needs {len(p) + params.max_new_tokens} positions, past the {what} of {limit}")
        if self.cache.page_size:        # the worst case must fit, so no sequence stalls midway
            need = sum(self.cache.pages_for(len(p) + params.max_new_tokens) for p in prompts)
            if need > self.cache.free_pages:
                raise GenerationError(f"the request needs up to {need} cache pages of "
                                      f"{self.cache.page_size} tokens; {self.cache.free_pages} of "
                                      f"{self.cache.num_pages} are free")

    def iterate(self, prompts, params: SamplingParams) -> Iterator[tuple[int, int]]:
        """Generate for a batch: an iterator of (prompt index, token) as tokens are sampled,
        each step in prompt order. The request is checked now; slots are taken at the first
        step and freed when the iterator ends or is closed."""
        if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
            prompts = list(prompts)                     # [B, T]: B prompts of T tokens
        if not isinstance(prompts, (list, tuple)):
            raise GenerationError("prompts must be a list of prompts (each a list of token ids) "
                                  "or a [B, T] tensor")
        if prompts and all(isinstance(x, int) for x in prompts):
            raise GenerationError("prompts must be a list of prompts; for one prompt pass "
                                  "[[id, id, ...]] (or use stream)")
        if not prompts:
            raise GenerationError("no prompts given")
        prompts = [self.check_prompt(p) for p in prompts]
        self.check_request(prompts, params)
        return self._run(prompts, params)

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, int]]:
        slots = self.cache.allocate(len(prompts))
        try:
            logits = torch.stack([t[-1] for t in self.prefill(slots, prompts, last_only=True)])
            loop = self.sample_loop_ahead if self.overlap else self.sample_loop
            yield from loop(slots, logits, params)
        finally:
            self.cache.free(slots)

    def sample_loop(self, slots: list[int], logits: torch.Tensor,
                    params: SamplingParams) -> Iterator[tuple[int, int]]:
        """From each slot's next-token logits [B, V]: sample, yield (index, token), decode the
        sequences that go on. The last token sampled per sequence is not run (its slot holds
        everything before it)."""
        sampler = Sampler(params, len(slots))
        stops = params.stop_set(self.model.config.eos_ids, self.model.config.vocab_size)
        active = list(range(len(slots)))
        drawn = sampler.draw(logits, active)
        for step in range(params.max_new_tokens):
            tokens = tokens_of(drawn)
            for i, t in zip(active, tokens):
                yield i, t
            going = [(i, t) for i, t in zip(active, tokens) if t not in stops]
            if not going or step + 1 == params.max_new_tokens:
                break
            active = [i for i, _ in going]
            _, drawn = self.decode_sample([slots[i] for i in active], [t for _, t in going], sampler, active)

    def decode_ahead(self, slots: list[int], tokens: torch.Tensor, sampler: Sampler,
                     rows: list[int]) -> torch.Tensor:
        """decode_sample fed `tokens` [B], a draw still on the device (never waited for) -> the
        next draw [B] on the device. A NaN row's draw (-1) goes in as id 0: the host raises on
        the -1 when it reads it, and this step's rows are then discarded."""
        if len(rows) != len(slots) or tokens.shape != (len(slots),):
            raise GenerationError(f"{tuple(tokens.shape)} tokens and {len(rows)} rows for {len(slots)} slots")
        return self._decode(slots, tokens.clamp(min=0), sampler, rows)[1]

    def sample_loop_ahead(self, slots: list[int], logits: torch.Tensor,
                          params: SamplingParams) -> Iterator[tuple[int, int]]:
        """sample_loop one step ahead (Engine `overlap`): each step is queued, fed the previous
        draw on the device, before the host reads that draw; the sequences that stop have run one
        step more (their slots' states hold one token more; the caller frees them)."""
        sampler = Sampler(params, len(slots))
        stops = params.stop_set(self.model.config.eos_ids, self.model.config.vocab_size)
        active = list(range(len(slots)))
        drawn = sampler.draw(logits, active)
        pending = HostTokens(drawn)
        for step in range(params.max_new_tokens):
            last = step + 1 == params.max_new_tokens
            ahead = None if last else self.decode_ahead([slots[i] for i in active], drawn, sampler, active)
            tokens = pending.read()             # the device runs the step ahead meanwhile
            for i, t in zip(active, tokens):
                yield i, t
            keep = [j for j, t in enumerate(tokens) if t not in stops]
            if not keep or last:
                break
            if len(keep) < len(active):         # the rows going on; the others' step is dropped
                ahead = ahead[torch.tensor(keep, device=ahead.device)]
                active = [active[j] for j in keep]
            drawn = ahead
            pending = HostTokens(drawn)

    def sequence(self) -> "Sequence":
        """A sequence kept on its own slot across calls (a multi-turn chat): see Sequence."""
        return Sequence(self)

    def generate(self, prompts, params: SamplingParams) -> list[list[int]]:
        it = self.iterate(prompts, params)             # checks the request first
        out: list[list[int]] = [[] for _ in range(len(prompts))]
        for i, t in it:
            out[i].append(t)
        return out

    def stream(self, prompt, params: SamplingParams) -> Iterator[int]:
        return _tokens(self.iterate([prompt], params))     # the request is checked now


class Sequence:
    """One sequence continued across calls without running its past again: `extend` appends
    tokens (a prefill that continues from the slot's states), `generate`/`stream` sample a
    reply. The reply's last token is run at the next `extend`. `close` (or `with`) frees the
    slot."""

    def __init__(self, engine: Engine):
        self.engine = engine
        (self.slot,) = engine.cache.allocate(1)
        self.tokens: list[int] = []     # everything so far: prompts and replies
        self._logits = None             # next-token logits after the last extend
        self._pending: list[int] = []   # the last reply token, not yet run
        self._turn = 0                  # counts extends: a stream from an older turn is stale

    def extend(self, ids) -> torch.Tensor:
        """Append `ids` -> their logits [T, V]."""
        ids = self.engine.check_prompt(ids)
        run = self._pending + ids
        self.engine.cache.reserve([self.slot], len(run))
        self._turn += 1
        logits = self.engine.prefill([self.slot], [run])[0][len(self._pending):]
        self.tokens += ids
        self._pending, self._logits = [], logits[-1:]
        return logits

    def stream(self, params: SamplingParams) -> Iterator[int]:
        """Sample a reply from where the sequence stands (after an `extend`), token by token.
        Stopping early is fine: the sequence then ends at the last token received."""
        if self._logits is None:
            raise GenerationError("extend the sequence (a prompt or a user turn) before generating")
        cache = self.engine.cache
        end = cache.lengths[self.slot] + params.max_new_tokens
        if end > cache.capacity:
            raise GenerationError(f"max_new_tokens={params.max_new_tokens} does not fit: the "
                                  f"sequence holds {len(self.tokens)} of {cache.capacity} positions")
        if cache.page_size and cache.pages_for(end) - len(cache.pages[self.slot]) > cache.free_pages:
            raise GenerationError(f"max_new_tokens={params.max_new_tokens} does not fit: "
                                  f"{cache.free_pages} cache pages free")
        logits, self._logits = self._logits, None
        return self._reply(self.engine.sample_loop([self.slot], logits, params), self._turn)

    def _reply(self, loop, turn: int) -> Iterator[int]:
        try:
            while True:
                if turn != self._turn:      # checked before the loop runs the last token
                    raise GenerationError("this reply stream is stale: the sequence was extended")
                try:
                    _, t = next(loop)
                except StopIteration:
                    return
                self.tokens.append(t)       # the slot holds all before t; t runs next
                self._pending = [t]
                yield t
        finally:
            loop.close()

    def generate(self, params: SamplingParams) -> list[int]:
        return list(self.stream(params))

    def close(self) -> None:
        if self.slot is not None:
            self.engine.cache.free(self.slot)
            self.slot = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HostTokens:
    """A draw on its way to the host: copied into pinned memory behind the work queued so far,
    waited for only at read() (tokens_of's checks then)."""
    def __init__(self, tokens: torch.Tensor):
        self.event = None
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tokens.clone()

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return tokens_of(self.host)


def _tokens(it) -> Iterator[int]:
    """The tokens of a one-prompt `iterate`; closing this closes it (and frees its slot)."""
    try:
        for _, t in it:
            yield t
    finally:
        it.close()


# -- the model-level entry points (KimiModel.generate / .stream delegate here) ----------
def _encode(model, prompt):
    return model.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt


def _engine_for(model, prompts, params, max_batch, max_len, engine_options) -> Engine:
    if max_len is None:     # just enough for this request (a too-long one fails the check)
        longest = max((len(p) for p in prompts if hasattr(p, "__len__")), default=1)
        max_len = min(longest + params.max_new_tokens, model.config.model_max_length)
    return Engine(model, max_batch or max(len(prompts), 1), max(max_len, 1), **engine_options)


def generate(model, prompts, *, max_batch: int | None = None, max_len: int | None = None,
             engine: Engine | None = None, engine_options: dict | None = None,
             **sampling) -> list[list[int]]:
    """New token ids for each prompt (a list of token-id lists, or strings when the model
    has a tokenizer). `sampling`: SamplingParams fields. Without `engine`, one is made for
    the request (`max_batch` slots of `max_len` tokens: by default just what it needs)."""
    params = SamplingParams(**sampling)
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        prompts = list(prompts)
    if isinstance(prompts, (list, tuple)):
        prompts = [_encode(model, p) for p in prompts]
    engine = engine or _engine_for(model, prompts if isinstance(prompts, list) else [],
                                   params, max_batch, max_len, engine_options or {})
    return engine.generate(prompts, params)


def stream(model, prompt, *, max_len: int | None = None, engine: Engine | None = None,
           engine_options: dict | None = None, **sampling) -> Iterator[int]:
    """Yield new token ids for one prompt as they are sampled."""
    params = SamplingParams(**sampling)
    prompt = _encode(model, prompt)
    engine = engine or _engine_for(model, [prompt], params, 1, max_len, engine_options or {})
    return engine.stream(prompt, params)


__all__ = ["Engine", "Sequence", "GenerationError", "CacheError", "generate", "stream"]
