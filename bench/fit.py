"""Does the published model fit on one GPU, and how fast does it load? Loads the preset (its
first --layers layers; all 27 by default) through the public API with pipeline="default",
random weights drawn on the device, then generates a few tokens. Prints load time (graphs
built and optimized, weights drawn), peak memory against the load's own estimate, bytes of
weights held after the pipeline against the checkpoint's, and the tokens.

    python bench/fit.py                       # H200: 27 layers, bf16, triton, cuda
    python bench/fit.py --layers 8
    python bench/fit.py --config tiny --device cpu --backend interpreter --dtype f32   # CPU check

Done when (issue 10): the 27-layer model loads and generates; weights held <= 1.05x the
checkpoint's bytes; loading random preset weights takes <= 60 s.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import slice_dict  # noqa: E402  (puts the repo on sys.path)

import kimi_graph  # noqa: E402
from kimi_graph.config import KimiLinearConfig  # noqa: E402
from kimi_graph.loading import free_memory  # noqa: E402
from kimi_graph.ops import TORCH_DTYPES  # noqa: E402


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="kimi-linear-48b-a3b")
    p.add_argument("--layers", type=int, default=None, help="first N layers (default: all)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="triton")
    p.add_argument("--pipeline", default="default")
    p.add_argument("--tokens", type=int, default=8, help="new tokens to generate")
    args = p.parse_args(argv)
    cfg = KimiLinearConfig.from_dict(slice_dict(args.config, args.layers))
    free = free_memory(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = kimi_graph.load(cfg, dtype=TORCH_DTYPES[args.dtype], device=args.device,
                            backend=args.backend, pipeline=args.pipeline)
    sync(args.device)
    load_s = time.perf_counter() - t0
    load_peak = peak_bytes(args.device)
    checkpoint = sum(t.nbytes() for t in model.source.types.values())
    prompt = [(7 * i + 3) % cfg.vocab_size for i in range(16)]
    t0 = time.perf_counter()
    out = model.generate([prompt], max_new_tokens=args.tokens, ignore_eos=True)
    sync(args.device)
    gen_s = time.perf_counter() - t0
    st = model.load_stats
    r = {"config": f"{args.config} ({cfg.num_hidden_layers} layers)", "dtype": args.dtype,
         "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
         "backend": args.backend, "pipeline": args.pipeline, "free_before_GB": (free or 0) / 1e9,
         "load_s": load_s, "graphs_s": st["graphs_s"], "weights_s": st["weights_s"],
         "peak_after_load_GB": load_peak / 1e9, "estimated_peak_GB": st["peak_bytes_estimate"] / 1e9,
         "weight_GB": model.weight_bytes / 1e9, "checkpoint_GB": checkpoint / 1e9,
         "held_over_checkpoint": model.weight_bytes / checkpoint,
         "generate_s": gen_s, "peak_after_generate_GB": peak_bytes(args.device) / 1e9,
         "tokens": out[0]}
    width = max(map(len, r))
    for k, v in r.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
