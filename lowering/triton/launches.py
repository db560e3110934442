"""Kernel launches counted without a profiler (CPU, under the Triton interpreter, or on a GPU):
every Triton launch (through codegen.launch) and every torch op that runs a kernel (views and
allocations excluded) is counted against the triton backend's schedule item that issued it
("(engine)" outside a graph call: cache set-up, the engine's own ops).

    with counting() as c:
        engine.prefill(slots, prompts)
    c.total, c.by_item["%l0.kda.o"]

A torch op counts once as dispatched: a multi-tensor op (torch._foreach_zero_) is one here and
a few launches on CUDA (about one per 110 tensors).
"""
from __future__ import annotations

import collections
import contextlib
import sys
from typing import Iterator

from torch.utils._python_dispatch import TorchDispatchMode

from . import backend, codegen

NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_local_scalar_dense",
             "lift_fresh", "detach", "alias", "set_", "resize_", "record_stream", "_unsafe_view"}


class LaunchCounter(TorchDispatchMode):
    """Launches by schedule item (backend.TRACE): by_item[item]["triton.<kernel>" / "torch.<op>"]."""

    def __init__(self):
        super().__init__()
        self.by_item: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.in_launch = False      # torch ops inside a Triton launch are the interpreter's own

    def where(self) -> str:
        return backend.TRACE[-1] if backend.TRACE else "(engine)"

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.by_item.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not view and name not in NO_KERNEL and not self.in_launch:
            self.by_item[self.where()]["torch." + name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting() -> Iterator[LaunchCounter]:
    """Count the launches of the block (see the module docstring)."""
    counter, launch = LaunchCounter(), codegen.launch

    def counted(spec, grid, *args):
        counter.by_item[counter.where()]["triton." + spec.name] += 1
        counter.in_launch = True
        try:
            return launch(spec, grid, *args)
        finally:
            counter.in_launch = False

    # every kernel module's own reference to codegen.launch
    mods = [m for name, m in list(sys.modules.items())
            if name.startswith("kimi_graph.lowering.triton") and getattr(m, "launch", None) is launch]
    trace, backend.TRACE = backend.TRACE, []
    for mod in mods:
        mod.launch = counted
    try:
        with counter:
            yield counter
    finally:
        for mod in mods:
            mod.launch = launch
        backend.TRACE = trace
