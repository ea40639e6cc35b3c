"""Running a model over a loader: logits for every image, with optional test-time augmentation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn
from torchvision.transforms import v2

from ..data.transforms import Preprocess, _interp

TTA_MODES = ("flip", "multicrop")


class TenCropViews:
    """Ten crops (four corners and the centre, and their mirror images) of the resized image, stacked."""

    def __init__(self, pre: Preprocess):
        self.resize = v2.Compose([v2.ToImage(), v2.Resize(pre.resize_size, interpolation=_interp(pre.interpolation),
                                                          antialias=True)])
        self.crops = v2.TenCrop(pre.img_size)
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.finish(c) for c in self.crops(self.resize(image))])


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def infer(model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
          channels_last: bool = True, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] in float32 on the CPU, targets [N]) over all batches.

    Batches of views ([B, V, C, H, W], from `TenCropViews`) and `flip` average the softmax of the
    views; the log of that average is returned, so its softmax is the averaged probability.
    """
    was_training = model.training
    model.eval()
    outs, targets = [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for x, y in batches:
            views = x.shape[1] if x.ndim == 5 else 1
            x = x.flatten(0, 1) if x.ndim == 5 else x
            x = x.to(device, non_blocking=True, memory_format=fmt)
            with autocast(device, amp_dtype):
                logits = model(x).float()
                if flip:
                    logits = torch.stack([logits, model(x.flip(-1)).float()], 1)
                    views *= 2
            if views > 1:
                probs = logits.reshape(-1, views, logits.shape[-1]).softmax(-1).mean(1)
                logits = probs.clamp_min(1e-12).log()
            outs.append(logits.cpu())
            targets.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(targets)
