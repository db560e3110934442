"""`kimi-graph serve MODEL`: an OpenAI-compatible HTTP server with continuous batching
(kimi_graph.runtime.server; needs the `serve` extra: pip install -e ".[serve]")."""
from __future__ import annotations

import os

DTYPES = ("f32", "bf16", "f16", "f64")


def add_arguments(p):
    p.add_argument("model", help="model directory or preset name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="interpreter", help="interpreter, torch, triton, onnxruntime")
    p.add_argument("--dtype", default="f32", choices=DTYPES)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--pipeline", default=None, help="pass pipeline to run before execution")
    p.add_argument("--experts", default=None,
                   help="storage of the routed experts' weights (default: --dtype); other formats "
                        "only where the loader supports them")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache slots)")
    p.add_argument("--max-len", type=int, default=4096, help="positions per sequence: prompt + new tokens")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more get HTTP 429")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill call")
    p.add_argument("--step-tokens", type=int, default=None,
                   help="tokens per scheduler step, decodes plus prefill chunks "
                        "(default: max batch + prefill chunk)")
    p.add_argument("--page-size", type=int, default=None, help="paged MLA caches of this many tokens")
    p.add_argument("--prefix-cache-mb", type=float, default=0,
                   help="keep up to this many MB of prompt prefixes (states at prefill-chunk "
                        "boundaries) for prompts that repeat them (default 0: off)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode steps as CUDA graphs (CUDA, --backend triton --pipeline default)")
    p.add_argument("--api-key", default=os.environ.get("KIMI_GRAPH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $KIMI_GRAPH_API_KEY; none: open)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    p.add_argument("--seed", type=int, default=0, help="preset weights' seed")
    p.add_argument("--parallel", default=None,
                   help="tp=N, ep=M or tp=N,ep=M: this process is one of N*M ranks started by "
                        "torchrun; rank 0 serves HTTP, the others follow its steps")
    p.add_argument("--log-level", default="info")


def expert_formats() -> tuple[str, ...]:
    """The expert storage formats `load` accepts besides the default."""
    from .. import api
    return tuple(getattr(api, "EXPERT_FORMATS", ()))


def run(args) -> int:
    from ..api import load
    from ..ops import TORCH_DTYPES

    try:
        from ..runtime.server import build_server, run as serve
    except ImportError as e:
        raise ValueError(f"serving needs the serve extra (pip install 'kimi-graph[serve]'): {e}") from None
    options = {}
    if args.experts is not None:
        if args.experts not in expert_formats():
            known = ", ".join(expert_formats()) or "none yet besides the default"
            raise ValueError(f"--experts {args.experts!r} is not supported by the loader (formats: {known})")
        options["experts"] = args.experts
    for name in ("max_batch", "max_len", "max_queue", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    device, leader = args.device, True
    if args.parallel is not None:
        from ..parallel import follow_rank_zero, init_process_group_from_env
        device = init_process_group_from_env(args.device)
        leader = follow_rank_zero()
    model = load(args.model, dtype=TORCH_DTYPES[args.dtype], device=device, seed=args.seed,
                 backend=args.backend, pipeline=args.pipeline, parallel=args.parallel, **options)
    sizing = dict(max_batch=args.max_batch, max_len=args.max_len, max_queue=args.max_queue,
                  prefill_chunk=args.prefill_chunk, step_tokens=args.step_tokens,
                  page_size=args.page_size, prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
                  cuda_graphs=args.cuda_graphs)
    if args.parallel is None:
        serve(build_server(model, name=args.served_model_name or args.model, api_key=args.api_key, **sizing),
              args.host, args.port, log_level=args.log_level)
        return 0
    import torch.distributed as dist

    from ..runtime.replicated import FollowerScheduler, LeaderScheduler
    from ..runtime.server import build_scheduler
    if leader:
        serve(build_server(model, name=args.served_model_name or args.model, api_key=args.api_key,
                           scheduler_class=LeaderScheduler, **sizing), args.host, args.port,
              log_level=args.log_level)
    else:
        build_scheduler(model, scheduler_class=FollowerScheduler, **sizing).follow()
    dist.destroy_process_group()
    return 0
