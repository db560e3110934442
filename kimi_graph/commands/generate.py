"""`kimi-graph generate MODEL (--prompt TEXT [--chat] | --ids 1,2,3)`: stream new tokens.

Text prompts need the model directory's tokenizer (tiktoken.model + tokenizer_config.json,
or --tokenizer DIR); token ids work with any model. Timing goes to stderr."""
from __future__ import annotations

import sys

DTYPES = ("f32", "bf16", "f16", "f64")


def add_arguments(p):
    p.add_argument("model", help="model directory or preset name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--ids", help="comma-separated prompt token ids")
    p.add_argument("--chat", action="store_true",
                   help="wrap --prompt as a user message with the chat template")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and preset weights' seed)")
    p.add_argument("--stop-ids", default="", help="comma-separated extra stop token ids")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the config's eos ids")
    p.add_argument("--tokenizer", help="directory with tiktoken.model and tokenizer_config.json")
    p.add_argument("--print-ids", action="store_true", help="print token ids, not text")
    p.add_argument("--dtype", default="f32", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="interpreter")
    p.add_argument("--pipeline", default=None, help="pass pipeline to run before execution")


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def run(args) -> int:
    import time

    from ..api import load
    from ..ops import TORCH_DTYPES
    from ..runtime import Engine, SamplingParams
    from ..runtime.tokenizer import load_tokenizer

    if args.chat and args.prompt is None:
        raise ValueError("--chat needs --prompt")
    model = load(args.model, dtype=TORCH_DTYPES[args.dtype], device=args.device, seed=args.seed,
                 backend=args.backend, pipeline=args.pipeline)
    tok = None
    if args.prompt is not None or args.tokenizer:
        tok = load_tokenizer(args.tokenizer, model.config.vocab_size) if args.tokenizer else model.tokenizer
    stop = _int_list(args.stop_ids, "--stop-ids")
    if args.prompt is None:
        prompt = _int_list(args.ids, "--ids")
    elif args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        stop += [i for i in (tok.eos_id, tok.special_tokens.get("<|im_end|>")) if i is not None]
    else:
        prompt = tok.encode(args.prompt)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=tuple(stop),
                            ignore_eos=args.ignore_eos)
    engine = Engine(model, 1, min(len(prompt) + params.max_new_tokens, model.config.model_max_length))
    text = tok.stream_decoder() if tok is not None and not args.print_ids else None
    tokens = engine.stream(prompt, params)          # checks the request before timing starts
    t0 = time.perf_counter()
    first, n = None, 0
    for n, t in enumerate(tokens, 1):
        first = first or time.perf_counter()
        sys.stdout.write(text.push(t) if text else f"{t} ")
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write((text.flush() if text else "") + "\n")
    decode_rate = (n - 1) / (end - first) if n > 1 and end > first else float("nan")
    print(f"[{len(prompt)} prompt tokens, {n} new; first token {(first - t0) * 1e3:.1f} ms, "
          f"then {decode_rate:.1f} tokens/s]", file=sys.stderr)
    return 0
