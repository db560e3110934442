"""Mixture-of-Experts primitives: grouped top-k selection, gather, renormalisation, and one
expert's weighted SwiGLU accumulated into the layer output (the unfused per-expert loop)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir import DTYPE_BYTES
from .registry import REQUIRED, OpDef, dim, expect, expect_float, register


def topk_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k largest values of `x` (finite) along its last dim, best first;
    among exactly equal values the lowest index wins. This is the routing tie-break of every
    backend (ONNX TopK and the Triton router follow it); torch.topk leaves the order of ties
    unspecified. k argmax passes (argmax returns the first maximum): no sort, so the form
    traces into every target (torch-mlir has no stable sort)."""
    idx = torch.arange(x.shape[-1], device=x.device)
    picked = []
    for _ in range(k):
        best = x.argmax(-1, keepdim=True)
        picked.append(best)
        x = x.masked_fill(idx == best, float("-inf"))
    return torch.cat(picked, -1)


def grouped_topk(choice: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """Expert ids [..., top_k]: keep the `topk_group` groups with the best top-2 sums, then the
    top_k experts inside them (other experts' scores set to 0, as the official code does, which
    makes exact ties: lowest index wins, for groups and experts alike; see topk_ids)."""
    lead, E = choice.shape[:-1], choice.shape[-1]
    c = choice.reshape(-1, E)
    group_scores = c.view(c.shape[0], n_group, -1).topk(min(2, E // n_group), dim=-1)[0].sum(-1)
    group_idx = topk_ids(group_scores, topk_group)
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(c.shape[0], E)
    ids = topk_ids(c.masked_fill(expert_mask == 0, 0.0), top_k)
    return ids.reshape(*lead, top_k)


@register
class GroupedTopK(OpDef):
    kind = "grouped_topk"
    doc = "ids of the top_k experts by `choice` score, restricted to the best topk_group groups"
    family = "moe"
    operands = ("choice",)
    attributes = {"top_k": REQUIRED(int), "n_group": 1, "topk_group": 1}

    def infer(self, types, attrs):
        (c,) = types
        expect_float(self.kind, c)
        E = c.shape[-1]
        expect(isinstance(E, int) and E % attrs["n_group"] == 0, self.kind,
               f"{E} experts do not split into {attrs['n_group']} groups")
        expect(0 < attrs["top_k"] <= E and 0 < attrs["topk_group"] <= attrs["n_group"], self.kind,
               f"bad top_k={attrs['top_k']} / topk_group={attrs['topk_group']} for {E} experts")
        return [c.with_shape(c.shape[:-1] + (attrs["top_k"],)).with_dtype("i64")]

    def ref(self, args, attrs):
        return [grouped_topk(args[0], attrs["top_k"], attrs["n_group"], attrs["topk_group"])]


@register
class TakeAlong(OpDef):
    kind, doc = "take_along", "x[..., ids[..., j]] along the last dim"
    family = "moe"
    operands = ("x", "ids")

    def infer(self, types, attrs):
        x, ids = types
        expect(ids.dtype in ("i64", "i32") and ids.shape[:-1] == x.shape[:-1], self.kind,
               f"ids {ids} do not index x {x}")
        return [x.with_shape(ids.shape)]

    def ref(self, args, attrs):
        return [torch.gather(args[0], -1, args[1])]


@register
class Renormalize(OpDef):
    kind, doc = "renormalize", "x / (sum(x, last dim) + eps)"
    family = "moe"
    operands = ("x",)
    attributes = {"eps": 1e-20}

    def infer(self, types, attrs):
        expect_float(self.kind, types[0])
        return [types[0]]

    def ref(self, args, attrs):
        x = args[0]
        return [x / (x.sum(-1, keepdim=True) + attrs["eps"])]


def swiglu(x, w1, w3, w2):
    """w2 (silu(w1 x) * w3 x) with HF [out, in] weights."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


@register
class MoEExpert(OpDef):
    kind = "moe_expert"
    doc = ("acc + sum_j [ids[..., j] == expert] * weights[..., j] * SwiGLU_e(x): one routed "
           "expert's contribution, computed for the tokens routed to it")
    family = "moe"
    operands = ("acc", "x", "ids", "weights", "w1", "w3", "w2")
    attributes = {"expert": REQUIRED(int), "num_experts": REQUIRED(int)}

    def infer(self, types, attrs):
        acc, x, ids, w, w1, w3, w2 = types
        expect_float(self.kind, acc, x, w, w1, w3, w2)
        D = x.shape[-1]
        # messages formatted only on failure: the published graph has 6656 of these ops
        if acc.shape != x.shape:
            expect(False, self.kind, f"acc {acc} and x {x} differ")
        if ids.shape != w.shape or ids.shape[:-1] != x.shape[:-1]:
            expect(False, self.kind, f"ids {ids} / weights {w} do not fit x {x}")
        if not (w1.rank == 2 and w1.shape == w3.shape and w1.shape[1] == D
                and w2.shape == (D, w1.shape[0])):
            expect(False, self.kind, f"expert weights w1 {w1}, w3 {w3}, w2 {w2} do not fit hidden {D}")
        return [acc]

    def ref(self, args, attrs):
        acc, x, ids, w, w1, w3, w2 = args
        D = x.shape[-1]
        xf, idf, wf = x.reshape(-1, D), ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1])
        hit = idf == attrs["expert"]                                  # [N, k]
        rows = hit.any(-1).nonzero().squeeze(-1)
        out = acc.reshape(-1, D).clone()
        if rows.numel():
            y = swiglu(xf[rows], w1.to(x.dtype), w3.to(x.dtype), w2.to(x.dtype))
            gate = (wf[rows] * hit[rows]).sum(-1, keepdim=True)
            out[rows] = out[rows] + (gate * y.to(gate.dtype)).to(out.dtype)
        return [out.reshape(acc.shape)]

    def _routed_tokens(self, ins, attrs, dims) -> float:
        n = ins[1].numel(dims) / dim(ins[1].shape[-1], dims)
        return n * ins[2].shape[-1] / attrs["num_experts"]     # expected tokens for one expert

    def flops(self, ins, outs, attrs, dims):
        D, I = ins[4].shape[1], ins[4].shape[0]
        return self._routed_tokens(ins, attrs, dims) * 6.0 * D * I

    def bytes_moved(self, ins, outs, attrs, dims):
        """Weights count once if any token is routed here (probability 1 - (1 - k/E)^N)."""
        n = ins[1].numel(dims) / dim(ins[1].shape[-1], dims)
        p_read = 1.0 - (1.0 - ins[2].shape[-1] / attrs["num_experts"]) ** n
        weights = p_read * sum(t.nbytes(dims) for t in ins[4:])
        act = 2 * self._routed_tokens(ins, attrs, dims) * ins[1].shape[-1] * DTYPE_BYTES[ins[1].dtype]
        return float(weights + act)
