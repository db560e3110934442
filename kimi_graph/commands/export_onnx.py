"""`kimi-graph export-onnx MODEL --out DIR`: the stateful prefill and decode models, the
onnxruntime-genai model, weights, config, tokenizer files and genai_config.json."""
from __future__ import annotations

from .output import add_experts_option

DTYPES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "bf16": "bfloat16"}


def add_arguments(p):
    p.add_argument("model", help="preset (tiny, kimi-linear-48b-a3b) or model directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ops", choices=("ort", "portable", "standard"), default="ort",
                   help="ort: ONNX Runtime's fused contrib ops (default); portable: standard ops + functions; "
                        "standard: default-domain ops only, opset 27+ (LinearAttention, CausalConvWithState)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--opset", type=int, default=None, help="ai.onnx opset (None: 23; 27 for --ops standard)")
    p.add_argument("--pipeline", default=None, help="pass pipeline to run first (e.g. default)")
    add_experts_option(p)
    p.add_argument("--router-weights", choices=("official", "unbiased"), default="official",
                   help="official: as the remote modeling code; unbiased: as transformers >= 5 and vLLM")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument("--no-genai", action="store_true", help="skip the onnxruntime-genai model")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker and shape inference")
    p.add_argument("--force", action="store_true",
                   help="replace a previous export in --out (removes only the files it wrote)")


def owned(path):
    """The files an export wrote into `path` (by its manifest, and by name)."""
    from ..runtime.ort_engine import MANIFEST
    names = ["prefill.onnx", "prefill_last.onnx", "decode.onnx", "genai.onnx", "weights.bin",
             "genai_config.json", "config.json", MANIFEST]
    try:
        import json
        man = json.loads((path / MANIFEST).read_text())
        names += list(man.get("models", {}).values()) + list(man.get("tokenizer_files", []))
        names += [man["external_weights"]] if man.get("external_weights") else []
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return [str(n) for n in names]


def run(args) -> int:
    import time

    import torch

    from ..api import load
    from ..lowering.onnx.package import export_model

    from .output import output_dir
    t0 = time.perf_counter()
    output_dir(args.out, args.force, owned)
    model = load(args.model, dtype=getattr(torch, DTYPES[args.dtype]), router_weights=args.router_weights,
                 seed=args.seed, pipeline=args.pipeline, experts=args.experts)
    man = export_model(model, args.out, ops=args.ops, opset=args.opset,
                       genai=not args.no_genai, check_models=not args.no_check)
    print(f"exported {args.model} ({args.ops}, {args.dtype}, opset {man['opset']}, IR {man['ir_version']}) "
          f"to {args.out} in {time.perf_counter() - t0:.1f} s: {', '.join(man['models'].values())}"
          + (f" + {man['external_weights']}" if man["external_weights"] else ""))
    return 0
