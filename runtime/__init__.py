"""Engines that run a lowered model (installed as kimi_graph.runtime): cache slots,
prefill/decode generation, sampling, the tokenizer."""
from .cache import CacheError, CacheManager, StateSpec, state_specs
from .engine import Engine, GenerationError, Sequence, generate, stream
from .sampling import Sampler, SamplingParams, filter_logits

__all__ = ["CacheManager", "CacheError", "StateSpec", "state_specs", "Engine", "Sequence",
           "GenerationError", "generate", "stream", "Sampler", "SamplingParams", "filter_logits"]
