"""Images with their objects as a dataset for detectors: boxes (and masks) move with the image through
torchvision.transforms.v2 and `tv_tensors`, seeded per sample as classification's images are.

A sample is (image, target): the image float CxHxW in 0-1 at its own size (the detector resizes and
normalises it inside, as torchvision's do), the target torchvision's dict: `boxes` (x1, y1, x2, y2
pixels), `labels` (1..K; 0 is the background) and, for instance masks, `masks` (N x H x W uint8).
An image without objects is a negative: its target holds no boxes, which torchvision's detectors take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..config import AugmentConfig
from .annotations import Objects
from .folder import DEFAULT_MAX_PIXELS, load_image
from .loader import pil_to_tensor, seeded_sample

Target = dict[str, torch.Tensor]


def decode_masks(obj: Objects) -> torch.Tensor:
    """The objects' COCO segmentations (polygons or RLE) as N x H x W uint8 masks (pycocotools decodes)."""
    from pycocotools import mask as coco_mask

    h, w = obj.height, obj.width
    out = np.zeros((len(obj.masks or []), h, w), dtype=np.uint8)
    for k, seg in enumerate(obj.masks or []):
        if not seg:
            continue
        if isinstance(seg, list):  # polygons
            rle = coco_mask.merge(coco_mask.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(seg, h, w)
        else:
            rle = seg
        out[k] = coco_mask.decode(rle)
    return torch.from_numpy(out)


def detection_transform(augment: AugmentConfig | None) -> Callable[..., Any]:
    """Training (`augment` given) or evaluation transforms of (image, target): flips, 90-degree turns for
    top-down imagery (`augment.rotation` 90), photometric jitter, zoom-out; then degenerate boxes dropped."""
    steps: list[Any] = []
    if augment is not None:
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip(augment.hflip))
        if augment.vflip:
            steps.append(v2.RandomVerticalFlip(augment.vflip))
        if augment.rotation >= 90:  # right angles only: a box turned by any other angle no longer fits its object
            steps.append(v2.RandomChoice([v2.Identity()] + [v2.RandomRotation((a, a), expand=True)
                                                            for a in (90, 180, 270)]))
        if augment.color_jitter:
            steps.append(v2.RandomPhotometricDistort(p=augment.color_jitter))
        if augment.scale[0] < 1.0:  # objects made smaller, down to the smallest scale's share of the area
            steps.append(v2.RandomZoomOut(fill=0, side_range=(1.0, 1.0 / augment.scale[0] ** 0.5), p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(steps)


class ObjectsDataset(Dataset):
    """(image, target) pairs of annotated images; `masks` decodes instance masks (for Mask R-CNN)."""

    def __init__(self, samples: Sequence[Objects], transform: Callable[..., Any], *, masks: bool = False,
                 seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, mode: str = "RGB"):
        self.samples = list(samples)
        self.transform = transform
        self.masks = masks
        self.seed = seed
        self.max_pixels = max_pixels
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def raw(self, i: int) -> tuple[tv_tensors.Image, Target]:
        """Sample `i` as decoded, before any transform: the image and its objects in pixels (labels 1..K)."""
        obj = self.samples[i]
        image = tv_tensors.Image(pil_to_tensor(load_image(obj.path, self.mode, self.max_pixels)))
        h, w = image.shape[-2:]
        boxes = torch.tensor(obj.boxes, dtype=torch.float32).reshape(-1, 4)
        target: Target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
                          "labels": torch.tensor(obj.labels, dtype=torch.int64) + 1}
        if self.masks:
            target["masks"] = tv_tensors.Mask(decode_masks(obj) if obj.masks else
                                              torch.zeros(len(obj.labels), h, w, dtype=torch.uint8))
        return image, target

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        def get(i: int) -> tuple[torch.Tensor, Target]:
            image, target = self.transform(*self.raw(i))
            return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        return seeded_sample(key, self.seed, get)


def collate_objects(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Images of different sizes stay a list, as torchvision's detectors take them."""
    return [image for image, _ in batch], [target for _, target in batch]
