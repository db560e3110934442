"""ONNX lowering: prefill / decode graphs -> ONNX models in three operator sets.

    kimi-graph export-onnx tiny --out out/ [--ops ort|portable|standard] [--dtype fp32|fp16|bf16]
    model = kimi_graph.load("out/", backend="onnxruntime")      # runs the exported models
    model = kimi_graph.load("tiny", backend="onnxruntime", ops="portable")   # lowers on the fly

- `ort` (default, ort.py): ONNX Runtime's com.microsoft fused ops (LinearAttention,
  CausalConvWithState, MoE, SkipSimplifiedLayerNormalization) and opset-23 Attention /
  RMSNormalization where their semantics equal ours; the router stays in our nodes. The
  graph is legalised first (passes/legalize_ort_moe.py: the routed experts as one op).
- `portable` (portable.py, functions.py): standard ops, and our fused ops as `kimi_graph`
  domain nodes each carrying a function body in standard ops (ONNX Runtime without contrib
  ops, onnx.reference): generated from the op's decomposition (export.decomposition_call),
  the chunkwise KDA (a Loop over chunks) from the op library's chunk_form, written once for
  torch and ONNX values; the MoE dispatch ops hand-written.
- `standard` (standard.py): default-domain ops only at opset 27 (LinearAttention,
  CausalConvWithState), fused ops as their decompositions inline, no functions.
Primitive ops map through primitives.py, the base table of every set, one entry per op kind.
Models: opset 23 (27 for `standard`), the lowest IR version that carries it; symbolic B / T /
S axes; every cache and state an input and a `present.*` output. An export directory
(package.py) also holds the onnxruntime-genai model and genai_config.json (genai.py). onnx is
imported only when this package is used.
"""
from .export import DEFAULT_OPSET, OP_SETS, lower, state_output_name

__all__ = ["lower", "OP_SETS", "DEFAULT_OPSET", "state_output_name"]
