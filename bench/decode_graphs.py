"""Decode step time, eager vs CUDA graphs, on a published-width slice with random weights:
each slot primed to the context with random cache contents (Engine.fill_context), greedy
tokens fed back. Prints ms per step and the kernel-compile / capture time.

    python bench/decode_graphs.py --layers 4 --batches 1,8,32 --context 1024
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import kimi_graph
from kimi_graph.config import KimiLinearConfig
from kimi_graph.presets import PRESETS
from kimi_graph.runtime import Engine


def slice_config(layers: int | None, experts: int | None) -> KimiLinearConfig:
    """The published config cut to its first `layers` layers (its KDA/MLA pattern kept), with
    `experts` routed experts per MoE layer (None: 256)."""
    cfg = json.loads(json.dumps(PRESETS["kimi-linear-48b-a3b"]))
    layers = layers or cfg["num_hidden_layers"]
    lac = cfg["linear_attn_config"]
    cfg["num_hidden_layers"] = layers
    lac["kda_layers"] = [i for i in lac["kda_layers"] if i <= layers]
    lac["full_attn_layers"] = [i for i in lac["full_attn_layers"] if i <= layers]
    if experts:
        cfg["num_experts"] = experts
    return KimiLinearConfig.from_dict(cfg)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32, help="experts per MoE layer (256 published; fewer load faster)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--page-size", type=int, default=64)
    a = ap.parse_args(argv)
    model = kimi_graph.load(slice_config(a.layers, a.experts), dtype=torch.bfloat16, device="cuda",
                            pipeline="default", backend="triton")
    print(f"{'B':>4} {'context':>7} {'eager ms':>9} {'graph ms':>9} {'capture s':>9}")
    for B in [int(b) for b in a.batches.split(",")]:
        row = []
        for graphs in (False, True):
            engine = Engine(model, max_batch=B, max_len=a.context + a.steps + 8, page_size=a.page_size,
                            cuda_graphs=graphs)
            slots = engine.cache.allocate(B)
            engine.fill_context(slots, a.context)
            tokens = list(range(B))
            t0 = time.perf_counter()
            if graphs:
                engine.capture_graphs([B])
            tokens = engine.decode(slots, tokens).argmax(-1).tolist()     # warm
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(a.steps):
                tokens = engine.decode(slots, tokens).argmax(-1).tolist()
            torch.cuda.synchronize()
            row.append(((time.perf_counter() - t0) / a.steps * 1e3, first))
            del engine
        print(f"{B:>4} {a.context:>7} {row[0][0]:>9.3f} {row[1][0]:>9.3f} {row[1][1]:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
