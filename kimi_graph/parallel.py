"""The process mesh a sharded model runs on: `tp` ranks split the attention heads, `ep` groups
of them split the routed experts; world = tp * ep ranks, rank = ep_rank * tp + tp_rank.

The collectives of a sharded graph (ops/parallel.py) name a process group of this mesh:
"tp" (the tp ranks sharing this rank's ep_rank) or "world" (every rank). `init_mesh` builds
it inside an initialized torch.distributed process group (gloo on CPUs, NCCL on GPUs);
`init_process_group_from_env` starts one under torchrun."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

GROUPS = ("tp", "world")


class ParallelError(ValueError):
    """A bad parallel layout, or one that does not match the process group."""


@dataclass(frozen=True)
class Layout:
    """tp and ep sizes, and one rank's place in them."""
    tp: int = 1
    ep: int = 1
    rank: int = 0

    def __post_init__(self):
        for key in ("tp", "ep"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ParallelError(f"{key} must be a positive integer, got {v!r}")
        if not 0 <= self.rank < self.world:
            raise ParallelError(f"rank {self.rank} is outside the {self.world} ranks of tp={self.tp}, ep={self.ep}")

    @property
    def world(self) -> int:
        return self.tp * self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp

    def size(self, group: str) -> int:
        return {"tp": self.tp, "world": self.world}[group]

    def index(self, group: str) -> int:
        """This rank's place in `group`."""
        return {"tp": self.tp_rank, "world": self.rank}[group]

    def pipeline(self) -> str:
        return f"shard{{tp={self.tp},ep={self.ep},rank={self.rank}}}"

    def __str__(self) -> str:
        return f"tp={self.tp},ep={self.ep}"


def parse_parallel(text: str) -> tuple[int, int]:
    """"tp=2", "ep=2", "tp=2,ep=2" -> (tp, ep)."""
    if not isinstance(text, str) or not re.fullmatch(r"\s*\w+\s*=\s*\d+\s*(,\s*\w+\s*=\s*\d+\s*)*", text):
        raise ParallelError(f"parallel must look like 'tp=2', 'ep=2' or 'tp=2,ep=2', got {text!r}")
    sizes = {"tp": 1, "ep": 1}
    for item in text.split(","):
        key, _, value = (s.strip() for s in item.partition("="))
        if key not in sizes:
            raise ParallelError(f"parallel: unknown key {key!r} in {text!r}; use tp and ep")
        sizes[key] = int(value)
        if sizes[key] < 1:
            raise ParallelError(f"parallel: {key} must be >= 1, got {text!r}")
    return sizes["tp"], sizes["ep"]


class Mesh:
    """A Layout bound to torch.distributed process groups."""

    def __init__(self, layout: Layout, groups: dict):
        self.layout, self.groups = layout, groups

    def group(self, name: str, size: int):
        if name not in self.groups:
            raise ParallelError(f"no process group {name!r} (groups: {', '.join(GROUPS)})")
        if self.layout.size(name) != size:
            raise ParallelError(f"a collective over {size} ranks of group {name!r}, but this mesh "
                                f"({self.layout}) has {self.layout.size(name)}: the graph was "
                                "sharded for another layout")
        return self.groups[name]


_MESH: Mesh | None = None


def init_mesh(parallel: str) -> Mesh:
    """The mesh for `parallel` ("tp=2,ep=2") over the default process group, made current.
    The process group must be initialized with exactly tp * ep ranks."""
    import torch.distributed as dist
    global _MESH
    tp, ep = parse_parallel(parallel)
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError(f"parallel={parallel!r} needs an initialized torch.distributed process "
                            "group: run under torchrun (the CLI starts one from its environment) or "
                            "call torch.distributed.init_process_group first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp * ep:
        raise ParallelError(f"parallel={parallel!r} needs tp * ep = {tp * ep} processes, but the "
                            f"process group has {world}")
    layout = Layout(tp, ep, rank)
    if _MESH is not None and _MESH.layout == layout:
        return _MESH
    groups = {"world": dist.group.WORLD}
    # every rank creates every tp group, in the same order (new_group's contract)
    for e in range(ep):
        g = dist.new_group(list(range(e * tp, (e + 1) * tp))) if tp < world else dist.group.WORLD
        if e == layout.ep_rank:
            groups["tp"] = g
    _MESH = Mesh(layout, groups)
    return _MESH


def current_mesh() -> Mesh | None:
    return _MESH


def process_group(name: str, size: int):
    """The current mesh's group `name`, checked to have `size` ranks."""
    if _MESH is None:
        raise ParallelError(f"a collective over group {name!r} ({size} ranks) runs only in a model "
                            "loaded with parallel=... inside a process group (no mesh is set up)")
    return _MESH.group(name, size)


def init_process_group_from_env(device: str = "auto", timeout=None) -> str:
    """Start the default process group from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL with one GPU per local rank where CUDA is
    available (and device is not "cpu"), else gloo; `timeout` (a timedelta) for its
    collectives. -> the device this rank runs on."""
    import torch.distributed as dist
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ParallelError("--parallel needs several processes: start them with torchrun "
                            "(torchrun --nproc-per-node N -m kimi_graph generate ... --parallel tp=N)")
    cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        if local >= torch.cuda.device_count():
            raise ParallelError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                                device_id=torch.device("cuda", local) if cuda else None)
    return f"cuda:{local}" if cuda else "cpu"


def follow_rank_zero() -> bool:
    """Every rank runs the same program on the same inputs and only rank 0 prints: the other
    ranks' stdout goes to /dev/null (their stderr stays, for errors). -> is this rank 0?"""
    import sys

    import torch.distributed as dist
    if dist.is_initialized() and dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        return False
    return True
