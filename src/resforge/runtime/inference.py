"""The one batch loop: a model over batches of images, logits for every image, with optional test-time
augmentation. `Predictor.infer` runs it over labelled files; the trainer's validation over its own loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torchvision.transforms import v2

from ..data.transforms import Preprocess, interpolation_mode

TTA_MODES = ("flip", "multicrop")


class TenCropViews:
    """Ten crops (four corners and the centre, and their mirror images) of the resized image, stacked."""

    def __init__(self, pre: Preprocess):
        resize = v2.Resize(pre.resize_size, interpolation=interpolation_mode(pre.interpolation), antialias=True)
        self.resize = v2.Compose([v2.ToImage(), resize])
        self.crops = v2.TenCrop(pre.img_size)
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.finish(c) for c in self.crops(self.resize(image))])


@torch.no_grad()
def infer(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, flip: bool = False,
          flip_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, C] in float32 on the CPU, targets [N]) of `forward` over all batches.

    Batches of views ([B, V, C, H, W], from `TenCropViews`) and `flip` (mirroring along `flip_dim`)
    average the softmax of the views; the log of that average is returned, so its softmax is the
    averaged probability.
    """
    outs, targets = [], []
    for x, y in batches:
        views = x.shape[1] if x.ndim == 5 else 1
        x = x.flatten(0, 1) if x.ndim == 5 else x
        logits = forward(x).float()
        if flip:
            logits = torch.stack([logits, forward(x.flip(flip_dim)).float()], 1)
            views *= 2
        if views > 1:
            probs = logits.reshape(-1, views, logits.shape[-1]).softmax(-1).mean(1)
            logits = probs.clamp_min(1e-12).log()
        outs.append(logits.cpu())
        targets.append(torch.as_tensor(y))
    if not outs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(targets)
