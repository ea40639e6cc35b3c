"""Timing a model on a batch of its own input kind, with `resforge.timing`'s loop: what bench, the
automatic backend choice, compression's latency targets and the server's warm-up run on."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import timing
from .record import ModelInfo


def sample_batch(info: ModelInfo, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """A batch of the model's input kind for timing, on `device` (a GPU's figures are then the model's, not
    the host-to-device copy's): normalised noise, or mid-grey pixels at the resize size."""
    p = info.pre
    if info.takes_pixels:
        x = torch.full((batch_size, p.resize_size, p.resize_size, p.in_chans), 128, dtype=torch.uint8)
    else:
        x = torch.randn(batch_size, p.in_chans, p.img_size, p.img_size, generator=torch.Generator().manual_seed(0))
    return x.to(device) if device is not None else x


def batch_times(run: Callable[[torch.Tensor], torch.Tensor], info: ModelInfo, batch_size: int, seconds: float, *,
                device: torch.device | None = None, warmup: int = 0, max_calls: int | None = None) -> list[float]:
    """Seconds of each call of `run` on one sample batch of `batch_size`, after `warmup` untimed calls:
    at least three, then for `seconds` (and at most `max_calls`)."""
    x = sample_batch(info, batch_size, device)
    return timing.timed_calls(lambda: run(x), seconds, max_calls=max_calls, warmup=warmup)
