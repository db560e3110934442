"""Weights into L2 beside latency-bound decode steps. A decode step at one token runs kernels
that read few bytes and wait on latency (the router, KDA's step, MLA's attention, a norm) between
kernels that stream megabytes of weights (the projections, the shared expert). Before such a
latency-bound schedule item, `issue` launches `l2_prefetch` on a side stream: `prefetch.global.L2`
over the weights of the next item that reads many, so that item reads them from L2 while the
memory system would otherwise idle. Prefetches are hints: no result depends on them. The side
stream forks from the current one at each item and joins it at the graph call's end (`join`),
so a CUDA graph captures each prefetch as a branch beside the main chain.

The plan (`plan`) comes from the schedule and the weights alone; the `l2_prefetch` family
(targets.py) switches it on for graph calls of at most `max_rows` token rows."""
from __future__ import annotations

import functools

import torch

from .codegen import KernelSpec, launch, render
from .targets import config, current_target

LINE = 128                  # bytes a prefetch brings into L2

PREFETCH_L2 = """
@triton.jit
def _prefetch_l2(p):
    # an L2 prefetch of each address (the values are not kept)
    tl.inline_asm_elementwise("prefetch.global.L2 [$$1]; // $$0", "=r,l", [p.to(tl.int64, bitcast=True)],
                              dtype=tl.int32, is_pure=False, pack=1)
"""

_KERNEL = PREFETCH_L2 + """
@triton.jit
def l2_prefetch(p_ptr, lines, per):
    # program i: the lines [i per, (i + 1) per) of p's bytes (the last line repeated past the end)
    lo = tl.program_id(0) * per
    for j0 in range(lo, tl.minimum(lo + per, lines), BL):
        j = tl.minimum(j0 + tl.arange(0, BL), lines - 1)
        _prefetch_l2(p_ptr + j.to(tl.int64) * LINE)
"""


@functools.lru_cache(maxsize=None)
def prefetch_spec(target: str) -> KernelSpec:
    cfg = config("l2_prefetch", target)
    consts = {"BL": cfg["BL"], "LINE": LINE}
    return KernelSpec("l2_prefetch", "l2_prefetch", render("l2_prefetch", _KERNEL, consts),
                      {"p_ptr": "*i8", "lines": "i32", "per": "i32"}, cfg["num_warps"], 1,
                      {**consts, "programs": cfg["programs"]})


def plan(schedule: list, reads, sizes: dict[str, int], cfg: dict, launches=lambda item: True
         ) -> dict[int, list[tuple[str, int]]]:
    """{schedule index: [(weight, bytes to prefetch from its start)]}: before each item that
    launches kernels and reads at most host_max_bytes of weights, the weights (each at most
    max_tensor_bytes) of the first item among the next `ahead` that launch kernels reading at
    least min_bytes of weights not yet taken, from the start of each, up to max_bytes in all;
    each weight once.
    `reads(item)`: the values an item reads that may be prefetched; `sizes`: each weight's bytes;
    `launches(item)`: does it launch kernels (views and reshapes do not)."""
    def weights(item) -> list[str]:
        return list(dict.fromkeys(v for v in reads(item) if v in sizes))

    size = sizes.__getitem__
    kernels = [(i, item) for i, item in enumerate(schedule) if launches(item)]
    out: dict[int, list[tuple[str, int]]] = {}
    taken: set[str] = set()
    for k, (i, item) in enumerate(kernels):
        if sum(size(w) for w in weights(item)) > cfg["host_max_bytes"]:
            continue
        for _, nxt in kernels[k + 1:k + 1 + cfg["ahead"]]:
            names = [w for w in weights(nxt) if size(w) <= cfg["max_tensor_bytes"]]
            if sum(size(w) for w in names) < cfg["min_bytes"]:
                continue
            budget, picks = cfg["max_bytes"], []
            for w in names:
                if w in taken or budget <= 0:
                    continue
                picks.append((w, min(size(w), budget)))
                budget -= picks[-1][1]
                taken.add(w)
            if picks:                   # (a reader whose weights are all taken: the next one)
                out[i] = picks
                break
    return out


def weight_bytes(g) -> dict[str, int]:
    """Each weight of graph `g` and its bytes (from its type)."""
    return {n: g.types[n].nbytes() for n in g.params}


def enabled(rows: int) -> bool:
    """Prefetch in a graph call of `rows` token rows? (On a GPU target, l2_prefetch enabled.)"""
    target = current_target()
    if target == "interpret":
        return False
    cfg = config("l2_prefetch", target)
    return bool(cfg["enabled"]) and 0 < rows <= cfg["max_rows"]


_SIDE: dict[str, torch.cuda.Stream] = {}


def issue(tensors: list[tuple[torch.Tensor, int]]) -> None:
    """Prefetch the first `nbytes` of each contiguous tensor into L2, on a side stream forked
    from the current one."""
    main = torch.cuda.current_stream()
    if str(main.device) not in _SIDE:
        _SIDE[str(main.device)] = torch.cuda.Stream(main.device)
    side = _SIDE[str(main.device)]
    side.wait_stream(main)
    spec = prefetch_spec(current_target())
    programs = spec.config["programs"]
    with torch.cuda.stream(side):
        for t, nbytes in tensors:
            if not t.is_contiguous():
                continue
            lines = -(-nbytes // LINE)
            launch(spec, (programs,), t.view(-1).view(torch.int8), lines, -(-lines // programs))


def join() -> None:
    """The current stream waits for the prefetches issued from it (a graph call's end)."""
    main = torch.cuda.current_stream()
    side = _SIDE.get(str(main.device))
    if side is not None:
        main.wait_stream(side)
