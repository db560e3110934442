"""Load generator for `kimi-graph serve`: N concurrent streaming completions of random token
ids, each `--input-len` in and exactly `--output-len` out (ignore_eos); reports output
tok/s and p50/p99 time-to-first-token and time-per-output-token, as the clients see them.

    python bench/serve.py --layers 8                      # starts the server itself (GPU)
    python bench/serve.py --url http://127.0.0.1:8000     # an already running server
    python bench/serve.py --config tiny --device cpu --dtype f32 --backend interpreter \
        --pipeline "" --requests 8 --input-len 16 --output-len 4 --max-batch 4   # CPU smoke test

Without --url it starts `kimi-graph serve`'s server in a child process (this script with
--serve: a preset cut to --layers, random weights drawn by `kimi_graph.load`), waits for
/health, sends a warm-up round (short requests, as many as --concurrency), then the load. TTFT is from sending the request to the
first token's event; TPOT is (last token - first token) / (tokens - 1) per request. Results:
bench/results/serve.json (and $OUT/serve.json) with device, date and commit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


async def one(client, url: str, model: str, prompt: list[int], out_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    times, error = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            for c in event.get("choices", []):
                times += [time.perf_counter()] * len(c.get("token_ids", []))
    if error or not times:
        return {"error": error or "no tokens"}
    return {"ttft": times[0] - t0, "tokens": len(times),
            "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None}


async def load(url: str, model: str, prompts: list[list[int]], out_len: int, concurrency: int,
               warmup: int):
    import httpx
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def bounded(p, n):
            async with sem:
                return await one(client, url, model, p, n)
        # warm-up: short requests all at once, so decode runs (compiles, captures) at every
        # batch size the load will see
        await asyncio.gather(*(bounded(p[:32], 4) for p in (prompts * warmup)[:warmup]))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p, out_len) for p in prompts))
        return results, time.perf_counter() - t0


def summarize(results: list[dict], wall: float, args) -> dict:
    ok = [r for r in results if "error" not in r]
    out = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] * 1e3 for r in ok]
    tpot = [r["tpot"] * 1e3 for r in ok if r["tpot"] is not None]
    return {"requests": len(results), "errors": len(results) - len(ok), "concurrency": args.concurrency,
            "input_len": args.input_len, "output_len": args.output_len, "wall_s": round(wall, 2),
            "output_tok_s": round(out / wall, 1), "total_tok_s": round((out + len(ok) * args.input_len) / wall, 1),
            "ttft_p50_ms": round(pct(ttft, 50), 1), "ttft_p99_ms": round(pct(ttft, 99), 1),
            "tpot_p50_ms": round(pct(tpot, 50), 2), "tpot_p99_ms": round(pct(tpot, 99), 2),
            "first_error": next((r["error"] for r in results if "error" in r), None)}


# -- the server, in a child process -----------------------------------------------------------
def model_config(args):
    """The preset (cut to --layers) or a model directory."""
    from kimi_graph.config import KimiLinearConfig
    if Path(args.config).is_dir():
        if args.layers:
            raise SystemExit("--layers cuts presets (random weights), not checkpoints")
        return args.config
    from e2e import slice_dict
    return KimiLinearConfig.from_dict(slice_dict(args.config, args.layers))


def serve(args) -> None:
    import torch
    import kimi_graph
    from kimi_graph.ops import TORCH_DTYPES
    from kimi_graph.runtime.server import build_server, run
    model = kimi_graph.load(model_config(args), dtype=TORCH_DTYPES[args.dtype], device=args.device,
                            backend=args.backend, pipeline=args.pipeline or None, seed=args.seed)
    server = build_server(model, name="bench", max_batch=args.max_batch,
                          max_len=args.input_len + args.output_len, max_queue=args.requests + 1,
                          prefill_chunk=args.prefill_chunk, step_tokens=args.step_tokens,
                          cuda_graphs=args.cuda_graphs)
    print(f"serving {model!r}, torch {torch.__version__}", flush=True)
    run(server, "127.0.0.1", args.port, log_level="warning")


def start_server(args, argv: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--serve", "--port", str(port)] + argv
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    import httpx
    end = time.time() + args.start_timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"the server did not start within {args.start_timeout} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (else one is started)")
    p.add_argument("--model-name", default="bench", help="with --url: the served model name")
    p.add_argument("--config", default="kimi-linear-48b-a3b", help="preset or model directory")
    p.add_argument("--layers", type=int, default=None, help="cut the preset to its first N layers")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--backend", default="triton")
    p.add_argument("--pipeline", default="default", help='"" for the graph as declared')
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=256, help="server: cache slots")
    p.add_argument("--prefill-chunk", type=int, default=512, help="server: prompt tokens per chunk")
    p.add_argument("--step-tokens", type=int, default=None, help="server: tokens per step")
    p.add_argument("--cuda-graphs", action="store_true", help="server: decode steps as CUDA graphs")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up requests (32 tokens in, 4 out) sent at once first (default: --concurrency)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-timeout", type=int, default=1800, help="seconds to wait for the server")
    p.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    proc, url, name = None, args.url, args.model_name
    if url is None:
        proc, url = start_server(args, argv)
    try:
        from kimi_graph.api import resolve_config
        vocab = resolve_config(args.config)[0].vocab_size
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.requests)]
        results, wall = asyncio.run(load(url, name, prompts, args.output_len, args.concurrency,
                                         args.concurrency if args.warmup is None else args.warmup))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    row = summarize(results, wall, args)
    row["server"] = {k: getattr(args, k) for k in ("config", "layers", "device", "dtype", "backend",
                                                    "pipeline", "max_batch", "prefill_chunk", "step_tokens",
                                                    "cuda_graphs")}
    text = json.dumps(row, indent=1)
    on_gpu = args.device.startswith("cuda")
    for d in filter(None, [os.environ.get("OUT"), on_gpu and str(ROOT / "results")]):
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / "serve.json").write_text(json.dumps({**provenance(args.device), **row}, indent=1))
    print(text)
    return 0 if not row["errors"] else 1


def provenance(device: str) -> dict:
    """Device, date, commit (the harness's when a GPU is present)."""
    import datetime
    if device.startswith("cuda"):
        from harness import provenance as gpu_provenance
        return gpu_provenance()
    return {"device": device, "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")}


if __name__ == "__main__":
    sys.exit(main())
