"""Mixture-of-Experts: the primitives (grouped top-k selection, gather, renormalisation, and one
expert's weighted SwiGLU accumulated into the layer output: the unfused per-expert loop), and
the fused ops fuse-moe-dispatch makes of them:

moe_route(x, gate_weight [E,D], bias [E]) -> (ids [...,k] i64, weights [...,k]): the whole
  router (fp32 sigmoid scores, biased grouped top-k, renormalise, scale).
moe_permute(x [...,D], ids [...,k]) {num_experts} -> (rows [M,D], offsets [E+1] i64, order [M]
  i64) with M = N*k: token copies sorted by expert; order[m] = n*k + j.
grouped_swiglu(rows [M,D], offsets [E+1], w13 [E,2I,D], w2 [E,D,I]) -> [M,D]: for the rows of
  expert e, w2_e (silu(w1_e x) * w3_e x); w13_e = [w1_e; w3_e].
moe_unpermute(y [M,D], order [M], weights [...,k], acc [...,D]) -> acc + sum_j w_j y_j.
moe_experts(x, ids, weights, w13, w2, acc) -> acc + sum_j w_j SwiGLU_{ids_j}(x): the three
  above as one op (what ONNX Runtime's MoE computes; legalize-ort-moe introduces it).
stack(*xs) -> [n, ...]: the compile-time expert packing (folded into parameters).
The dispatch ops have no decomposition: their layout (rows sorted by expert, offsets) is
data-dependent and every target maps them natively.
"""
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


@register
class MoERoute(OpDef):
    fused = True
    kind = "moe_route"
    doc = "the router: sigmoid scores (fp32), + bias for selection, grouped top-k, renormalise, scale"
    family = "moe"
    results = ("ids", "weights")
    operands = ("x", "gate_weight", "bias")
    attributes = {"top_k": REQUIRED(int), "n_group": 1, "topk_group": 1, "renormalize": True,
                  "scaling": 1.0, "weights": "official"}

    def infer(self, types, attrs):
        x, w, bias = types
        expect_float(self.kind, x, w, bias)
        E = w.shape[0]
        expect(w.rank == 2 and w.shape[1] == x.shape[-1] and bias.shape == (E,), self.kind,
               f"gate_weight {w} / bias {bias} do not fit x {x}")
        expect(attrs["weights"] in ("official", "unbiased"), self.kind, "weights: official|unbiased")
        k = attrs["top_k"]
        expect(0 < k <= E and E % attrs["n_group"] == 0, self.kind, f"bad top_k {k} for {E} experts")
        lead = x.shape[:-1] + (k,)
        return [x.with_shape(lead).with_dtype("i64"), bias.with_shape(lead)]

    def ref(self, args, attrs):
        x, w, bias = args
        acc = bias.dtype
        scores = torch.sigmoid(F.linear(x.to(acc), w.to(acc)))
        choice = scores + bias
        ids = grouped_topk(choice, attrs["top_k"], attrs["n_group"], attrs["topk_group"])
        wts = torch.gather(choice if attrs["weights"] == "official" else scores, -1, ids)
        if attrs["top_k"] > 1 and attrs["renormalize"]:
            wts = wts / (wts.sum(-1, keepdim=True) + 1e-20)
        return [ids, wts * attrs["scaling"]]

    def decompose(self, b, ins, attrs):
        return route(b, *ins, attrs)

    def flops(self, ins, outs, attrs, dims):
        n = ins[0].numel(dims) / dim(ins[0].shape[-1], dims)
        return n * (2.0 * ins[1].shape[0] * ins[1].shape[1] + 8 * ins[1].shape[0])


def route(b, x, gate_weight, bias, attrs: dict) -> list:
    """The router through builder `b` (the model declares it so; moe_route's decomposition):
    fp32 sigmoid scores, + bias for selection, grouped top-k, weights from the biased
    ("official") or unbiased scores, renormalised (top_k > 1), scaled."""
    scores = b("sigmoid", b("linear", b("cast", x, dtype=b.type(bias).dtype), gate_weight, name="logits"),
               name="scores")
    choice = b("add", scores, bias, name="choice")
    ids = b("grouped_topk", choice, top_k=attrs["top_k"], n_group=attrs["n_group"],
            topk_group=attrs["topk_group"], name="ids")
    w = b("take_along", choice if attrs["weights"] == "official" else scores, ids, name="weights")
    if attrs["top_k"] > 1 and attrs["renormalize"]:
        w = b("renormalize", w, eps=1e-20, name="weights")
    return [ids, b("scale", w, factor=attrs["scaling"], name="weights")]


DISPATCH_LAYOUT = ("its rows are laid out by expert at run time (data-dependent sizes); every "
                   "target maps it natively")


def _rows_dim(x_shape, k: int):
    """M = (product of x's leading dims) * k, as a symbolic dim."""
    ints, syms = k, []
    for d in x_shape[:-1]:
        if isinstance(d, int):
            ints *= d
        else:
            syms.append(d)
    return "*".join(syms + [str(ints)]) if syms else ints


@register
class MoEPermute(OpDef):
    fused = True
    no_decomposition = DISPATCH_LAYOUT
    kind = "moe_permute"
    doc = "token copies sorted by expert: (rows [M,D], offsets [E+1], order [M]), M = N*top_k"
    family = "moe"
    results = ("rows", "offsets", "order")
    operands = ("x", "ids")
    attributes = {"num_experts": REQUIRED(int)}

    def infer(self, types, attrs):
        x, ids = types
        expect(ids.dtype == "i64" and ids.shape[:-1] == x.shape[:-1], self.kind,
               f"ids {ids} do not fit x {x}")
        M = _rows_dim(x.shape, ids.shape[-1])
        return [x.with_shape((M, x.shape[-1])), ids.with_shape((attrs["num_experts"] + 1,)),
                ids.with_shape((M,))]

    def ref(self, args, attrs):
        x, ids = args
        k, D, E = ids.shape[-1], x.shape[-1], attrs["num_experts"]
        flat = ids.reshape(-1)
        order = torch.sort(flat, stable=True)[1]
        counts = torch.bincount(flat, minlength=E)
        offsets = torch.zeros(E + 1, dtype=torch.long, device=x.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return [x.reshape(-1, D)[order // k], offsets, order]

    def flops(self, ins, outs, attrs, dims):
        return 0.0


@register
class GroupedSwiGLU(OpDef):
    fused = True
    no_decomposition = DISPATCH_LAYOUT
    kind = "grouped_swiglu"
    doc = "per-expert SwiGLU over expert-sorted rows with packed weights w13 [E,2I,D], w2 [E,D,I]"
    family = "moe"
    operands = ("rows", "offsets", "w13", "w2")

    def infer(self, types, attrs):
        x, off, w13, w2 = types
        expect_float(self.kind, x, w13, w2)
        E, I2, D = w13.shape
        expect(x.rank == 2 and x.shape[1] == D and off.shape == (E + 1,) and I2 % 2 == 0
               and w2.shape == (E, D, I2 // 2), self.kind,
               f"rows {x}, offsets {off}, w13 {w13}, w2 {w2} do not fit")
        return [x]

    def ref(self, args, attrs):
        x, off, w13, w2 = args
        out = torch.zeros_like(x)
        I = w2.shape[2]
        for e in range(w13.shape[0]):
            s, t = int(off[e]), int(off[e + 1])
            if t > s:
                out[s:t] = swiglu(x[s:t], *(w.to(x.dtype) for w in (w13[e, :I], w13[e, I:], w2[e])))
        return [out]

    def flops(self, ins, outs, attrs, dims):
        E, I2, D = ins[2].shape
        return 2.0 * dim(ins[0].shape[0], dims) * D * (I2 + I2 // 2)

    def bytes_moved(self, ins, outs, attrs, dims):
        M = dim(ins[0].shape[0], dims)
        E = ins[2].shape[0]
        touched = min(E, M)     # at most M experts receive a row
        per_expert = (ins[2].nbytes(dims) + ins[3].nbytes(dims)) / E
        return float(touched * per_expert + ins[0].nbytes(dims) + outs[0].nbytes(dims))


@register
class MoEUnpermute(OpDef):
    fused = True
    no_decomposition = DISPATCH_LAYOUT
    kind = "moe_unpermute"
    doc = "acc[n] + sum_j weights[n, j] * y[row holding copy (n, j)]"
    family = "moe"
    operands = ("y", "order", "weights", "acc")

    def infer(self, types, attrs):
        y, order, w, acc = types
        expect(y.rank == 2 and y.shape[1] == acc.shape[-1] and order.shape == (y.shape[0],)
               and w.shape[:-1] == acc.shape[:-1], self.kind,
               f"y {y}, order {order}, weights {w}, acc {acc} do not fit")
        return [acc]

    def ref(self, args, attrs):
        y, order, w, acc = args
        k, D = w.shape[-1], acc.shape[-1]
        unsorted = torch.empty_like(y)
        unsorted[order] = y
        contrib = (unsorted.view(-1, k, D).to(w.dtype) * w.reshape(-1, k, 1)).sum(1)
        return [(acc.reshape(-1, D) + contrib.to(acc.dtype)).reshape(acc.shape)]


@register
class MoEExperts(OpDef):
    kind = "moe_experts"
    doc = "acc + sum_j weights[..., j] * SwiGLU_{ids[..., j]}(x), packed expert weights (the routed MoE)"
    family = "moe"
    fused = True
    operands = ("x", "ids", "weights", "w13", "w2", "acc")

    def infer(self, types, attrs):
        x, ids, w, w13, w2, acc = types
        expect_float(self.kind, x, w, w13, w2, acc)
        E, I2, D = w13.shape
        expect(ids.dtype == "i64" and ids.shape == w.shape and ids.shape[:-1] == x.shape[:-1]
               and acc.shape == x.shape and x.shape[-1] == D and w2.shape == (E, D, I2 // 2), self.kind,
               f"x {x}, ids {ids}, weights {w}, w13 {w13}, w2 {w2}, acc {acc} do not fit")
        return [acc]

    def ref(self, args, attrs):
        x, ids, w, w13, w2, acc = args
        D, I = x.shape[-1], w2.shape[2]
        xf, idf, wf = x.reshape(-1, D), ids.reshape(-1, ids.shape[-1]), w.reshape(-1, w.shape[-1])
        out = acc.reshape(-1, D).clone()
        for e in range(w13.shape[0]):
            hit = idf == e
            rows = hit.any(-1).nonzero().squeeze(-1)
            if rows.numel():
                y = swiglu(xf[rows], *(t.to(x.dtype) for t in (w13[e, :I], w13[e, I:], w2[e])))
                gate = (wf[rows] * hit[rows]).sum(-1, keepdim=True)
                out[rows] = out[rows] + (gate * y.to(gate.dtype)).to(out.dtype)
        return [out.reshape(acc.shape)]

    def decompose(self, b, ins, attrs):
        x, ids, w, w13, w2, acc = ins
        rows, offsets, order = b.emit("moe_permute", x, ids, num_experts=b.type(w13).shape[0], name="permute")
        return [b("moe_unpermute", b("grouped_swiglu", rows, offsets, w13, w2, name="experts"), order, w, acc,
                  name="unpermute")]

    def flops(self, ins, outs, attrs, dims):
        E, I2, D = ins[3].shape
        return 2.0 * ins[1].numel(dims) * D * (I2 + I2 // 2)     # one SwiGLU per routed copy

    def bytes_moved(self, ins, outs, attrs, dims):
        E = ins[3].shape[0]
        touched = min(E, ins[1].numel(dims))
        per_expert = (ins[3].nbytes(dims) + ins[4].nbytes(dims)) / E
        return float(touched * per_expert + ins[0].nbytes(dims) + 2 * outs[0].nbytes(dims))


@register
class Stack(OpDef):
    fused = True
    kind, doc = "stack", "stack equal-typed operands along a new leading dim"
    family = "moe"
    operands = ("*xs",)

    def infer(self, types, attrs):
        expect(len(types) >= 1 and all(t == types[0] for t in types), self.kind,
               "operands must share one type")
        return [types[0].with_shape((len(types),) + types[0].shape)]

    def ref(self, args, attrs):
        return [torch.stack(list(args))]

    def decompose(self, b, ins, attrs):
        shape = list(b.type(ins[0]).shape)
        return [b("concat", *[b("reshape", x, shape=[1] + shape) for x in ins], dim=0)]

    def flops(self, ins, outs, attrs, dims):
        return 0.0
