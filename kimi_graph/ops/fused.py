"""Where the fused ops live: the ops passes introduce, each with its decomposition
(`OpDef.decompose`: its meaning in simpler registry ops, run by decompose.py), are defined in
their families' files: kda_fused_recurrent / kda_fused_chunk in kda.py; gated_rmsnorm and
add_rmsnorm in norm.py; head_matmul in linalg.py; mla_latent_attention in attention.py;
moe_route, moe_permute, grouped_swiglu, moe_unpermute, moe_experts and stack in moe.py.
This module keeps the old import path of two torch helpers."""
from .kda import kda_gate  # noqa: F401
from .norm import l2_normalize  # noqa: F401
