"""`kimi-graph generate MODEL (--prompt TEXT [--chat] | --ids 1,2,3 | --interactive)`:
stream new tokens to the terminal.

Text prompts need the model directory's tokenizer (tiktoken.model + tokenizer_config.json,
or --tokenizer DIR); token ids work with any model. Text is printed without special
tokens (--print-ids shows every id). Timing goes to stderr."""
from __future__ import annotations

import sys

from .output import add_experts_option

DTYPES = ("f32", "bf16", "f16", "f64")


def add_arguments(p):
    p.add_argument("model", help="model directory or preset name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--ids", help="comma-separated prompt token ids")
    src.add_argument("--interactive", action="store_true",
                     help="chat from stdin, a line per user turn (empty line or EOF ends); the "
                          "conversation's caches carry over between turns")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user message with the chat template")
    p.add_argument("--system", help="system message for --chat and --interactive")
    p.add_argument("--max-new-tokens", type=int, default=32, help="per reply")
    p.add_argument("--max-len", type=int, default=4096,
                   help="--interactive: tokens a conversation may hold (default 4096)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and preset weights' seed)")
    p.add_argument("--stop-ids", default="", help="comma-separated extra stop token ids")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the config's eos ids")
    p.add_argument("--tokenizer", help="directory with tiktoken.model and tokenizer_config.json")
    p.add_argument("--print-ids", action="store_true", help="print token ids, not text")
    p.add_argument("--dtype", default="f32", choices=DTYPES)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--backend", default="auto",
                   help="interpreter, torch, triton, onnxruntime; auto: onnxruntime for an "
                        "export-onnx directory, else interpreter")
    p.add_argument("--pipeline", default=None, help="pass pipeline to run before execution")
    add_experts_option(p)
    p.add_argument("--router-weights", choices=("official", "unbiased"), default="official",
                   help="official: as the remote modeling code; unbiased: as transformers >= 5 and vLLM")
    p.add_argument("--parallel", default=None,
                   help="tp=N, ep=M or tp=N,ep=M: this process is one of N*M ranks started by "
                        "torchrun (torchrun --nproc-per-node N -m kimi_graph generate ...); rank 0 prints")


def pick_backend(backend: str, model: str) -> str:
    """--backend auto: onnxruntime for an export-onnx directory, else the interpreter."""
    from pathlib import Path

    from ..runtime.ort_engine import is_onnx_export
    if backend != "auto":
        return backend
    return "onnxruntime" if Path(model).is_dir() and is_onnx_export(Path(model)) else "interpreter"


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def run(args) -> int:
    from ..api import load
    from ..ops import TORCH_DTYPES
    from ..runtime import Engine, SamplingParams
    from ..runtime.tokenizer import load_tokenizer

    if args.chat and args.prompt is None:
        raise ValueError("--chat needs --prompt")
    device, timing = args.device, True
    if args.parallel is not None:
        from ..parallel import follow_rank_zero, init_process_group_from_env
        if args.interactive:
            raise ValueError("--interactive reads stdin on one process; with --parallel give --prompt or --ids")
        device = init_process_group_from_env(args.device)
        timing = follow_rank_zero()
    model = load(args.model, dtype=TORCH_DTYPES[args.dtype], device=device, seed=args.seed,
                 backend=pick_backend(args.backend, args.model), pipeline=args.pipeline,
                 router_weights=args.router_weights, parallel=args.parallel, experts=args.experts)
    tok = None
    if args.ids is None or args.tokenizer:
        tok = load_tokenizer(args.tokenizer, model.config.vocab_size) if args.tokenizer else model.tokenizer
    stop = _int_list(args.stop_ids, "--stop-ids")
    if args.chat or args.interactive:       # a turn ends at the tokenizer's end-of-message too
        stop += [i for i in (tok.eos_id, tok.special_tokens.get("<|im_end|>")) if i is not None]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=tuple(stop),
                            ignore_eos=args.ignore_eos)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.interactive:
        engine = Engine(model, 1, min(args.max_len, model.config.model_max_length))
        return _interactive(engine, tok, params, system, args.print_ids)
    if args.prompt is None:
        prompt = _int_list(args.ids, "--ids")
    elif args.chat:
        prompt = tok.apply_chat_template(system + [{"role": "user", "content": args.prompt}])
    else:
        prompt = tok.encode(args.prompt)
    engine = Engine(model, 1, min(len(prompt) + params.max_new_tokens, model.config.model_max_length))
    _print_stream(engine.stream(prompt, params), len(prompt), tok, args.print_ids, timing)
    if args.parallel is not None:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


def _print_stream(tokens, n_prompt: int, tok, print_ids: bool, timing: bool = True) -> list[int]:
    """Write tokens as they come (text without special tokens, or ids); timing to stderr."""
    import time

    text = tok.stream_decoder(skip_special=True) if tok is not None and not print_ids else None
    t0 = time.perf_counter()
    first, out = None, []
    for t in tokens:
        first = first or time.perf_counter()
        out.append(t)
        sys.stdout.write(text.push(t) if text else f"{t} ")
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write((text.flush() if text else "") + "\n")
    n = len(out)
    rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
    if timing:
        print(f"[{n_prompt} prompt tokens, {n} new; first token {(first - t0) * 1e3:.1f} ms, "
              f"then {rate:.1f} tokens/s]", file=sys.stderr)
    return out


def _interactive(engine, tok, params, messages: list[dict], print_ids: bool) -> int:
    """Turn by turn: the conversation re-rendered with the template; when the tokens so far
    are its prefix (the usual case) only the new turn runs, else the conversation restarts."""
    stops = params.stop_set(engine.model.config.eos_ids)
    seq = engine.sequence()
    try:
        while True:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line.strip():
                return 0
            messages.append({"role": "user", "content": line.rstrip("\n")})
            ids = tok.apply_chat_template(messages)
            if ids[:len(seq.tokens)] != seq.tokens or len(ids) == len(seq.tokens):
                seq.close()
                seq = engine.sequence()
            new = ids[len(seq.tokens):]
            seq.extend(new)
            reply = _print_stream(seq.stream(params), len(new), tok, print_ids)
            if reply and reply[-1] in stops:    # the template closes the turn itself
                reply = reply[:-1]
            messages.append({"role": "assistant", "content": tok.decode(reply)})
    finally:
        seq.close()
