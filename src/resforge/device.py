"""Where a model runs, in what precision, and from which seed: shared by training, evaluation and deploy."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from .config import CHOICES
from .errors import ConfigError

AMP_CHOICES = CHOICES["train.amp"]


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision in `dtype` (None: off); `cache=False` for CUDA graph capture, which must not keep casts."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def native_bf16(device: torch.device) -> bool:
    """bf16 runs at full speed here: CUDA that has it, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when there is one, else the CPU. A GPU comes back numbered (cuda -> cuda:0, the current one)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} was asked for, but this machine has no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name} was asked for, but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA that has it (else fp16) and on CPUs with native bf16 (AVX512-BF16, AMX)."""
    if amp not in AMP_CHOICES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if native_bf16(device) else None


def precision_name(dtype: torch.dtype | None) -> str:
    """A mixed-precision dtype as the backends' precision names it: bf16, fp16, or fp32 for none."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def cpu_name() -> str:
    """The processor's model name (what a measurement was taken on)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_device(batch: Any, device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> Any:
    """A batch on `device`: a tensor (in `memory_format` when it is a batch of images), or the lists and dicts of
    tensors that detection batches are (images of different sizes, one target dict each)."""
    if isinstance(batch, torch.Tensor):
        fmt = memory_format if batch.dim() == 4 else torch.preserve_format
        return batch.to(device, non_blocking=True, memory_format=fmt)
    if isinstance(batch, (list, tuple)):
        return [to_device(b, device, memory_format) for b in batch]
    if isinstance(batch, dict):
        return {k: to_device(v, device, memory_format) for k, v in batch.items()}
    return batch
