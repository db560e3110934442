"""Accuracy of low-bit experts on a published-width slice (random weights): the first N layers
of Kimi-Linear-48B (hidden 2304, 256 experts top-8, expert width 1024; layer 0 dense, then
MoE), every format against the same model with full-precision experts:
- relative logits error ||q - f|| / ||f|| over a random prompt (targets: int8 <= 0.03,
  fp8 <= 0.08, int4 g128 <= 0.2);
- greedy agreement: the share of prompt positions whose top-1 token agrees, and how many of
  `--new` greedily generated tokens agree before the first difference.
Formats: int8, fp8 (prefill on the W8A8 kernels where the target takes them), int4 (the
target's defaults: decode by id, weight-only), and "int4-w4a8": int4 with every grouped call
and every decode step on moe_w4a8's kernels (int8 activations; rows_max lifted, quant_direct
off), the numerics of the decode-sized W4A8 path over the whole model.

    python bench/lowbit_accuracy.py                     # GPU if there is one, fp32
    python bench/lowbit_accuracy.py --device cpu --num-experts 32 --tokens 32   # a CPU preview
    python bench/lowbit_accuracy.py --device cpu --formats int4 --write --name lowbit-accuracy-int4
        # the whole slice on a CPU: about 10 min and 17 GB a format
Writes bench/results/NAME.json (with --write; --name, default lowbit-accuracy)."""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kimi_graph  # noqa: E402
from kimi_graph.config import KimiLinearConfig  # noqa: E402
from kimi_graph.presets import PRESETS  # noqa: E402

TARGETS = {"int8": 0.03, "fp8": 0.08, "int4": 0.2, "int4-w4a8": 0.2}


def published_slice(layers: int, num_experts: int) -> KimiLinearConfig:
    cfg = json.loads(json.dumps(PRESETS["kimi-linear-48b-a3b"]))
    cfg.update(num_hidden_layers=layers, num_experts=num_experts)
    kda = [i for i in cfg["linear_attn_config"]["kda_layers"] if i <= layers]
    cfg["linear_attn_config"].update(kda_layers=kda, full_attn_layers=[i for i in range(1, layers + 1)
                                                                       if i not in kda])
    return KimiLinearConfig.from_dict(cfg)


@contextlib.contextmanager
def w4a8_everywhere(on: bool):
    """With `on`: int4 grouped calls of any size on moe_w4a8's kernels, decode steps included."""
    from kimi_graph.lowering.triton.targets import TARGETS, current_target
    if not on or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        yield           # no Triton kernels run (the CPU preview: the op library's reference)
        return
    configs = TARGETS[current_target()]["configs"]
    q, d = configs["moe_gemm_q"], configs["moe_decode"]
    saved = dict(q), dict(d)
    q.update(rows_max=1 << 30, rows_kernel="w4a8")
    d.update(quant_direct=False)
    try:
        yield
    finally:
        q.clear(), q.update(saved[0]), d.clear(), d.update(saved[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--num-experts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256, help="prompt length")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens generated")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--formats", default="int8,fp8,int4,int4-w4a8")
    ap.add_argument("--write", action="store_true", help="write bench/results/NAME.json")
    ap.add_argument("--name", default="lowbit-accuracy")
    args = ap.parse_args(argv)
    cfg = published_slice(args.layers, args.num_experts)
    dtype = getattr(torch, args.dtype)
    ids = torch.randint(3, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    kw = dict(dtype=dtype, device=args.device, pipeline="default")
    full = kimi_graph.load(cfg, **kw)
    ref = full(ids).float()
    ref_new = full.generate([ids[0].tolist()], max_new_tokens=args.new, ignore_eos=True)[0]
    del full
    gc.collect()                                           # its graphs hold cycles: the weights go now
    rows = []
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        with w4a8_everywhere(fmt.endswith("-w4a8")):
            q = kimi_graph.load(cfg, experts=fmt.split("-")[0], **kw)
            out = q(ids).float()
            new = q.generate([ids[0].tolist()], max_new_tokens=args.new, ignore_eos=True)[0]
        same = next((i for i, (a, b) in enumerate(zip(new, ref_new)) if a != b), len(new))
        err = ((out - ref).norm() / ref.norm()).item()
        rows.append({"format": fmt, "rel_logits_err": err, "target": TARGETS[fmt], "ok": err <= TARGETS[fmt],
                     "top1_agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                     "greedy_same_prefix": f"{same}/{len(new)}", "s": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        del q
        gc.collect()
    print(f"published-width slice: {args.layers} layers, {args.num_experts} experts, {args.tokens} tokens, "
          f"{args.dtype}, device {args.device}")
    print(f"{'format':>7}{'rel err':>10}{'target':>8}{'top-1 agree':>13}{'greedy':>9}")
    for r in rows:
        print(f"{r['format']:>7}{r['rel_logits_err']:>10.4f}{r['target']:>8}{r['top1_agree']:>13.3f}"
              f"{r['greedy_same_prefix']:>9}")
    if args.write:
        from harness import write_result
        write_result(args.name, rows, {"layers": args.layers, "num_experts": args.num_experts,
                                               "tokens": args.tokens, "new": args.new, "dtype": args.dtype})


if __name__ == "__main__":
    main()
