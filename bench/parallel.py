"""Tensor and expert parallel on several GPUs (torchrun, one process per GPU, NCCL), against
one GPU in the same run, through the public API with random weights drawn on each device
(every rank cuts its slices from the same seeded draws).

    torchrun --nproc-per-node 2 bench/parallel.py                      # 2 GPUs: tp=2 and ep=2
    torchrun --nproc-per-node 2 bench/parallel.py --config tiny --device cpu --backend interpreter \
        --dtype float32 --layers 0 --full-layers 0 --prefill 1x16 --batches 1,2 --context 32
                                                                       # CPU smoke test (gloo)

1. Check (`--check-dtype`, fp32 by default) on a published-width slice (`--layers`): each
   layout's logits of a prompt against the single-GPU model's (relative error), and greedy
   tokens equal.
2. Speed (`--dtype`, bf16) on the same slice: single GPU (rank 0 alone) and each layout:
   prefill tok/s per `--prefill` shape, decode ms/step at each of `--batches` and `--context`
   (CUDA graphs on CUDA), bf16 greedy tokens against the single GPU's (how many agree).
3. The whole model (`--full-layers`, 27) per layout: load time, weights held per rank,
   greedy generation, prefill tok/s and decode ms/step.
Results: bench/results/parallel.json (and $OUT/parallel.json); the table prints last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import decode_step_fn, free_memory, parse_list, parse_prefill, prefill_batch, slice_dict, timed  # noqa: E402

import kimi_graph  # noqa: E402
from kimi_graph.config import KimiLinearConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LEN = 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


class Bench:
    def __init__(self, args):
        import torch.distributed as dist
        from kimi_graph.parallel import init_process_group_from_env
        self.args, self.dist = args, dist
        # a rank that fails mid-collective stops the others within minutes, not at the 10-minute default
        self.device = init_process_group_from_env(args.device, timedelta(minutes=args.timeout_min))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cuda = self.device.startswith("cuda")
        self.rows: list[dict] = []
        self.info: dict = {"world": self.world, "args": vars(args)}

    def say(self, row: dict) -> None:
        if self.rank == 0:
            print(json.dumps(row, default=str), flush=True)

    def load(self, cfg: dict, dtype, parallel: str | None):
        free_memory()
        t0 = time.perf_counter()
        m = kimi_graph.load(KimiLinearConfig.from_dict(cfg), dtype=dtype, device=self.device,
                            backend=self.args.backend, pipeline=self.args.pipeline, parallel=parallel)
        for mode in ("prefill", "decode"):
            m.get_graph(mode, stateful=True)
        if self.cuda:
            torch.cuda.synchronize()
        return m, {"load_s": time.perf_counter() - t0, "weight_gb_per_rank": m.weight_bytes / 1e9}

    def prompt(self, V: int) -> list[int]:
        return torch.randint(0, V, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()

    # -- one model: tokens, logits, speed ----------------------------------------------------
    def tokens(self, m, logits: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """Greedy tokens after the prompt (and the prompt's logits, through the stateless graph)."""
        p = self.prompt(m.config.vocab_size)
        toks = m.generate([p], max_new_tokens=self.args.new_tokens)[0]
        return toks, m(torch.tensor([p])).float().cpu() if logits else None

    def speed(self, m) -> dict:
        from kimi_graph.runtime.engine import Engine
        a, out = self.args, {}
        gen = torch.Generator().manual_seed(0)
        V = m.config.vocab_size
        for B, T in parse_prefill(a.prefill):
            engine = Engine(m, max_batch=B, max_len=T + 8)
            prompts = [torch.randint(0, V, (T,), generator=gen).tolist() for _ in range(B)]
            run = prefill_batch(engine, prompts, last_only=True)
            timed(run, self.device)
            out[f"prefill_{B}x{T}_tok_s"] = B * T / min(timed(run, self.device) for _ in range(2))
            del engine
        for B in parse_list(a.batches):
            engine = Engine(m, max_batch=B, max_len=a.context + a.steps + 32, cuda_graphs=self.cuda)
            slots = engine.cache.allocate(B)
            engine.fill_context(slots, a.context)
            step = decode_step_fn(engine, slots)
            for _ in range(3):
                step()
            ms = timed(step, self.device, reps=a.steps) * 1e3
            out[f"decode_B{B}_ms"], out[f"decode_B{B}_tok_s"] = ms, B / ms * 1e3
            del engine, step
        free_memory()
        return out

    # -- phases ------------------------------------------------------------------------------
    def run_layout(self, name: str, fn) -> dict:
        """fn() on every rank (or rank 0 alone for the single-GPU baseline); errors recorded."""
        try:
            row = {"what": name, **fn()}
        except Exception as e:      # noqa: BLE001 - a failed layout is a result too
            row = {"what": name, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        self.dist.barrier()
        self.rows.append(row)
        self.say(row)
        return row

    def single(self, fn) -> dict:
        return fn() if self.rank == 0 else {}

    def check(self, cfg: dict) -> None:
        dtype = getattr(torch, self.args.check_dtype)
        ref = {}

        def one():
            m, _ = self.load(cfg, dtype, None)
            ref["tokens"], ref["logits"] = self.tokens(m, logits=True)
            return {"tokens": ref["tokens"]}
        self.run_layout(f"check {self.args.check_dtype} single", lambda: self.single(one))
        for layout in self.layouts:
            def sharded():
                m, _ = self.load(cfg, dtype, layout)
                toks, logits = self.tokens(m, logits=True)
                if self.rank != 0 or "tokens" not in ref:
                    return {}
                return {"tokens_equal": toks == ref["tokens"], "logits_rel_err": rel_err(logits, ref["logits"])}
            self.run_layout(f"check {self.args.check_dtype} {layout}", sharded)

    def speed_slice(self, cfg: dict) -> None:
        dtype = getattr(torch, self.args.dtype)
        ref = {}

        def one():
            m, info = self.load(cfg, dtype, None)
            ref["tokens"], _ = self.tokens(m)
            return {**info, **self.speed(m)}
        self.run_layout(f"slice {cfg['num_hidden_layers']}L single", lambda: self.single(one))
        for layout in self.layouts:
            def sharded():
                m, info = self.load(cfg, dtype, layout)
                toks, _ = self.tokens(m)
                agree = next((i for i, (a, b) in enumerate(zip(toks, ref.get("tokens", toks))) if a != b),
                             len(toks))
                return {**info, **self.speed(m), "greedy_tokens_agreeing": agree}
            self.run_layout(f"slice {cfg['num_hidden_layers']}L {layout}", sharded)

    def full(self, cfg: dict) -> None:
        dtype = getattr(torch, self.args.dtype)
        for layout in self.layouts:
            def whole():
                m, info = self.load(cfg, dtype, layout)
                peak = torch.cuda.max_memory_allocated() / 1e9 if self.cuda else float("nan")
                toks, _ = self.tokens(m)
                return {**info, "peak_gb_after_load": peak, "tokens": toks[:8], **self.speed(m)}
            self.run_layout(f"full {cfg['num_hidden_layers']}L {layout}", whole)

    def main(self) -> None:
        a = self.args
        self.layouts = [x for x in a.layouts.split(";") if x]
        try:
            if a.layers:
                if a.check_layers != 0:
                    self.check(slice_dict(a.config, a.check_layers or a.layers))
                self.speed_slice(slice_dict(a.config, a.layers))
            if a.full_layers:
                self.full(slice_dict(a.config, a.full_layers))
        finally:
            if self.rank == 0:
                self.write()
            self.dist.destroy_process_group()

    def write(self) -> None:
        if self.cuda:
            from harness import provenance
            prov = provenance()
        else:
            prov = {"device": "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        data = {**prov, **self.info, "rows": self.rows}
        text = json.dumps(data, indent=1, default=str)
        for d in filter(None, [os.environ.get("OUT"), str(RESULTS) if self.cuda else None]):
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / f"{self.args.name}.json").write_text(text)
        print(f"== {self.args.name}  ({prov['device']} x{self.world}, {prov['date']}, commit {prov.get('commit', '?')})")
        cols = ["load_s", "weight_gb_per_rank"] + [k for r in self.rows for k in r
                                                   if k.startswith(("prefill_", "decode_")) and k.endswith(("tok_s", "ms"))]
        cols = list(dict.fromkeys(cols))
        names = [c.replace("_tok_s", " tok/s").replace("_ms", " ms").replace("_", " ") for c in cols]
        width = [max(len(n) + 2, 10) for n in names]
        print(f"{'':<28}" + "".join(f"{n:>{w}}" for n, w in zip(names, width)))
        for r in self.rows:
            cells = "".join(f"{r[c]:>{w}.4g}" if isinstance(r.get(c), float) else f"{str(r.get(c, '')):>{w}}"
                            for c, w in zip(cols, width))
            extra = {k: r[k] for k in ("tokens_equal", "logits_rel_err", "greedy_tokens_agreeing", "error") if k in r}
            print(f"{r['what']:<28}{cells}  {extra if extra else ''}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default="kimi-linear-48b-a3b")
    ap.add_argument("--layouts", default="tp=2;ep=2", help="';'-separated parallel layouts")
    ap.add_argument("--layers", type=int, default=4, help="the slice compared with one GPU (0: skip)")
    ap.add_argument("--check-layers", type=int, default=None, help="the fp32 check's slice (default --layers; 0: skip the check)")
    ap.add_argument("--full-layers", type=int, default=27, help="the whole model's depth (0: skip)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--check-dtype", default="float32")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--pipeline", default="default")
    ap.add_argument("--prefill", default="1x4096,32x512", help="BxT prompt shapes")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--timeout-min", type=float, default=4, help="collective timeout")
    ap.add_argument("--name", default="parallel")
    Bench(ap.parse_args(argv)).main()


if __name__ == "__main__":
    main()
