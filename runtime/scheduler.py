"""Continuous batching over an Engine: requests join and leave at every step.

A step runs, in order: the cancellations and arrivals since the last step; admission of
waiting requests to free cache slots; one decode call for every sequence that has a token
to run; prefill chunks of newly admitted prompts, as many as fit the step's token budget
after the decodes (at least one, so prompts always progress). A request's prompt is cut at
fixed multiples of `prefill_chunk`, whatever else runs, and each request samples with its
own Sampler (its seed and draw count), so greedy and seeded outputs do not depend on the
batch. A step's draws run as one batched call on the device, the decode's inside its CUDA
graph when the engine has them. A finished, failed or cancelled request frees its slot (and pages) at once.

Single-threaded use: `submit` then `step()` until `idle`. Served: `start()` runs the steps
on a thread; `submit` and `cancel` are thread-safe; results come back through each
request's `sink(kind, value)`, called on the scheduler's thread:
    ("token", id) per sampled token, then one of ("finish", "stop" | "length"),
    ("error", message) or ("cancelled", None).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .engine import Engine, GenerationError
from .prefix_cache import PrefixCache
from .sampling import Sampler, SamplingParams

log = logging.getLogger("kimi_graph.scheduler")
Sink = Callable[[str, object], None]


class QueueFull(RuntimeError):
    """The bounded queue of requests waiting for a slot is full (HTTP 429)."""


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    id: int = 0
    slot: int | None = None
    prefilled: int = 0                  # prompt tokens already in the slot
    cached: int = 0                     # of which restored from the prefix cache
    output: list[int] = field(default_factory=list)
    pending: int | None = None          # the last sampled token, not yet run
    sampler: Sampler | None = None      # its seed and draw count
    stops: frozenset = frozenset()
    done: bool = False
    t_submit: float = 0.0
    t_first: float | None = None        # first token sampled
    t_last: float | None = None         # last token sampled


class Scheduler:
    """Serves requests on `engine`'s cache slots.

    `prefill_chunk`: prompt tokens per request per prefill call. `step_tokens`: tokens a
    step may run (decodes plus prefill chunks), default max_batch + prefill_chunk.
    `max_queue`: requests that may wait for a slot before `submit` raises QueueFull.
    `prefix_cache_bytes`: keep up to this many bytes of prompt prefixes (0: off).
    `on_step(waiting, running)` and `on_finish(request)` are called on the step's thread
    (metrics)."""

    def __init__(self, engine: Engine, *, prefill_chunk: int = 256, step_tokens: int | None = None,
                 max_queue: int = 256, prefix_cache_bytes: int = 0, on_step=None, on_finish=None):
        for name, v in (("prefill_chunk", prefill_chunk), ("max_queue", max_queue),
                        ("step_tokens", step_tokens)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise GenerationError(f"{name} must be a positive integer, got {v!r}")
        self.engine, self.prefill_chunk, self.max_queue = engine, prefill_chunk, max_queue
        self.step_tokens = step_tokens or engine.cache.num_slots + prefill_chunk
        self.on_step, self.on_finish = on_step, on_finish
        self.prefix = PrefixCache(engine.cache, prefill_chunk, prefix_cache_bytes) if prefix_cache_bytes else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._inbox: deque[Request] = deque()
        self._cancels: set[Request] = set()
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._eos = frozenset(engine.model.config.eos_ids)

    # -- limits -----------------------------------------------------------------------
    @property
    def max_len(self) -> int:
        """Positions a request may use (prompt plus new tokens)."""
        return min(self.engine.cache.capacity, self.engine.model.config.model_max_length)

    def check(self, prompt, params: SamplingParams) -> list[int]:
        """The prompt's ids if the request can ever run here, else GenerationError."""
        ids = self.engine.check_prompt(prompt)
        need = len(ids) + params.max_new_tokens
        if need > self.max_len:
            raise GenerationError(f"the prompt has {len(ids)} tokens; with max_tokens="
                                  f"{params.max_new_tokens} it needs {need} positions, past the "
                                  f"context of {self.max_len}")
        cache = self.engine.cache
        if cache.page_size and cache.pages_for(need) > cache.num_pages:
            raise GenerationError(f"the request needs {cache.pages_for(need)} cache pages; the "
                                  f"cache has {cache.num_pages}")
        return ids

    # -- the client side (any thread) -------------------------------------------------
    def submit(self, prompt, params: SamplingParams, sink: Sink) -> Request:
        """Queue a request (checked now: GenerationError for one that cannot run, QueueFull
        when `max_queue` requests already wait)."""
        req = self.request(self.check(prompt, params), params, sink)
        with self._cv:
            if len(self._inbox) + len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; try again later")
            req.id = next(self._ids)
            self._inbox.append(req)
            self._cv.notify()
        return req

    def request(self, ids: list[int], params: SamplingParams, sink: Sink) -> Request:
        """A Request for checked prompt `ids`, with its stop set and its own sampler."""
        req = Request(ids, params, sink, t_submit=time.perf_counter())
        req.stops = frozenset(params.stop_set(self._eos, self.engine.model.config.vocab_size))
        req.sampler = Sampler(params, 1)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (client gone, stop string seen); its slot is freed at the next step."""
        with self._cv:
            if not req.done:
                self._cancels.add(req)
                self._cv.notify()

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self._inbox or self._cancels)

    # -- the step -----------------------------------------------------------------------
    def step(self) -> None:
        self._take_inbox()
        self._admit()
        decoding = [r for r in self.running if r.pending is not None]
        if decoding:
            self._run("decode", decoding)
        chunks = self._plan_prefill(self.step_tokens - len(decoding))
        if chunks:
            self._run("prefill", chunks)
        if self.on_step:
            self.on_step(len(self.waiting), len(self.running))

    def _drain(self) -> tuple[list[Request], set[Request]]:
        """The requests submitted and cancelled since the last step."""
        with self._cv:
            new = list(self._inbox)
            self._inbox.clear()
            cancels, self._cancels = self._cancels, set()
        return new, cancels

    def _take_inbox(self) -> None:
        new, cancels = self._drain()
        self.waiting.extend(new)
        for r in cancels:
            if r in self.waiting:
                self.waiting.remove(r)
            self._finish(r, "cancelled", None)

    def _admit(self) -> None:
        cache = self.engine.cache
        while self.waiting and cache.free_slots:
            r = self.waiting[0]
            if cache.page_size and self._pages_promised() + self._pages(r) > cache.num_pages:
                break       # every admitted request's worst case fits, so none stalls midway
            self.waiting.popleft()
            (r.slot,) = cache.allocate(1)
            if self.prefix is not None:
                r.prefilled = r.cached = self.prefix.restore(r.slot, r.prompt)
            self.running.append(r)

    def _pages(self, r: Request) -> int:
        return self.engine.cache.pages_for(len(r.prompt) + r.params.max_new_tokens)

    def _pages_promised(self) -> int:
        return sum(self._pages(r) for r in self.running)

    def _plan_prefill(self, budget: int) -> list[tuple[Request, int]]:
        """(request, chunk length) for this step: chunks end at multiples of prefill_chunk
        (or the prompt's end), oldest requests first."""
        chunks, used = [], 0
        for r in self.running:
            if r.prefilled == len(r.prompt):
                continue
            end = min((r.prefilled // self.prefill_chunk + 1) * self.prefill_chunk, len(r.prompt))
            n = end - r.prefilled
            if chunks and used + n > budget:
                break
            chunks.append((r, n))
            used += n
        return chunks

    def _run(self, mode: str, work) -> None:
        """One engine call for `work` (decode: requests; prefill: (request, n) chunks), then
        the draws of the requests whose next token it produced. A failure ends only the
        requests of this call."""
        reqs = work if mode == "decode" else [r for r, _ in work]
        try:
            if mode == "decode":
                tokens = [r.pending for r in reqs]
                for r in reqs:
                    r.pending = None
                rows = list(range(len(reqs)))
                _, drawn = self.engine.decode_sample([r.slot for r in reqs], tokens,
                                                     RequestSamplers(reqs), rows)
            else:
                outs = self.engine.prefill([r.slot for r in reqs],
                                           [r.prompt[r.prefilled:r.prefilled + n] for r, n in work],
                                           last_only=True)
                ready = []
                for i, (r, n) in enumerate(work):
                    r.prefilled += n
                    if self.prefix is not None:
                        self.prefix.save(r.slot, r.prompt)
                    if r.prefilled == len(r.prompt):
                        ready.append(i)
                if not ready:
                    return
                reqs = [reqs[i] for i in ready]
                logits = torch.stack([outs[i][-1] for i in ready])
                drawn = RequestSamplers(reqs).draw(logits, list(range(len(reqs))))
            self._deliver(reqs, drawn.tolist())
        except Exception as e:      # noqa: BLE001 - the server keeps serving the others
            log.exception("%s step failed", mode)
            for r in reqs:
                self._finish(r, "error", f"{mode} failed: {type(e).__name__}: {e}")

    def _deliver(self, reqs: list[Request], tokens: list[int]) -> None:
        now = time.perf_counter()
        for r, t in zip(reqs, tokens):
            if t < 0:           # the draw's mark for non-finite logits
                self._finish(r, "error", "the model produced NaN or inf logits")
                continue
            r.output.append(t)
            r.t_first = r.t_first or now
            r.t_last = now
            r.sink("token", t)
            if t in r.stops:
                self._finish(r, "finish", "stop")
            elif len(r.output) == r.params.max_new_tokens:
                self._finish(r, "finish", "length")
            else:
                r.pending = t

    def _finish(self, r: Request, kind: str, value) -> None:
        if r.done:
            return
        r.done, r.pending = True, None
        if r.slot is not None:
            self.engine.cache.free(r.slot)
            r.slot = None
        if r in self.running:
            self.running.remove(r)
        try:
            r.sink(kind, value)
        finally:
            if self.on_finish:
                self.on_finish(r)

    # -- serving on a thread --------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kimi-graph-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for r in list(self.waiting) + list(self._inbox) + list(self.running):
            self._finish(r, "error", "the server is shutting down")
        self.waiting.clear()
        self._inbox.clear()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and self.idle:
                        self._cv.wait()
                    if self._stopping:
                        return
                try:
                    self.step()
                except Exception:       # noqa: BLE001 - a bug in one step must not stop serving
                    log.exception("scheduler step failed")
                    for r in list(self.running):
                        self._finish(r, "error", "internal error in the scheduler")


class RequestSamplers(Sampler):
    """The Samplers of several requests as one: row i draws as reqs[i]'s own sampler would
    (its parameters, seed and draw count), so a batch of them is one device call."""

    def __init__(self, reqs: list[Request]):
        self.samplers = [r.sampler for r in reqs]
        greedy = all(s.params.greedy for s in self.samplers)
        self.params = SamplingParams(temperature=0.0 if greedy else 1.0)   # read for .greedy only

    def inputs(self, rows: list[int]) -> tuple[list[int], list[float]]:
        parts = [self.samplers[r].inputs([0]) for r in rows]
        return ([p[0][k] for k in range(3) for p in parts],     # seeds, steps, top_k
                [p[1][k] for k in range(2) for p in parts])     # temperatures, top_p

    def advance(self, rows: list[int]) -> None:
        for r in rows:
            self.samplers[r].advance([0])
