"""Kernel launches per decode step, per layer, without a profiler: every Triton launch (through
codegen.launch) and every torch op that runs a kernel (views and allocations excluded) is
counted against the schedule item of the triton backend that issued it.

    TRITON_INTERPRET=1 python bench/decode_launches.py            # CPU, the tiny model
    python bench/decode_launches.py --model kimi-linear-48b-a3b --layers 4 --dtype bfloat16   # GPU slice

Prints launches per layer kind (KDA / MLA, dense / MoE) and the step's total, and the ops
that issue them in the first layer of each kind.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kimi_graph
from kimi_graph.lowering.triton import backend, codegen
from kimi_graph.runtime import Engine

from decode_graphs import slice_config     # noqa: E402 (bench/ is on the path when run as a script)

NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_local_scalar_dense",
             "lift_fresh", "detach", "alias", "set_", "resize_", "record_stream", "_unsafe_view"}


class Counter(TorchDispatchMode):
    """Counts launches by the backend's current schedule item (backend.TRACE)."""

    def __init__(self):
        super().__init__()
        self.by_item: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.in_launch = False      # torch ops inside a Triton launch are the interpreter's own

    def where(self) -> str:
        return backend.TRACE[-1] if backend.TRACE else "(engine)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if not view and name not in NO_KERNEL and not self.in_launch:
            self.by_item[self.where()]["torch." + name] += 1
        return func(*args, **(kwargs or {}))


def count_step(engine: Engine, batch: int) -> Counter:
    slots = engine.cache.allocate(batch)
    engine.prefill(slots, [[1, 2, 3]] * batch)
    engine.decode(slots, [4] * batch)             # warm: compile, first-use allocations
    counter = Counter()
    launch = codegen.launch

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
    backend.TRACE = []
    for mod in mods:
        mod.launch = counted
    try:
        with counter:
            engine.decode(slots, [5] * batch)
    finally:
        for mod in mods:
            mod.launch = launch
        backend.TRACE = None
    return counter


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="published model: keep the first N layers")
    ap.add_argument("--experts", type=int, default=32, help="published model: experts per MoE layer")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    src = slice_config(a.layers, a.experts) if a.model == "kimi-linear-48b-a3b" else a.model
    model = kimi_graph.load(src, dtype=getattr(torch, a.dtype), device=device, pipeline="default",
                            backend="triton")
    engine = Engine(model, max_batch=a.batch, max_len=64)
    counter = count_step(engine, a.batch)
    per_layer: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    other = collections.Counter()
    for item, c in counter.by_item.items():
        m = re.match(r"%l(\d+)\.", item)
        (per_layer[int(m.group(1))] if m else other).update(c)
    kinds = model.config.layer_kinds
    print(f"{'layer':>5} {'kind':>4} {'ffn':>5} {'triton':>6} {'torch':>5} {'total':>5}")
    for i in sorted(per_layer):
        c = per_layer[i]
        tri = sum(v for k, v in c.items() if k.startswith("triton."))
        ffn = "moe" if model.config.is_moe_layer(i) else "dense"
        print(f"{i:>5} {kinds[i]:>4} {ffn:>5} {tri:>6} {sum(c.values()) - tri:>5} {sum(c.values()):>5}")
    total = sum(sum(c.values()) for c in counter.by_item.values())
    print(f"outside layers (embedding, head, engine): {sum(other.values())}  {dict(other)}")
    print(f"launches per decode step: {total}")
    seen = set()
    for i in sorted(per_layer):
        key = (kinds[i], model.config.is_moe_layer(i))
        if key in seen:
            continue
        seen.add(key)
        items = {k: dict(v) for k, v in counter.by_item.items() if k.startswith(f"%l{i}.")}
        print(f"layer {i} ({key[0]}, {'moe' if key[1] else 'dense'}):")
        for k, v in items.items():
            print(f"    {k}: {v}")


if __name__ == "__main__":
    main()
