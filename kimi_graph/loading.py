"""Loading that fits: the parameters a model's graphs read are produced layer by layer from a
source (a memory-mapped checkpoint, or seeded draws on the device); each derived parameter
(packed experts, absorbed MLA weights, ...) is computed from its originals as they arrive,
and an original no graph reads is dropped after its last use. So weights are held once and
the peak is the final weights plus about one layer's transforms in flight.

The same walk on the meta device costs no memory: it gives the bytes held and the peak, which
`check_fits` compares with free memory before anything is allocated."""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Container, Iterable, Mapping

import torch

from .weight_transforms import WeightTransforms

PROGRESS_MIN_BYTES = 1 << 30   # show a progress bar when more than 1 GiB is loaded
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class InsufficientMemoryError(ValueError, MemoryError):
    """The weights would not fit in the target device's free memory."""


def layer_of(name: str) -> int:
    """The decoder layer a parameter belongs to; -1 for embedding, final norm and head."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def _root(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def _nbytes(root: torch.Tensor) -> int:
    return root.untyped_storage().nbytes()


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a view costs nothing extra)."""
    roots = {id(r): r for r in map(_root, tensors)}
    return sum(_nbytes(r) for r in roots.values())


class Live:
    """Bytes of the storages alive during a load (by root tensor) and their peak."""

    def __init__(self):
        self.roots: dict[int, list] = {}      # id -> [root, holders]
        self.bytes = self.peak = 0

    def __call__(self, t: torch.Tensor, sign: int) -> None:
        r = _root(t)
        entry = self.roots.get(id(r))
        if sign > 0:
            if entry is None:
                self.roots[id(r)] = [r, 1]
                self.bytes += _nbytes(r)
                self.peak = max(self.peak, self.bytes)
            else:
                entry[1] += 1
        elif entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.roots[id(r)]
                self.bytes -= _nbytes(r)


def materialize(names: Iterable[str], transforms: WeightTransforms | None,
                fetch: Callable[[str], torch.Tensor], *, held: Mapping[str, torch.Tensor] | None = None,
                live: Live | None = None, progress: Callable[[str], None] | None = None,
                direct: Container[str] = ()) -> dict[str, torch.Tensor]:
    """Tensors for `names`: originals from `fetch`, derived parameters by their recipes,
    reading the tensors `held` already has where they serve; `direct`: derived names `fetch`
    gives as they are (a pre-quantized checkpoint's packed experts).

    Parameters are produced in layer order; an original or intermediate derived tensor is
    fetched when a recipe first needs it and dropped after its last reader. `live` accounts
    for the bytes alive; `progress(name)` is called after each original is fetched."""
    held = held or {}
    recipes = {n: r for n, r in (transforms.recipes if transforms is not None else {}).items()
               if n not in held and n not in direct}
    want = set(names)
    readers: Counter = Counter()
    todo, stack = set(), [n for n in want if n in recipes]
    while stack:                                   # every recipe to run, and who reads what
        n = stack.pop()
        if n not in todo:
            todo.add(n)
            readers.update(recipes[n].sources)
            stack += [s for s in recipes[n].sources if s in recipes]
    group: dict[str, int] = {}

    def layer(n: str) -> int:
        if n not in group:
            group[n] = max(map(layer, recipes[n].sources), default=-1) if n in recipes else layer_of(n)
        return group[n]

    live = live or Live()
    out: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}

    def produce(n: str) -> torch.Tensor:
        if n in recipes:
            t = recipes[n].evaluate(get, release, live)
        else:
            t = fetch(n)
            if progress is not None:
                progress(n)
        live(t, 1)
        return t

    def get(n: str) -> torch.Tensor:
        if n in out:
            return out[n]
        if n in held:
            return held[n]
        if n not in cache:
            cache[n] = produce(n)
        return cache[n]

    def release(n: str) -> None:
        readers[n] -= 1
        if readers[n] == 0 and n in cache and n not in want:
            live(cache.pop(n), -1)

    for n in sorted(want, key=lambda n: (layer(n), n)):
        out[n] = cache.pop(n) if n in cache else produce(n)
    return out


def originals(names: Iterable[str], transforms: WeightTransforms | None, direct: Container[str] = ()) -> set[str]:
    """The source parameters `names` are made from (themselves, for originals and `direct`)."""
    recipes = {n: r for n, r in (transforms.recipes if transforms is not None else {}).items() if n not in direct}
    seen, stack, found = set(), list(names), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in recipes:
            stack += recipes[n].sources
        else:
            found.add(n)
    return found


def load_weights(source, names: Iterable[str] | None = None,
                 transforms: WeightTransforms | None = None, *, live: Live | None = None,
                 progress: bool | None = None) -> dict[str, torch.Tensor]:
    """`names` (default: every declared parameter of `source`, a weights.WeightSource) on the
    source's device, with a progress bar over the bytes read (shown from 1 GiB on, or as
    `progress` says)."""
    names = list(source.types) if names is None else list(names)
    direct = getattr(source, "direct", ())
    total = sum(source.nbytes(n) for n in originals(names, transforms, direct))
    show = progress if progress is not None else total >= PROGRESS_MIN_BYTES
    bar = progress_bar(total, show and source.device.type != "meta")
    try:
        return materialize(names, transforms, source.fetch, live=live,
                           progress=lambda n: bar(source.nbytes(n)), direct=direct)
    finally:
        bar(None)


def estimate(source, names: Iterable[str] | None = None,
             transforms: WeightTransforms | None = None) -> tuple[int, int]:
    """(bytes held after loading, peak bytes while loading) `names` from `source`, found by
    loading them on the meta device: nothing is read or allocated."""
    names = list(source.types) if names is None else list(names)
    direct = getattr(source, "direct", ())
    if transforms is None or not any(n in transforms and n not in direct for n in names):
        held = sum(source.nbytes(n) for n in names)      # originals only: nothing to walk
        return held, held
    live = Live()
    materialize(names, transforms, lambda n: source.empty(n, "meta"), live=live, direct=direct)
    return live.bytes, live.peak


# -- free memory -------------------------------------------------------------------------
def free_memory(device: str | torch.device) -> int | None:
    """Free bytes on `device`: available RAM for the CPU, free device memory for CUDA;
    None where unknown (meta, other devices)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type != "cpu":
        return None
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_fits(needed: int, device, what: str, alternatives: dict[str, int]) -> None:
    """Raise InsufficientMemoryError (naming both numbers and what would fit) when `needed`
    bytes exceed the free memory of `device`. `alternatives`: dtype name -> bytes needed."""
    free = free_memory(device)
    if free is None or needed <= free:
        return
    fits = [f"dtype={d} ({gb(n)})" for d, n in alternatives.items() if n <= free]
    others = ", ".join(f"{d}: {gb(n)}" for d, n in alternatives.items())
    hint = ("what fits: " + ", ".join(fits)) if fits else \
        "no supported dtype fits" + (f" ({others})" if others else "")
    raise InsufficientMemoryError(
        f"{what} needs {gb(needed)} but {device} has {gb(free)} free; {hint}. "
        "Low-bit experts (load(..., experts='int4' | 'fp8' | 'int8'), --experts) hold less; "
        "loading across several GPUs is not supported yet.")


def progress_bar(total: int, show: bool, label: str = "loading weights"):
    """A rich progress bar over `total` bytes: advance(n) adds n, advance(None) closes it."""
    if not show:
        return lambda n: None
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    prog = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
    prog.start()
    task = prog.add_task(label, total=total)

    def advance(n):
        if n is None:
            prog.stop()
        else:
            prog.advance(task, n)
    return advance
