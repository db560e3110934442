"""Rewrite passes over the layer graph (installed as kimi_graph.passes).

    from kimi_graph.passes import run_pipeline
    g2 = run_pipeline(g, "default", weights=weights)      # or "canonicalize,cse,dce", ...

Passes register by name on import (one module each); `PASSES` lists them, `PIPELINES` the
named pipelines."""
from . import (absorb_mla, canonicalize, chunk_kda, cse, dce, fold_constants,  # noqa: F401
               fuse_kda_gating, fuse_linears, fuse_moe_dispatch, fuse_residual_norm, legalize_ort_moe,
               quantize_experts, shard)
from .manager import (DEFAULT_PIPELINE, PASSES, PIPELINES, Option, Pass, PassContext, PassError,
                      PassManager, PassRecord, format_timing, parse_pipeline, register_pass,
                      run_pipeline)

__all__ = ["run_pipeline", "PassManager", "PassRecord", "Pass", "PassContext", "Option",
           "PassError", "PASSES", "PIPELINES", "DEFAULT_PIPELINE", "parse_pipeline",
           "register_pass", "format_timing"]
