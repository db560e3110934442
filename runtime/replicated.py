"""Serving a sharded model (kimi_graph.load(..., parallel=...)): every rank runs the same
scheduler over its part of the model. Rank 0 takes the HTTP requests; at each step it sends
the requests that arrived and the cancellations to the other ranks, which replay that step:
admission, prefill chunks, decode batches and seeded draws are deterministic given those, so
every rank runs the same engine calls and their collectives meet."""
from __future__ import annotations

from datetime import timedelta

import torch

from .scheduler import Request, Scheduler

IDLE_TIMEOUT = timedelta(days=30)     # the other ranks wait this long for rank 0's next step


class Channel:
    """Rank 0's messages to every rank, as pickled objects over a gloo group (on the CPU, so
    waiting for requests holds no GPU stream). Every rank makes one, at the same point."""

    def __init__(self):
        import torch.distributed as dist
        self.dist = dist
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def send(self, message) -> None:
        self.dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self):
        box = [None]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class LeaderScheduler(Scheduler):
    """Rank 0's scheduler: each step sends what it drained before running it."""

    def __init__(self, engine, **options):
        super().__init__(engine, **options)
        self.channel = Channel()

    def _drain(self):
        new, cancels = super()._drain()
        self.channel.send(([(r.id, r.prompt, r.params) for r in new], [r.id for r in cancels]))
        return new, cancels

    def stop(self) -> None:
        """Stop serving, and the other ranks with it."""
        super().stop()
        if self.channel is not None:
            self.channel.send(None)
            self.channel = None


class _Stopped(Exception):
    pass


class FollowerScheduler(Scheduler):
    """Another rank's scheduler: each step runs what rank 0 sent for it (`follow`)."""

    def __init__(self, engine, **options):
        super().__init__(engine, **options)
        self.channel = Channel()
        self.live: dict[int, Request] = {}
        self.on_finish = lambda r: self.live.pop(r.id, None)

    def _drain(self):
        message = self.channel.receive()
        if message is None:
            raise _Stopped
        new, cancelled = message
        reqs = []
        for rid, ids, params in new:
            r = self.request(ids, params, lambda kind, value: None)
            r.id, self.live[rid] = rid, r
            reqs.append(r)
        return reqs, {self.live[i] for i in cancelled if i in self.live}

    def follow(self) -> None:
        """Replay rank 0's steps until it stops."""
        with torch.inference_mode():
            try:
                while True:
                    self.step()
            except _Stopped:
                pass
