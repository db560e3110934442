"""NaN and inf checks: weights as they load (one pass on their device, one sync), logits as
the model returns them. A non-finite value is an error that names where it is, never an
answer."""
from __future__ import annotations

from typing import Mapping

import torch

CHUNK = 1 << 26            # elements per isfinite call: bounds the transient bool buffer


class NonFiniteError(ValueError, FloatingPointError):
    """Weights or logits hold NaN or inf."""


def _all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool on t's device (no sync). float8 e4m3fn has no inf; its NaN is S.1111.111."""
    if t.dtype == torch.float8_e4m3fn:
        return ((t.reshape(-1).view(torch.uint8) & 0x7F) != 0x7F).all()
    flat = t.reshape(-1)
    if flat.numel() <= CHUNK:
        return torch.isfinite(flat).all()
    return torch.stack([torch.isfinite(flat[i:i + CHUNK]).all() for i in range(0, flat.numel(), CHUNK)]).all()


def check_finite_weights(weights: Mapping[str, torch.Tensor]) -> None:
    """Raise NonFiniteError naming the tensors that hold NaN or inf. Runs on the weights'
    device(s) and reads one flag per device back."""
    by_device: dict[torch.device, list[str]] = {}
    for name, t in weights.items():
        if t.is_floating_point() and t.device.type != "meta":
            by_device.setdefault(t.device, []).append(name)
    bad = []
    for names in by_device.values():
        flags = torch.stack([_all_finite(weights[n]) for n in names])
        if not bool(flags.all()):
            bad += [n for n, ok in zip(names, flags.tolist()) if not ok]
    if bad:
        shown = ", ".join(sorted(bad)[:8]) + (f", ... ({len(bad)} in all)" if len(bad) > 8 else "")
        raise NonFiniteError(f"weights hold NaN or inf: {shown} (load(..., check_finite=False) "
                             "skips this check)")


def check_finite_logits(logits: torch.Tensor, what: str = "logits") -> torch.Tensor:
    """`logits`, or NonFiniteError saying which rows hold NaN or inf."""
    ok = torch.isfinite(logits).all(dim=-1)
    if not bool(ok.all()):
        rows = (~ok).nonzero().tolist()
        raise NonFiniteError(f"{what} hold NaN or inf in {len(rows)} of {ok.numel()} rows "
                             f"(first at index {rows[0]}); the weights or inputs make the "
                             "model overflow")
    return logits
