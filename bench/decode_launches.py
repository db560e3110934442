"""Kernel launches per decode step, per layer, without a profiler (kimi_graph.lowering.triton.launches:
every Triton launch and every torch op that runs a kernel, by the backend's schedule item).

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

import torch

import kimi_graph
from kimi_graph.lowering.triton.launches import LaunchCounter, counting
from kimi_graph.runtime import Engine

from decode_graphs import slice_config     # noqa: E402 (bench/ is on the path when run as a script)


def count_step(engine: Engine, batch: int) -> LaunchCounter:
    slots = engine.cache.allocate(batch)
    engine.prefill(slots, [[1, 2, 3]] * batch)
    engine.decode(slots, [4] * batch)             # warm: compile, first-use allocations
    with counting() as counter:
        engine.decode(slots, [5] * batch)
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
