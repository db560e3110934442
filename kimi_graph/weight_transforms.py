"""Weight transforms as recipes: how a parameter that a pass derives (packed experts, absorbed
MLA matrices, folded constants) is computed from the parameters it reads.

fold-constants records one `Recipe` per parameter it creates in a `WeightTransforms`
registry. A registry shared by every graph of a model gives each distinct recipe one name,
so graphs that derive the same tensor share it, and the loader computes each derived
parameter once, layer by layer, from the originals (see kimi_graph.loading)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator

import torch

from .ir import Graph, Op
from .ops import get_op


@dataclass(frozen=True)
class Recipe:
    """Parameter-only ops in order, each (kind, inputs, outputs, attrs as JSON); inputs are
    parameters ("@name") or results of earlier steps. `output` is the value computed."""
    steps: tuple[tuple[str, tuple[str, ...], tuple[str, ...], str], ...]
    output: str

    @classmethod
    def of(cls, g: Graph, ops: list[Op], value: str) -> "Recipe":
        """The steps of `ops` (topologically ordered) that `value` depends on."""
        need, steps = {value}, []
        for op in reversed(ops):
            if need & set(op.outputs):
                steps.append((op.kind, tuple(op.inputs), tuple(op.outputs),
                              json.dumps(op.attrs, sort_keys=True)))
                need.update(v for v in op.inputs if v not in g.params)
        return cls(tuple(reversed(steps)), value)

    @cached_property
    def sources(self) -> tuple[str, ...]:
        """The parameters read (names without "@"), in first-use order."""
        seen: dict[str, None] = {}
        for _, ins, _, _ in self.steps:
            seen.update((v[1:], None) for v in ins if v.startswith("@"))
        return tuple(seen)

    @cached_property
    def key(self) -> str:
        """The recipe with its intermediate values numbered: equal keys, equal tensors."""
        names: dict[str, str] = {}
        text = []
        for kind, ins, outs, attrs in self.steps:
            names.update((v, f"${len(names) + i}") for i, v in enumerate(outs))
            text.append(f"{kind}({','.join(names.get(v, v) for v in ins)})->"
                        f"{','.join(names[v] for v in outs)}{attrs}")
        return ";".join(text) + "=>" + names[self.output]

    def evaluate(self, fetch: Callable[[str], torch.Tensor],
                 release: Callable[[str], None] = lambda name: None,
                 live: "Callable[[torch.Tensor, int], None]" = lambda t, sign: None) -> torch.Tensor:
        """Run the steps with the ops' reference implementations. `fetch(name)` gives a
        source; `release(name)` is called after a source's last read here; `live(t, +1/-1)`
        sees each intermediate come and go (for memory accounting)."""
        last: dict[str, int] = {}
        for i, (_, ins, _, _) in enumerate(self.steps):
            last.update((v, i) for v in ins)
        env: dict[str, torch.Tensor] = {}
        for i, (kind, ins, outs, attrs) in enumerate(self.steps):
            opdef = get_op(kind)
            args = [env[v] if v in env else fetch(v[1:]) for v in ins]
            for v, t in zip(outs, opdef.ref(args, opdef.full_attrs(json.loads(attrs)))):
                env[v] = t
                live(t, 1)
            del args
            for v in dict.fromkeys(ins):
                if last[v] != i:
                    continue
                if v in env:
                    live(env.pop(v), -1)
                else:
                    release(v[1:])
        out = env.pop(self.output)
        for t in env.values():
            live(t, -1)
        live(out, -1)           # the caller accounts for the result it keeps
        return out


def candidates(base: str) -> Iterator[str]:
    """base, base.folded, base.folded.1, ...: names tried for a derived parameter."""
    yield base
    yield base + ".folded"
    i = 1
    while True:
        yield f"{base}.folded.{i}"
        i += 1


class WeightTransforms:
    """Derived parameter name (no "@") -> Recipe; one name per distinct recipe."""

    def __init__(self):
        self.recipes: dict[str, Recipe] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.recipes

    def __getitem__(self, name: str) -> Recipe:
        return self.recipes[name]

    def claim(self, base: str, recipe: Recipe, clash: Callable[[str], bool]) -> str:
        """The name for `recipe`: one already holding the same recipe, else the first
        candidate that is free here and for which `clash(name)` is false."""
        for name in candidates(base):
            known = self.recipes.get(name)
            if known is not None:
                if known.key == recipe.key:
                    return name
                continue
            if not clash(name):
                self.recipes[name] = recipe
                return name
        raise AssertionError("unreachable")
