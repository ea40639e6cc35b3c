"""Exact zeros for the weight gradient of kernel taps that only ever see padding.

On CPU under bf16 autocast, PyTorch's convolution backward (oneDNN) leaves the weight gradient of
such taps uninitialised: a 3x3 stride-2 convolution on a 1x1 or 2x2 map (the first block of layer4
at 16-32 px inputs) reads padding with some taps, and their gradient came back as whatever memory
held, NaN included (20 runs in 20 after memory held NaNs; fp32 and channels-first fp32 were exact).
Training never sees it, since the forward skips padding too, but the weights of those taps become
NaN, and engines that multiply padding (onnxruntime, OpenVINO) then answer NaN. The gradient of
those taps is zero by definition; this puts exact zeros there.
"""

from __future__ import annotations

import torch
from torch import nn


def _touched(size: int, kernel: int, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Which kernel offsets along one axis read at least one real (non-padding) input position."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    taps = torch.zeros(kernel, dtype=torch.bool)
    for i in range(kernel):
        rows = torch.arange(out) * stride - padding + i * dilation
        taps[i] = bool(((rows >= 0) & (rows < size)).any())
    return taps


def guard_padding_taps(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks on every convolution with a spatial kernel: its weight gradient is zero where, at the input
    size of the last forward pass, a tap read only padding."""
    handles = []
    for conv in model.modules():
        if (not isinstance(conv, nn.Conv2d) or conv.kernel_size == (1, 1) or not isinstance(conv.padding, tuple)
                or not conv.weight.requires_grad):  # 'same'/'valid' padding is a string; frozen layers learn nothing
            continue
        state: dict = {"size": None, "mask": None}

        def record(module: nn.Conv2d, args: tuple, state: dict = state) -> None:
            size = tuple(args[0].shape[-2:])
            if size != state["size"]:
                rows, cols = (_touched(n, k, s, p, d) for n, k, s, p, d in
                              zip(size, module.kernel_size, module.stride, module.padding, module.dilation))
                mask = rows[:, None] & cols[None, :]
                state["size"], state["mask"] = size, None if bool(mask.all()) else mask

        def clean(grad: torch.Tensor, state: dict = state) -> torch.Tensor:
            mask = state["mask"]
            return grad if mask is None else torch.where(mask.to(grad.device), grad, torch.zeros((), dtype=grad.dtype,
                                                                                                  device=grad.device))

        handles.append(conv.register_forward_pre_hook(record))
        handles.append(conv.weight.register_hook(clean))
    return handles
