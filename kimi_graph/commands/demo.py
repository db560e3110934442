"""`kimi-graph demo`: the main job on the embedded tiny model: build, summarise, run."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--model", default="tiny", help="preset or model directory (default: tiny)")
    p.add_argument("--prompt-ids", default="1,5,9,14,3", help="comma-separated token ids")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import time

    import torch

    from ..api import load
    from ..summary import summarize
    from ..verifier import verify
    from .inspect import format_summary

    t0 = time.perf_counter()
    model = load(args.model, seed=args.seed)
    verify(model.graph)
    print(f"== {model!r}: graph built and verified in {time.perf_counter() - t0:.2f} s")
    print(format_summary(summarize(model.config)))
    ids = torch.tensor([[int(x) for x in args.prompt_ids.split(",")]])
    t0 = time.perf_counter()
    logits = model(ids)
    print(f"== prefill of {ids.shape[1]} tokens: logits {tuple(logits.shape)} in "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms; next token (greedy): "
          f"{int(logits[0, -1].argmax())}")
    t0 = time.perf_counter()
    new = model.generate([ids[0].tolist()], max_new_tokens=8, ignore_eos=True)[0]
    print(f"== generated 8 tokens (greedy, prefill + decode with caches) in "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms: {new}")
    return 0
