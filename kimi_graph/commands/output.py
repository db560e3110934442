"""Command output: where a command writes (an output directory or file, checked before any
work is done), and sizes in human units.

A directory must be new or empty; with `force`, the files a previous run of the same command
wrote there (`owned`) are removed first, and nothing else is touched. A file's path must not
be a directory; an existing file is replaced only with `force`."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterable


def output_dir(out: str, force: bool, owned: Callable[[Path], Iterable[str]]) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory (it is made if missing)")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise ValueError(f"--out {out} is not empty; give a new directory, or --force to "
                             "replace a previous export there (only the files it wrote are removed)")
        for name in set(owned(path)):
            p = path / name
            if p.resolve().parent != path.resolve():       # names inside the directory only
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_file(out: str, force: bool) -> Path:
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file path")
    if path.exists() and not force:
        raise ValueError(f"--out {out} exists; --force replaces it")
    if not path.parent.is_dir():
        raise ValueError(f"--out {out}: directory {path.parent} does not exist")
    return path


def human(n: float, unit: str = "", base: int = 1000) -> str:
    """1234567 -> "1.23 M" (base 1000; plain counts say B for billions: "49.1 B") or, with
    base 1024 and unit "B", "1.18 MiB"."""
    prefixes = ["", "K", "M", "G" if unit else "B", "T", "P"]
    i = 0
    while abs(n) >= base and i < len(prefixes) - 1:
        n, i = n / base, i + 1
    p = prefixes[i] + ("i" if base == 1024 and i else "")
    text = f"{n:.0f}" if i == 0 else f"{n:.3g}" if abs(n) < 100 else f"{n:.0f}"
    return f"{text} {p}{unit}".rstrip()


def human_bytes(n: float) -> str:
    return human(n, "B", 1024)


def add_experts_option(p) -> None:
    """--experts: low-bit routed experts (kimi_graph.load's `experts`)."""
    p.add_argument("--experts", choices=("bf16", "int4", "int8", "fp8"), default=None,
                   help="routed experts' weights: int4 / int8 (group 128) or fp8 (128x128 blocks), "
                        "quantized as they load, after --pipeline (default: 'default'); "
                        "bf16 or unset: the model dtype")
