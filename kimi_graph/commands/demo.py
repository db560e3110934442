"""`kimi-graph demo`: the main job on the embedded tiny model, end to end: build and verify
the graph, summarise it, run it, optimize it with the default pipeline, export it to ONNX
and run that in ONNX Runtime, and generate tokens with the caches."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--model", default="tiny", help="preset or model directory (default: tiny)")
    p.add_argument("--prompt-ids", default="1,5,9,14,3", help="comma-separated token ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export step")


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def run(args) -> int:
    import tempfile
    import time

    import torch

    from ..api import load
    from ..summary import summarize
    from ..verifier import verify
    from .inspect import format_summary

    def step(title: str, t0: float) -> None:
        print(f"== {title} ({(time.perf_counter() - t0) * 1e3:.0f} ms)")

    t0 = time.perf_counter()
    model = load(args.model, seed=args.seed)
    verify(model.graph)
    step(f"{model!r}: graph built and verified", t0)
    print(format_summary(summarize(model.config, model.graph)))
    ids = torch.tensor([[int(x) for x in args.prompt_ids.split(",")]])

    t0 = time.perf_counter()
    logits = model(ids)
    step(f"interpreter prefill of {ids.shape[1]} tokens: logits {tuple(logits.shape)}, "
         f"next token {int(logits[0, -1].argmax())}", t0)

    t0 = time.perf_counter()
    opt = load(args.model, seed=args.seed, pipeline="default")
    opt_logits = opt(ids)
    before, after = model.graph.op_counts(), opt.graph.op_counts()
    step(f"default pipeline: {sum(before.values())} -> {sum(after.values())} ops; "
         f"logits agree to {_rel(opt_logits, logits):.1e} (relative)", t0)
    fused = {k: v for k, v in after.items() if k not in before}
    print("   fused ops now in the graph: " + ", ".join(f"{k} x{v}" for k, v in fused.items()))

    if not args.no_onnx:
        from ..lowering.onnx.package import export_model
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            manifest = export_model(opt, out, genai=False)
            ort = load(out, backend="onnxruntime")
            ort_logits = ort(ids)
        step(f"ONNX export ({manifest['ops']} ops, opset {manifest['opset']}) run in ONNX Runtime: "
             f"logits agree to {_rel(ort_logits, logits):.1e}", t0)

    t0 = time.perf_counter()
    new = opt.generate([ids[0].tolist()], max_new_tokens=8, ignore_eos=True)[0]
    step(f"generated 8 tokens (greedy; chunked KDA prefill, then decode with the latent MLA "
         f"cache and KDA state): {new}", t0)
    return 0
