"""`kimi-graph inspect MODEL [--pipeline P] [--mode prefill|decode] [--json] [--svg FILE]`:
a model's IR (after a pass pipeline if given), a summary, and op counts, FLOPs and bytes
per token before vs after the pipeline, and the bytes of weights held after it (every graph
the model runs, in --dtype) against the checkpoint's. No weights needed: passes run on types
only, weight bytes are counted on the meta device."""
from __future__ import annotations

import json
import sys

from .output import add_experts_option


def add_arguments(p):
    p.add_argument("model", help="model directory (config.json) or preset name")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16", "f64"])
    p.add_argument("--mode", default="prefill", choices=["prefill", "decode"])
    p.add_argument("--stateful", action="store_true", help="prefill continuing from caches")
    p.add_argument("--no-ir", action="store_true", help="summary only")
    p.add_argument("--pipeline", help="pass pipeline, e.g. 'default' or 'canonicalize,cse,dce'")
    add_experts_option(p)
    p.add_argument("--print-ir-after-all", action="store_true", help="the IR after every pass (stderr)")
    p.add_argument("--print-ir-before-all", action="store_true", help="the IR before every pass (stderr)")
    p.add_argument("--print-ir-after", metavar="PASSES", default="",
                   help="comma-separated passes whose output IR is printed (stderr)")
    p.add_argument("--print-ir-before", metavar="PASSES", default="",
                   help="comma-separated passes whose input IR is printed (stderr)")
    p.add_argument("--svg", metavar="FILE", help="write a picture of the (optimized) graph")
    p.add_argument("--layer", type=int, help="picture only decoder layer N (0-based)")
    p.add_argument("--tokens", type=int, default=1,
                   help="T for the cost table (prefill tokens per sequence; default 1)")
    p.add_argument("--context", type=int, default=4096,
                   help="S for the cost table (MLA cache slots; default 4096)")


def cost_facts(g, dims: dict[str, int]) -> dict:
    """Op counts, FLOPs and bytes moved per token (dims B, T, S bound)."""
    from ..summary import graph_cost

    cost = graph_cost(g, dims)
    tokens = dims.get("B", 1) * dims.get("T", 1)
    return {"num_ops": len(g), "op_counts": g.op_counts(), "num_params": len(g.params),
            "flops_per_token": cost["flops"] / tokens, "bytes_per_token": cost["bytes"] / tokens,
            "link_bytes_per_token": cost["link_bytes"] / tokens}


def sharded(pipeline: str | None) -> dict:
    """A pipeline that starts with `shard{...}`: the model is one rank's part (its weights are
    counted as that rank holds them) and the rest of the pipeline optimizes it."""
    from ..passes import parse_pipeline
    from ..passes.manager import format_step
    steps = parse_pipeline(pipeline) if pipeline else []
    if not steps or steps[0][0] != "shard":
        return {"pipeline": pipeline}
    from ..parallel import Layout
    rest = ",".join(format_step(*s) for s in steps[1:])
    return {"pipeline": rest or None, "layout": Layout(**steps[0][1])}


def run(args) -> int:
    from ..api import KimiModel, experts_pipeline, resolve_config
    from ..model import build_graph
    from ..ops import TORCH_DTYPES
    from ..summary import summarize, weight_facts

    if (args.print_ir_after or args.print_ir_before or args.print_ir_after_all
            or args.print_ir_before_all) and not args.pipeline:
        raise ValueError("--print-ir-* options print around the passes of --pipeline; give one")
    if args.layer is not None and not args.svg:
        raise ValueError("--layer selects what --svg draws; give --svg FILE too")
    if args.tokens < 1 or args.context < 1:
        raise ValueError("--tokens and --context must be >= 1")
    args.pipeline = experts_pipeline(args.pipeline, args.experts)
    cfg, _ = resolve_config(args.model)
    g = build_graph(cfg, args.mode, stateful=args.stateful, dtype=args.dtype)
    facts = summarize(cfg, g if args.mode == "prefill" and not args.stateful and args.dtype == "bf16"
                      else None)
    model = KimiModel(cfg, {}, dtype=TORCH_DTYPES[args.dtype], device="meta",
                      router_weights="official", **sharded(args.pipeline))
    final, records = g, []
    if args.pipeline:
        from ..passes import PassManager

        names = lambda text: [n.strip() for n in text.split(",") if n.strip()]  # noqa: E731
        pm = PassManager(args.pipeline,
                         print_ir_after="all" if args.print_ir_after_all else names(args.print_ir_after),
                         print_ir_before="all" if args.print_ir_before_all else names(args.print_ir_before))
        final = pm.run(g, transforms=model.transforms)
        records = pm.records
        dims = {"B": 1, "T": 1 if args.mode == "decode" else args.tokens, "S": args.context}
        facts["pipeline"] = {"pipeline": args.pipeline, "mode": args.mode, "dims": dims,
                             "before": cost_facts(g, dims), "after": cost_facts(final, dims),
                             "passes": [r.as_dict() for r in records]}
        if "absorb_mla" in final.meta:
            facts["pipeline"]["absorb_mla"] = final.meta["absorb_mla"]
    key = (args.mode, args.stateful or args.mode == "decode")
    facts.update(weight_facts(model, model.build(*key) if model.layout else g, {key: final}))
    if args.svg:
        from ..svg import render_svg

        with open(args.svg, "w") as f:
            f.write(render_svg(final, layer=args.layer,
                               title=f"{args.model} {args.mode}" + (f" after {args.pipeline}"
                                                                     if args.pipeline else "")
                               + (f", layer {args.layer}" if args.layer is not None else "")))
        print(f"wrote {args.svg}", file=sys.stderr)
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    if not args.no_ir:
        print(final)
    print(format_summary(facts))
    if args.pipeline:
        from ..passes import format_timing

        print("\n" + format_timing(records))
        print("\n" + format_comparison(facts["pipeline"]))
    return 0


def format_comparison(p: dict) -> str:
    """Op counts, FLOPs and bytes per token before vs after the pipeline."""
    b, a = p["before"], p["after"]
    dims = ", ".join(f"{k}={v}" for k, v in p["dims"].items())
    lines = [f"{'per token (' + dims + ')':<34}{'before':>16}{'after':>16}",
             f"{'ops':<34}{b['num_ops']:>16}{a['num_ops']:>16}",
             f"{'GFLOPs':<34}{b['flops_per_token'] / 1e9:>16.4f}{a['flops_per_token'] / 1e9:>16.4f}",
             f"{'GB moved':<34}{b['bytes_per_token'] / 1e9:>16.4f}{a['bytes_per_token'] / 1e9:>16.4f}"]
    if b["link_bytes_per_token"] or a["link_bytes_per_token"]:      # collectives: sent per rank
        lines.append(f"{'MB sent to other ranks':<34}{b['link_bytes_per_token'] / 1e6:>16.4f}"
                     f"{a['link_bytes_per_token'] / 1e6:>16.4f}")
    lines.append(f"{'op kind':<34}{'before':>16}{'after':>16}")
    for k in sorted(set(b["op_counts"]) | set(a["op_counts"])):
        lines.append(f"  {k:<32}{b['op_counts'].get(k, 0):>16}{a['op_counts'].get(k, 0):>16}")
    return "\n".join(lines)


def format_summary(f: dict) -> str:
    from .output import human, human_bytes
    lines = [
        f"total params            {human(f['total_params'])}",
        f"active params / token   {human(f['active_params_per_token'])}",
        f"layers                  {f['layers']['kda']} KDA + {f['layers']['mla']} MLA "
        f"({f['moe_layers']} MoE)",
        f"MLA cache / token       {human_bytes(f['kv_cache_bytes_per_token'])} (bf16)",
        f"KDA state / sequence    {human_bytes(f['kda_state_bytes_per_sequence'])}",
        f"FLOPs / token           {human(f['flops_per_token'], 'FLOP')} (prefill, short context)",
        f"ops                     {f['num_ops']}",
    ]
    if "weight_bytes" in f:
        lines.insert(2, f"weights held            {f['weight_bytes'] / 1e9:8.3f} GB "
                        f"(checkpoint {f['checkpoint_bytes'] / 1e9:.3f} GB)")
    lines += [f"  {k:<22}{v}" for k, v in f["op_counts"].items()]
    return "\n".join(lines)
