"""Ops of sharded graphs (passes/shard.py puts them there): collectives between ranks, and
the routing of one rank's share of the experts.

all_reduce(x) {group, size} -> the sum of x over the `size` ranks of `group`.
all_gather(x) {group, size, dim} -> the ranks' x concatenated along `dim`, in rank order.
local_experts(ids, weights) {first, count} -> (ids', weights'): the routed copies of experts
  first .. first+count-1 keep their weight with ids' = ids - first; every other copy gets
  weight 0 and the id of the token's first local copy (an expert whose weights the step
  reads anyway; local expert 0 for a token with none), so the expert kernels stay in bounds
  and read no extra expert for it.

A collective runs over a process group of the current mesh (kimi_graph/parallel.py): "tp" or
"world". Its `link_bytes` is what one rank sends over the interconnect with ring algorithms:
2 (n-1)/n of x for all_reduce, (n-1)/n of the result for all_gather.
"""
from __future__ import annotations

import torch

from .registry import REQUIRED, OpDef, expect, expect_float, register


def _group(attrs: dict):
    from ..parallel import process_group
    return process_group(attrs["group"], attrs["size"])


class _Collective(OpDef):
    family = "collective"
    operands = ("x",)

    def check(self, attrs: dict) -> None:
        from ..parallel import GROUPS
        expect(attrs["group"] in GROUPS, self.kind, f"group must be one of {GROUPS}, got {attrs['group']!r}")
        expect(attrs["size"] >= 1, self.kind, f"size must be >= 1, got {attrs['size']}")

    def flops(self, ins, outs, attrs, dims):
        return 0.0


@register
class AllReduce(_Collective):
    kind = "all_reduce"
    doc = "sum of x over the ranks of a process group"
    attributes = {"group": REQUIRED(str), "size": REQUIRED(int)}

    def infer(self, types, attrs):
        self.check(attrs)
        expect_float(self.kind, types[0])
        return [types[0]]

    def ref(self, args, attrs):
        import torch.distributed as dist
        out = args[0].contiguous().clone()
        dist.all_reduce(out, group=_group(attrs))
        return [out]

    def link_bytes(self, ins, outs, attrs, dims):
        n = attrs["size"]
        return 2.0 * (n - 1) / n * ins[0].nbytes(dims)


@register
class AllGather(_Collective):
    kind = "all_gather"
    doc = "the ranks' x concatenated along dim, in rank order"
    attributes = {"group": REQUIRED(str), "size": REQUIRED(int), "dim": -1}

    def infer(self, types, attrs):
        self.check(attrs)
        (x,) = types
        d = attrs["dim"] % x.rank if x.rank else 0
        expect(x.rank > 0 and isinstance(x.shape[d], int), self.kind,
               f"gathers along a static dim; {x} has {x.shape[d] if x.rank else 'none'} at dim {attrs['dim']}")
        shape = list(x.shape)
        shape[d] *= attrs["size"]
        return [x.with_shape(shape)]

    def ref(self, args, attrs):
        import torch.distributed as dist
        x = args[0].contiguous()
        parts = x.new_empty((attrs["size"],) + tuple(x.shape))
        if x.is_cuda:       # one NCCL call into one buffer (capturable in a CUDA graph)
            dist.all_gather_into_tensor(parts, x, group=_group(attrs))
        else:
            dist.all_gather(list(parts.unbind(0)), x, group=_group(attrs))
        return [torch.cat(list(parts.unbind(0)), attrs["dim"])]

    def link_bytes(self, ins, outs, attrs, dims):
        n = attrs["size"]
        return (n - 1) / n * outs[0].nbytes(dims)


@register
class LocalExperts(OpDef):
    kind = "local_experts"
    doc = "routing restricted to experts first..first+count-1: ids - first, other copies weight 0"
    family = "moe"
    operands = ("ids", "weights")
    results = ("ids", "weights")
    attributes = {"first": REQUIRED(int), "count": REQUIRED(int)}

    def infer(self, types, attrs):
        ids, w = types
        expect(ids.dtype == "i64" and ids.shape == w.shape, self.kind, f"ids {ids} / weights {w} differ")
        expect_float(self.kind, w)
        expect(attrs["first"] >= 0 and attrs["count"] >= 1, self.kind,
               f"bad expert range first={attrs['first']}, count={attrs['count']}")
        return [ids, w]

    def ref(self, args, attrs):
        ids, w = args
        first, count = attrs["first"], attrs["count"]
        here = (ids >= first) & (ids < first + count)
        local = ids - first
        first_here = local.gather(-1, here.to(torch.int32).argmax(-1, keepdim=True))   # first local copy
        fallback = torch.where(here.any(-1, keepdim=True), first_here, torch.zeros_like(first_here))
        return [torch.where(here, local, fallback), w * here.to(w.dtype)]

    def flops(self, ins, outs, attrs, dims):
        return 0.0
