"""`kimi-graph inspect MODEL [--json]`: the IR and a summary of a model (no weights needed)."""
from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("model", help="model directory (config.json) or preset name")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16", "f64"])
    p.add_argument("--mode", default="prefill", choices=["prefill", "decode"])
    p.add_argument("--no-ir", action="store_true", help="summary only")


def run(args) -> int:
    from ..api import resolve_config
    from ..model import build_graph
    from ..summary import summarize

    cfg, _ = resolve_config(args.model)
    g = build_graph(cfg, args.mode, dtype=args.dtype)
    facts = summarize(cfg, g if args.mode == "prefill" and args.dtype == "bf16" else None)
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    if not args.no_ir:
        print(g)
    print(format_summary(facts))
    return 0


def format_summary(f: dict) -> str:
    lines = [
        f"total params            {f['total_params'] / 1e9:8.3f} B",
        f"active params / token   {f['active_params_per_token'] / 1e9:8.3f} B",
        f"layers                  {f['layers']['kda']} KDA + {f['layers']['mla']} MLA "
        f"({f['moe_layers']} MoE)",
        f"MLA cache / token       {f['kv_cache_bytes_per_token']} bytes (bf16)",
        f"KDA state / sequence    {f['kda_state_bytes_per_sequence']} bytes",
        f"FLOPs / token           {f['flops_per_token'] / 1e9:8.3f} G (prefill, short context)",
        f"ops                     {f['num_ops']}",
    ]
    lines += [f"  {k:<22}{v}" for k, v in f["op_counts"].items()]
    return "\n".join(lines)
