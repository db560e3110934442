"""Engines that run a lowered model (installed as kimi_graph.runtime): cache slots,
prefill/decode generation, sampling, the tokenizer.

    model.generate([[1, 5, 9], [3]], max_new_tokens=8)        # new ids per prompt (greedy)
    for tok in model.stream([1, 5, 9], temperature=0.7, top_p=0.9, seed=0): ...
    engine = Engine(model, max_batch=8, max_len=4096, page_size=64)   # reusable caches
    engine.generate(prompts, SamplingParams(max_new_tokens=32))
    with engine.sequence() as chat: chat.extend(ids); reply = chat.generate(params)
"""
from .cache import CacheError, CacheManager, StateSpec, state_specs
from .engine import Engine, GenerationError, Sequence, generate, stream
from .sampling import Sampler, SamplingParams, filter_logits

__all__ = ["CacheManager", "CacheError", "StateSpec", "state_specs", "Engine", "Sequence",
           "GenerationError", "generate", "stream", "Sampler", "SamplingParams", "filter_logits"]
