"""The published model end to end on one GPU, through the public API, with random weights
drawn on the device: load, prefill, decode (eager and CUDA graphs), each decode figure also as
a fraction of the memory floor; transformers' own KimiLinearForCausalLM (with fla-core
kernels when importable) as the baseline in the same run; the long-context table.

    python bench/e2e.py                                   # 27 layers, every phase
    python bench/e2e.py --layers 8 --phases ours,hf       # a slice
    python bench/e2e.py --phases ours --backend torch --graphs off --name e2e-compiled \
        --backend-options '{"compile": true, "mode": "reduce-overhead", "kernels": "triton"}'
    python bench/e2e.py --config tiny --device cpu --phases ours --batches 1,2 --contexts 64 \
        --prefill 1x32,2x16                               # CPU smoke test (TRITON_INTERPRET=1)

Phases: `ours` (load, prefill, decode), `hf` (transformers on the same slice, after ours is
freed), `long` (B=1 decode at long contexts: Kimi Linear vs the same depth with every layer
MLA, the paper's counterfactual). Results: bench/results/e2e.json (and $OUT/e2e.json), with
device, date and commit; the table prints last.

The memory floor of a decode step is the bytes it must read over the copy bandwidth measured
in the same run (read + write bytes of a device-to-device copy per second): every weight but
the routed experts and the embedding table (one row per sequence), the routed experts the
batch touches (expected distinct experts for B tokens routed uniformly at random, which is
what random weights give), the MLA latent + key rows up to each sequence's context, and the
KDA and conv states.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import copy_bandwidth, gemm_rate, provenance  # noqa: E402  (puts the repo on sys.path)

import kimi_graph  # noqa: E402
from kimi_graph.config import KimiLinearConfig  # noqa: E402
from kimi_graph.model import build_graph  # noqa: E402
from kimi_graph.presets import PRESETS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- configs --------------------------------------------------------------------------------
def slice_dict(name: str, layers: int | None, all_mla: bool = False) -> dict:
    """The preset's config dict cut to its first `layers` layers (the published 3:1 pattern
    kept), or with every layer MLA."""
    d = copy.deepcopy(PRESETS[name])
    n = layers or d["num_hidden_layers"]
    d["num_hidden_layers"] = n
    la = d["linear_attn_config"]
    if all_mla:
        la["full_attn_layers"], la["kda_layers"] = list(range(1, n + 1)), []
    else:
        la["full_attn_layers"] = [i for i in la["full_attn_layers"] if i <= n]
        la["kda_layers"] = [i for i in la["kda_layers"] if i <= n]
    return d


# -- the memory floor -----------------------------------------------------------------------
def expected_distinct(E: int, k: int, n_tokens: int) -> float:
    """Expected number of distinct experts hit when n_tokens each pick k of E at random."""
    return E * (1.0 - (1.0 - k / E) ** n_tokens)


def routed_expert_bytes(model) -> float | None:
    """Bytes per routed-expert weight as the model holds them (codes, scales and zero points of
    low-bit experts included); None when it holds no routed experts."""
    cfg = model.config
    D, I, E = cfg.hidden_size, cfg.moe_intermediate_size or 0, cfg.num_experts or 0
    n = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) * E * 3 * D * I
    held = sum(t.numel() * t.element_size() for name, t in model.weights.items()
               if ".block_sparse_moe.experts." in name)
    return held / n if n and held else None


def floor_bytes(cfg: KimiLinearConfig, B: int, context: int, elem: int = 2, expert_elem: float | None = None) -> dict:
    """Bytes one decode step of B sequences at `context` tokens must read (routed experts at
    expert_elem bytes a weight, default elem)."""
    D, I = cfg.hidden_size, cfg.moe_intermediate_size or 0
    g = build_graph(cfg, "decode", dtype="bf16")
    routed = other = 0
    for n, t in g.params.items():
        if ".block_sparse_moe.experts." in n:
            routed += t.numel()
        elif "embed_tokens" in n:
            other += B * D
        else:
            other += t.numel()
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    E, k = cfg.num_experts or 1, cfg.num_experts_per_token or 0
    experts = moe_layers * expected_distinct(E, k, B) * 3 * D * I
    kinds = cfg.layer_kinds
    mla = kinds.count("mla") * B * context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem
    H, K, C = cfg.kda_heads, cfg.kda_head_dim, cfg.kda_heads * cfg.kda_head_dim
    kda = kinds.count("kda") * B * (H * K * K * 4 + 3 * C * (cfg.conv_kernel - 1) * elem)
    weights = other * elem + experts * (expert_elem or elem)
    return {"weights": weights, "mla_cache": mla, "kda_state": kda, "total": weights + mla + kda}


# -- timing ---------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int = 1) -> float:
    """Seconds per call of fn() (wall clock around synchronised calls)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else float("nan")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def parse_list(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse_prefill(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in x.split("x")) for x in s.split(",") if x]


def held_bytes(weights: dict) -> int:
    """Bytes of the distinct storages the weights hold (views of one storage count once)."""
    seen, n = set(), 0
    for t in weights.values():
        st = t.untyped_storage()
        key = (st.data_ptr(), st.device)
        if key not in seen:
            seen.add(key)
            n += st.nbytes()
    return n


# -- ours -----------------------------------------------------------------------------------
def load_ours(cfg: KimiLinearConfig, args) -> tuple[object, dict]:
    free_memory()
    t0 = time.perf_counter()
    model = kimi_graph.load(cfg, dtype=args.torch_dtype, device=args.device, pipeline=args.pipeline,
                            backend=args.backend, experts=args.experts, **json.loads(args.backend_options))
    for mode in ("prefill", "decode"):
        model.get_graph(mode, stateful=True)
    sync(args.device)
    info = {"load_s": time.perf_counter() - t0, "peak_gb_after_load": peak_gb(args.device),
            "weight_bytes": held_bytes(model.weights)}
    return model, info


def decode_step_fn(engine, slots: list[int]):
    """One greedy decode step of `slots` as generation runs it: the step (a CUDA-graph replay
    when the engine has graphs), the draw on the device, the tokens read back and fed in; with
    Engine(overlap=True) as its loop runs it: the next step queued, fed the draw on the device,
    before that draw is read back."""
    from kimi_graph.runtime.engine import HostTokens
    from kimi_graph.runtime.sampling import Sampler, SamplingParams
    sampler = Sampler(SamplingParams(max_new_tokens=1 << 30), len(slots))
    rows = list(range(len(slots)))
    V = engine.model.config.vocab_size
    tokens = [i % V for i in rows]
    drawn, pending = torch.tensor(tokens, device=engine.model.device), None

    def step():
        nonlocal tokens
        _, drawn = engine.decode_sample(slots, tokens, sampler, rows)
        tokens = drawn.tolist()

    def step_ahead():
        nonlocal drawn, pending
        drawn = engine.decode_ahead(slots, drawn, sampler, rows)
        if pending is not None:
            pending.read()
        pending = HostTokens(drawn)
    return step_ahead if engine.overlap else step


def prefill_batch(engine, prompts: list[list[int]], last_only: bool = False):
    """A closure that prefills `prompts` into freshly allocated slots of `engine`, frees them
    again and returns the logits (engine.prefill's): one timed unit of a prefill benchmark."""
    def run():
        slots = engine.cache.allocate(len(prompts))
        try:
            return engine.prefill(slots, prompts, last_only=last_only)
        finally:
            engine.cache.free(slots)
    return run


def bench_prefill(model, args, rows: list) -> None:
    from kimi_graph.runtime.engine import Engine
    gen = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    for B, T in args.prefill_shapes:
        engine = Engine(model, max_batch=B, max_len=T + 8, **args.engine_options)
        prompts = [torch.randint(0, V, (T,), generator=gen).tolist() for _ in range(B)]
        for logits in args.prefill_logits:
            run = prefill_batch(engine, prompts, last_only=logits == "last")
            first = timed(run, args.device)           # kernels compile just in time on first use
            s = min(timed(run, args.device) for _ in range(args.reps))
            rows.append({"what": "prefill", "shape": f"{B}x{T}", "logits": logits, "first_s": first, "s": s,
                         "tok_s": B * T / s, "peak_gb": peak_gb(args.device)})
            print(rows[-1], flush=True)
        del engine
        free_memory()


def bench_decode(model, args, bw: float, rows: list) -> None:
    from kimi_graph.runtime.engine import Engine
    cfg = model.config
    expert_elem = routed_expert_bytes(model)
    for L in args.contexts:
        for B in args.batches:
            fl = floor_bytes(cfg, B, L, expert_elem=expert_elem)
            row = {"what": "decode", "B": B, "context": L, "floor_ms": fl["total"] / bw * 1e3}
            need = fl["mla_cache"] * (L + args.steps + 8) / L + fl["kda_state"]
            free = torch.cuda.mem_get_info()[0] if args.device.startswith("cuda") else 1 << 62
            if need > 0.9 * free:
                row["skipped"] = f"caches need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
                rows.append(row)
                print(row, flush=True)
                continue
            for graphs in args.graph_modes:
                engine = Engine(model, max_batch=B, max_len=L + args.steps + 32,
                                **args.engine_options, **({"cuda_graphs": graphs} if graphs else {}))
                slots = engine.cache.allocate(B)
                engine.fill_context(slots, L)
                step = decode_step_fn(engine, slots)
                for _ in range(3):
                    step()
                ms = timed(step, args.device, reps=args.steps) * 1e3
                key = "graph" if graphs else "eager"
                row["overlap"] = engine.overlap
                row[f"{key}_ms"] = ms
                row[f"{key}_tok_s"] = B / ms * 1e3
                row[f"{key}_floor_frac"] = row["floor_ms"] / ms
                if not graphs and B == 1 and args.device.startswith("cuda"):
                    from harness import kernel_times
                    kt = kernel_times(step, reps=5)
                    row["kernel_ms"] = sum(kt.values())
                    row["top_kernels"] = {k: round(v, 4) for k, v in list(kt.items())[:6]}
                engine.cache.free(slots)
                del engine, step
                free_memory()
            rows.append(row)
            print(row, flush=True)


def phase_ours(cfg_dict: dict, args, bw: float, rows: list, info: dict) -> None:
    cfg = KimiLinearConfig.from_dict(cfg_dict)
    model, load_info = load_ours(cfg, args)
    info["ours"] = {**load_info, "layers": cfg.num_hidden_layers,
                    "checkpoint_bytes": args.torch_dtype.itemsize * sum(
                        t.numel() for t in build_graph(cfg, dtype="bf16").params.values())}
    print(info["ours"], flush=True)
    bench_prefill(model, args, rows)
    bench_decode(model, args, bw, rows)
    del model
    free_memory()


# -- transformers' own model (the baseline) -------------------------------------------------
def load_hf(cfg_dict: dict, args):
    """transformers' KimiLinearForCausalLM on the device with random weights drawn there
    (std 1/sqrt(fan_in), as ours), in the dtype a user would load it in."""
    import transformers
    from transformers import KimiLinearConfig as HFConfig, KimiLinearForCausalLM
    free_memory()
    t0 = time.perf_counter()
    hcfg = HFConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures",)})
    default = torch.get_default_dtype()
    torch.set_default_dtype(args.torch_dtype)
    try:
        with torch.device("meta"):
            model = KimiLinearForCausalLM(hcfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=args.device).eval()
    gen = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p, dtype=torch.float32).uniform_(1, 16, generator=gen).log())
            elif p.dim() >= 2 and "conv" not in name:
                p.normal_(0, 1 / math.sqrt(p.shape[-1]), generator=gen)
            elif "conv" in name:
                p.normal_(0, 0.5, generator=gen)
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.1, generator=gen)
        for _, b in model.named_buffers():
            if b.is_floating_point():
                b.zero_()
    sync(args.device)
    try:
        import fla  # noqa: F401
        kda = f"fla-core {fla.__version__}"
    except ImportError:
        kda = "torch fallback (fla-core not importable)"
    info = {"load_s": time.perf_counter() - t0, "transformers": transformers.__version__,
            "kda_kernels": kda, "experts": model.config._experts_implementation_internal
            if hasattr(model.config, "_experts_implementation_internal") else "?",
            "peak_gb_after_load": peak_gb(args.device)}
    return model, info


def phase_hf(cfg_dict: dict, args, rows: list, info: dict) -> None:
    model, hinfo = load_hf(cfg_dict, args)
    info["hf"] = {**hinfo, "layers": cfg_dict["num_hidden_layers"]}
    print(info["hf"], flush=True)
    V = cfg_dict["vocab_size"]
    gen = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():
        for B, T in args.prefill_shapes:
            ids = torch.randint(0, V, (B, T), generator=gen, device=args.device)
            for logits in args.prefill_logits:
                # caches built, as ours; "last": only the last position's logits, as generate asks
                keep = {"logits_to_keep": 1} if logits == "last" else {}
                run = lambda: model(ids, use_cache=True, **keep)        # noqa: E731
                first = timed(run, args.device)
                s = min(timed(run, args.device) for _ in range(args.reps))
                rows.append({"what": "hf_prefill", "shape": f"{B}x{T}", "logits": logits, "first_s": first, "s": s,
                             "tok_s": B * T / s, "peak_gb": peak_gb(args.device)})
                print(rows[-1], flush=True)
                free_memory()
        for L in args.hf_contexts:
            for B in args.hf_batches:
                ids = torch.randint(0, V, (B, L), generator=gen, device=args.device)
                out = model(ids, use_cache=True, logits_to_keep=1)
                cache, nxt = out.cache if hasattr(out, "cache") else out.past_key_values, \
                    out.logits[:, -1].argmax(-1, keepdim=True)
                del out

                def step():
                    nonlocal nxt
                    o = model(nxt, cache=cache, use_cache=True)
                    nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(3):
                    step()
                ms = timed(step, args.device, reps=args.steps) * 1e3
                rows.append({"what": "hf_decode", "B": B, "context": L, "eager_ms": ms,
                             "eager_tok_s": B / ms * 1e3})
                print(rows[-1], flush=True)
                del cache
                free_memory()
    del model
    free_memory()


# -- long context ---------------------------------------------------------------------------
ALL_MLA_RESERVE_S = 90      # what the all-MLA half of the long phase takes (load, fills, decode)


def chunk_cost_fit(chunks: list[tuple[int, int, float]]) -> tuple[float, float] | None:
    """(c1, c2) >= 0 with a chunk of n tokens from position x costing c1 n + c2 ((x + n)^2 - x^2)
    (its attention grows with x), a non-negative least-squares fit to the timed chunks (x, n, s).
    The run's first chunk is left out once there are three: it carries first-call costs (0 -> 4k
    took 1.9 s after the warm-up on the H200, 4k -> 128k 4.5 s, and a fit through both called
    128k -> 1M 439 s where the attention's rate says about 190 s). None before two chunks."""
    pts = chunks[1:] if len(chunks) >= 3 else chunks
    if len(pts) < 2:
        return None
    X = torch.tensor([[n, (x + n) ** 2 - x * x] for x, n, _ in pts], dtype=torch.float64)
    y = torch.tensor([s for *_, s in pts], dtype=torch.float64)
    scale = X.abs().amax(0).clamp_min(1.0)                  # columns of like size for the solve
    c = torch.linalg.lstsq(X / scale, y[:, None]).solution[:, 0] / scale
    if (c < 0).any():                                       # the better fit on one term alone
        fits = [torch.zeros(2, dtype=torch.float64) for _ in range(2)]
        for j in range(2):
            fits[j][j] = max(0.0, float(X[:, j] @ y / (X[:, j] @ X[:, j])))
        c = min(fits, key=lambda f: float(((X @ f - y) ** 2).sum()))
    return float(c[0]), float(c[1])


def prefill_estimate(chunks: list[tuple[int, int, float]], a: int, b: int) -> float | None:
    """Seconds to prefill positions a -> b, from the chunks timed so far (chunk_cost_fit)."""
    c = chunk_cost_fit(chunks)
    return None if c is None else c[0] * (b - a) + c[1] * (b * b - a * a)


def long_prompt(engine, slots: list[int], upto: int, vocab: int, gen, device: str,
                chunks: list[tuple[int, int, float]], deadline: float | None = None) -> dict:
    """Prefill the slot with random tokens from what it holds up to `upto` tokens, one engine
    chunk a call (a continuation), each timed into `chunks` (x, n, s). With a deadline (a
    time.perf_counter() value), a chunk whose estimate would pass it is not started: the row
    then says where the prefill stopped -> the row's prefill fields."""
    held = engine.cache.lengths[slots[0]]
    n = upto - held
    if n <= 0:
        return {"prefill_from": held, "prefill_tokens": 0}
    prompt = torch.randint(0, vocab, (n,), generator=gen).tolist()
    step, done, total, out = engine.prefill_chunk or n, 0, 0.0, {}
    while done < n:
        x, m = held + done, min(step, n - done)
        est = prefill_estimate(chunks, x, x + m)
        if deadline is not None and est is not None and time.perf_counter() + est > deadline:
            out["prefill_stopped"] = f"at {x} of {upto} tokens: the next chunk (est. {est:.1f} s) would pass the budget"
            print(out["prefill_stopped"], flush=True)
            break
        s = timed(lambda: engine.prefill(slots, [prompt[done:done + m]], last_only=True), device)
        chunks.append((x, m, s))
        done, total = done + m, total + s
    print(f"prefill {held} -> {held + done} tokens: {total:.1f} s ({done / max(total, 1e-9):.0f} tok/s)", flush=True)
    return {"prefill_from": held, "prefill_tokens": done, "prefill_s": total,
            "prefill_tok_s": done / max(total, 1e-9), "prefill_chunk": engine.prefill_chunk, **out}


def warm_prefill(engine, vocab: int) -> float:
    """Compile the prefill's kernels on a throwaway prompt in a fresh slot, so timed segments hold
    no compilation -> seconds. Three chunks: the last two past one key block (the key-block form),
    the last of a length no power of two divides (Triton specializes integer arguments by their
    divisibility by 16: a segment's ragged last chunk would compile its own kernels)."""
    t0 = time.perf_counter()
    slots = engine.cache.allocate(1)
    c = engine.prefill_chunk
    n = max(1, min(engine.cache.capacity - 64, max(3 * c, 16384 + 2 * c) - 15))
    engine.prefill(slots, [[i % vocab for i in range(n)]], last_only=True)
    engine.cache.free(slots)
    return time.perf_counter() - t0


def phase_long(args, bw: float, rows: list, info: dict) -> None:
    """B=1 decode at long contexts: Kimi Linear, then the same depth with every layer MLA. One
    engine per model, sized for the longest context. Kimi Linear's contexts up to --long-prefill
    come from one real prefill of random tokens, continued from context to context (each row
    times its segment, after a throwaway prefill has compiled the kernels; prefill_total_s sums
    them, the decode steps between included in the context); the other contexts, and all of the
    all-MLA model's, hold random cache contents (a decode step's time depends on the context's
    length, not on what it holds). With --long-budget a segment estimated to overrun is not run."""
    from kimi_graph.runtime.engine import Engine
    gen = torch.Generator().manual_seed(0)
    deadline = time.perf_counter() + args.long_budget if args.long_budget else None
    for label, all_mla in (("kimi_linear", False), ("all_mla", True)):
        cfg = KimiLinearConfig.from_dict(slice_dict(args.config, args.long_layers, all_mla=all_mla))
        model, load_info = load_ours(cfg, args)
        info[f"long_{label}"] = {**load_info, "layers": cfg.num_hidden_layers}
        room = args.steps + 32                                   # the timed steps and their warm-up
        contexts = sorted({min(L, cfg.model_max_length - room) for L in args.long_contexts})
        try:
            engine = Engine(model, max_batch=1, max_len=contexts[-1] + room, **args.engine_options,
                            **({"cuda_graphs": True} if True in args.graph_modes else {}))
        except torch.OutOfMemoryError as e:
            rows.append({"what": f"long_{label}", "skipped": f"out of memory: {str(e).splitlines()[0][:120]}"})
            continue
        if not all_mla and args.long_prefill:
            info[f"long_{label}"]["prefill_warmup_s"] = warm_prefill(engine, cfg.vocab_size)
        slots, total, chunks = engine.cache.allocate(1), 0.0, []
        for L in contexts:
            fl = floor_bytes(cfg, 1, L)
            row = {"what": f"long_{label}", "B": 1, "context": L, "floor_ms": fl["total"] / bw * 1e3,
                   "cache_gb": fl["mla_cache"] / 1e9}
            try:
                held = engine.cache.lengths[slots[0]]
                est = prefill_estimate(chunks, held, L)
                if est is not None and deadline is not None and \
                        time.perf_counter() + est + ALL_MLA_RESERVE_S > deadline:
                    row["prefill_skipped"] = f"{held} -> {L} estimated {est:.0f} s, past --long-budget"
                    print(row["prefill_skipped"], flush=True)
                if L <= args.long_prefill and not all_mla and "prefill_skipped" not in row:
                    row.update(long_prompt(engine, slots, L, cfg.vocab_size, gen, args.device, chunks,
                                           deadline and deadline - ALL_MLA_RESERVE_S),
                               cache="prefill", prefill_estimate_s=est)
                    total += row.get("prefill_s", 0.0)
                    row.update(prefill_total_s=total, prefill_peak_gb=peak_gb(args.device))
                else:
                    engine.cache.free(slots)
                    slots = engine.cache.allocate(1)
                    engine.fill_context(slots, L)
                    row["cache"] = "random"
                row["held"] = engine.cache.lengths[slots[0]]
                step = decode_step_fn(engine, slots)
                for _ in range(3):
                    step()
                ms = timed(step, args.device, reps=args.steps) * 1e3
                row.update(ms=ms, floor_frac=row["floor_ms"] / ms)
                del step
            except torch.OutOfMemoryError as e:
                row["skipped"] = f"out of memory: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            print(row, flush=True)
        del engine, model
        free_memory()
    by = {(r["what"], r.get("context")): r.get("ms") for r in rows if r["what"].startswith("long_")}
    for L in sorted({r["context"] for r in rows if r["what"].startswith("long_") and "context" in r}):
        a, b = by.get(("long_kimi_linear", L)), by.get(("long_all_mla", L))
        if a and b:
            rows.append({"what": "long_tpot_ratio", "context": L, "all_mla_over_kimi_linear": b / a,
                         "paper": "6.3x at 1M"})
            print(rows[-1], flush=True)


# -- main -----------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", default="kimi-linear-48b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="slice: the first N layers")
    ap.add_argument("--hf-layers", type=int, default=None, help="transformers' slice (default: --layers)")
    ap.add_argument("--long-layers", type=int, default=None, help="depth of the long-context pair")
    ap.add_argument("--phases", default="ours,hf,long")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--backend-options", default="{}",
                    help='JSON, e.g. \'{"compile": true, "mode": "reduce-overhead", "kernels": "triton"}\' '
                         'with --backend torch --graphs off (the torch backend captures its own graphs)')
    ap.add_argument("--pipeline", default="default")
    ap.add_argument("--experts", default=None, choices=("int4", "int8", "fp8"),
                    help="low-bit routed experts (load's experts=; default: the model dtype)")
    ap.add_argument("--prefill", default="1x4096,1x16384,32x1024", help="BxT prompt shapes")
    ap.add_argument("--prefill-logits", default="all,last",
                    help="prefill rows computing every position's logits (all) and/or the last one's (last), "
                         "for both implementations")
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--contexts", default="1024,32768")
    ap.add_argument("--hf-batches", default="1,8,32")
    ap.add_argument("--hf-contexts", default="1024")
    ap.add_argument("--long-contexts", default="4096,131072,1048576")
    ap.add_argument("--long-prefill", type=int, default=0, metavar="MAX",
                    help="Kimi Linear's long contexts up to MAX tokens come from one real (chunked) prefill of "
                         "random tokens, timed, instead of random cache contents (the all-MLA pair keeps random "
                         "contents: its decode time depends on the context's length only)")
    ap.add_argument("--long-budget", type=float, default=0, metavar="S",
                    help="seconds for the long phase: a prefill segment whose estimate (from the chunks timed "
                         "before it) would leave less than the all-MLA half needs is not run (random contents "
                         "instead), nor is a chunk that would; the row says so. 0: no limit")
    ap.add_argument("--graphs", default="both", choices=("both", "on", "off"))
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed per figure")
    ap.add_argument("--reps", type=int, default=2, help="timed prefill repeats (best taken)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="engine prefill chunk (default: the engine's)")
    ap.add_argument("--name", default="e2e")
    ap.add_argument("--overlap", default="auto", choices=("auto", "on", "off"),
                    help="decode as Engine(overlap=...) generates (on: each step queued before the previous "
                         "draw is read back; auto: the engine's default, on for CUDA)")
    args = ap.parse_args(argv)
    args.torch_dtype = getattr(torch, args.dtype)
    args.prefill_shapes = parse_prefill(args.prefill)
    args.prefill_logits = [x for x in args.prefill_logits.split(",") if x]
    if not args.prefill_logits or set(args.prefill_logits) - {"all", "last"}:
        ap.error(f"--prefill-logits takes all and/or last, got {args.prefill_logits}")
    args.batches, args.contexts = parse_list(args.batches), parse_list(args.contexts)
    args.hf_batches, args.hf_contexts = parse_list(args.hf_batches), parse_list(args.hf_contexts)
    args.long_contexts = parse_list(args.long_contexts)
    args.graph_modes = {"both": [False, True], "on": [True], "off": [False]}[args.graphs]
    args.engine_options = {} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}
    if args.overlap != "auto":
        args.engine_options["overlap"] = args.overlap == "on"
    phases = args.phases.split(",")

    cuda = args.device.startswith("cuda")
    bw = copy_bandwidth() if cuda else 10e9
    info = {"copy_bw_TBps": bw / 1e12, "gemm_TFLOPs": gemm_rate() / 1e12 if cuda else None,
            "args": {k: v for k, v in vars(args).items() if k != "torch_dtype"}}
    print({k: info[k] for k in ("copy_bw_TBps", "gemm_TFLOPs")}, flush=True)
    rows: list = []
    try:
        if "ours" in phases:
            phase_ours(slice_dict(args.config, args.layers), args, bw, rows, info)
        if "hf" in phases:
            phase_hf(slice_dict(args.config, args.hf_layers or args.layers), args, rows, info)
        if "long" in phases:
            phase_long(args, bw, rows, info)
    finally:
        write(args.name, rows, info, cuda)


def write(name: str, rows: list, info: dict, cuda: bool) -> None:
    prov = provenance() if cuda else {"device": "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    data = {**prov, **info, "rows": rows}
    text = json.dumps(data, indent=1, default=str)
    for d in filter(None, [os.environ.get("OUT"), str(RESULTS) if cuda else None]):
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / f"{name}.json").write_text(text)
    print(f"== {name}  ({prov['device']}, {prov['date']}, commit {prov.get('commit', '?')})")
    for k in ("ours", "hf", "long_kimi_linear", "long_all_mla"):
        if k in info:
            print(f"{k}: " + ", ".join(f"{a}={v:.4g}" if isinstance(v, float) else f"{a}={v}"
                                       for a, v in info[k].items()))
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items() if k != "top_kernels"))
    hf = {(r["shape"], r.get("logits")): r["tok_s"] for r in rows if r["what"] == "hf_prefill"}
    for r in rows:
        if r["what"] == "prefill" and (r["shape"], r.get("logits")) in hf:
            print(f"prefill {r['shape']} ({r.get('logits')} logits): {r['tok_s']:.4g} tok/s vs transformers "
                  f"{hf[r['shape'], r.get('logits')]:.4g} = {r['tok_s'] / hf[r['shape'], r.get('logits')]:.2f}x")


if __name__ == "__main__":
    main()
