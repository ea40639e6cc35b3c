"""Where a model runs and in what precision: shared by training, evaluation and (later) serving."""

from __future__ import annotations

import torch

from .errors import ConfigError

AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # as config's train.amp (config stays free of torch)


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} was asked for, but this machine has no CUDA device")
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
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else None
