"""Data movement: reshape, transpose, slice, take_last, concat, expand, embedding, cache writes."""
from __future__ import annotations

import torch

from .registry import REQUIRED, OpDef, expect, register


def _zero_flops(self, ins, outs, attrs, dims):
    return 0.0


def _numel_symbolic(shape) -> tuple[int, tuple]:
    """Product of the int dims and the multiset of symbolic dims (for reshape checks)."""
    n, syms = 1, []
    for d in shape:
        if isinstance(d, int):
            n *= d
        else:
            syms.append(d)
    return n, tuple(sorted(syms))


def check_token_ids(ids: torch.Tensor, vocab: int, error: type = ValueError) -> None:
    """Raise `error` naming (up to 8 of) the ids outside [0, vocab)."""
    if ids.numel() and not bool(((ids >= 0) & (ids < vocab)).all()):
        bad = ids[(ids < 0) | (ids >= vocab)].unique().tolist()[:8]
        raise error(f"token ids out of range [0, {vocab}): {bad}")


class _Movement(OpDef):
    family = "movement"
    flops = _zero_flops


class _ToShape(_Movement):
    """x given the type of its `shape` attribute; `allowed` says when that is legal."""
    operands = ("x",)
    attributes = {"shape": REQUIRED(list)}
    shape_attrs = ("shape",)

    def allowed(self, x, shape: tuple) -> bool:
        raise NotImplementedError

    def infer(self, types, attrs):
        (x,) = types
        shape = tuple(attrs["shape"])
        expect(self.allowed(x, shape), self.kind, f"cannot {self.kind} {x} to {list(shape)}")
        return [x.with_shape(shape)]


@register
class Reshape(_ToShape):
    kind, doc = "reshape", "view x with `shape` (same element count)"

    def allowed(self, x, shape):
        return _numel_symbolic(x.shape) == _numel_symbolic(shape)

    def ref(self, args, attrs):
        return [args[0].reshape(attrs["shape"])]

    def bytes_moved(self, ins, outs, attrs, dims):
        return 0.0


@register
class Transpose(_Movement):
    kind, doc = "transpose", "permute the dims of x by `perm`"
    operands = ("x",)
    attributes = {"perm": REQUIRED(list)}

    def infer(self, types, attrs):
        (x,) = types
        perm = list(attrs["perm"])
        expect(sorted(perm) == list(range(x.rank)), self.kind, f"bad perm {perm} for {x}")
        return [x.with_shape([x.shape[p] for p in perm])]

    def ref(self, args, attrs):
        return [args[0].permute(*attrs["perm"]).contiguous()]


@register
class Slice(_Movement):
    kind, doc = "slice", "x[..., start:end, ...] along `dim`"
    operands = ("x",)
    attributes = {"dim": REQUIRED(int), "start": REQUIRED(int), "end": REQUIRED(int)}

    def infer(self, types, attrs):
        (x,) = types
        d, s, e = attrs["dim"] % x.rank, attrs["start"], attrs["end"]
        size = x.shape[d]
        expect(isinstance(size, int) and 0 <= s < e <= size, self.kind,
               f"bad range [{s}, {e}) on dim {d} of {x}")
        shape = list(x.shape)
        shape[d] = e - s
        return [x.with_shape(shape)]

    def ref(self, args, attrs):
        return [args[0].narrow(attrs["dim"], attrs["start"], attrs["end"] - attrs["start"])]


@register
class TakeLast(_Movement):
    kind, doc = "take_last", "the last `count` entries of x along `dim`, whose size may be symbolic"
    operands = ("x",)
    attributes = {"dim": REQUIRED(int), "count": 1}

    def infer(self, types, attrs):
        (x,) = types
        d, n = attrs["dim"] % x.rank, attrs["count"]
        size = x.shape[d]
        expect(n >= 1 and (not isinstance(size, int) or n <= size), self.kind,
               f"cannot take the last {n} of dim {d} of {x}")
        shape = list(x.shape)
        shape[d] = n
        return [x.with_shape(shape)]

    def ref(self, args, attrs):
        x, n = args[0], attrs["count"]
        if x.shape[attrs["dim"]] < n:
            raise ValueError(f"take_last: dim {attrs['dim']} of {tuple(x.shape)} has fewer than {n} entries")
        return [x.narrow(attrs["dim"], -n, n)]


@register
class Concat(_Movement):
    kind, doc = "concat", "concatenate operands along `dim`"
    operands = ("*xs",)
    attributes = {"dim": REQUIRED(int)}

    def infer(self, types, attrs):
        expect(len(types) >= 1, self.kind, "needs at least one operand")
        r = types[0].rank
        d = attrs["dim"] % r
        total = 0
        for t in types:
            expect(t.rank == r and t.dtype == types[0].dtype, self.kind, f"operand {t} vs {types[0]}")
            expect(all(t.shape[i] == types[0].shape[i] for i in range(r) if i != d), self.kind,
                   f"shapes {[str(t) for t in types]} differ off dim {d}")
            if isinstance(t.shape[d], int) and isinstance(total, int):
                total += t.shape[d]
            else:
                total = f"{total}+{t.shape[d]}" if total else t.shape[d]
        shape = list(types[0].shape)
        shape[d] = total
        return [types[0].with_shape(shape)]

    def ref(self, args, attrs):
        return [torch.cat(list(args), dim=attrs["dim"])]


@register
class Expand(_ToShape):
    kind, doc = "expand", "broadcast x (dims of size 1) to `shape`"

    def allowed(self, x, shape):
        return x.rank == len(shape) and all(a == b or a == 1 for a, b in zip(x.shape, shape))

    def ref(self, args, attrs):
        x = args[0]
        return [x.expand(*attrs["shape"])]


@register
class Embedding(_Movement):
    kind, doc = "embedding", "rows of `weight` [V, D] picked by integer `ids`"
    family = "linear"
    operands = ("ids", "weight")

    def infer(self, types, attrs):
        ids, w = types
        expect(ids.dtype in ("i64", "i32"), self.kind, f"ids must be integer, got {ids}")
        expect(w.rank == 2, self.kind, f"weight must be [V, D], got {w}")
        return [w.with_shape(ids.shape + (w.shape[1],))]

    def ref(self, args, attrs):
        ids, w = args
        check_token_ids(ids, w.shape[0])
        return [torch.nn.functional.embedding(ids, w)]

    def bytes_moved(self, ins, outs, attrs, dims):
        return float(ins[0].nbytes(dims) + 2 * outs[0].nbytes(dims))


@register
class CacheWrite(_Movement):
    kind = "cache_write"
    doc = "cache[b, pos[b] + t] = new[b, t]: write T new rows per sequence at its position"
    family = "attention"
    operands = ("cache", "new", "pos")

    def infer(self, types, attrs):
        cache, new, pos = types
        expect(cache.rank == 3 and new.rank == 3 and cache.shape[2] == new.shape[2]
               and cache.shape[0] == new.shape[0] and cache.dtype == new.dtype,
               self.kind, f"cache {cache} and rows {new} do not match")
        expect(pos.rank == 1 and pos.dtype in ("i64", "i32"), self.kind, f"pos must be [B] ints, got {pos}")
        return [cache]

    def ref(self, args, attrs):
        cache, new, pos = args
        T, S = new.shape[1], cache.shape[1]
        # the bounds checks read positions back to the host: skipped inside a CUDA-graph capture
        # (the engine checks every position before it runs a step)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        checked = new.shape[0] and not capturing
        if checked and int(pos.max()) + T > S:
            raise ValueError(f"cache overflow: writing {T} rows at position {int(pos.max())} "
                             f"of a cache with {S} slots")
        if checked and int(pos.min()) < 0:
            raise ValueError(f"cache position {int(pos.min())} is negative")
        out = cache.clone()
        idx = pos.view(-1, 1) + torch.arange(T, device=pos.device).view(1, -1)
        out.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, new.shape[2]), new)
        return [out]

    def bytes_moved(self, ins, outs, attrs, dims):
        return float(2 * ins[1].nbytes(dims))  # in place in real runtimes



@register
class ZerosLike(_Movement):
    kind, doc = "zeros_like", "a zero tensor of x's type"
    operands = ("x",)

    def infer(self, types, attrs):
        return [types[0]]

    def ref(self, args, attrs):
        return [torch.zeros_like(args[0])]
