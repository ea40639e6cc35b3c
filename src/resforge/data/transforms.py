"""Preprocessing and augmentation over torchvision.transforms.v2.

`Preprocess` is the deterministic part (decode mode, resize, centre crop, normalisation): it is
recorded once in a model's sidecar and rebuilt identically by evaluation, prediction and export, so
a deployed model sees what the trained one saw. Augmentation presets add the random part for
training only; MixUp/CutMix act on whole batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from ..config import AugmentConfig
from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Preset defaults for the options an AugmentConfig leaves at None.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {"random_crop": False, "hflip": 0.0, "auto_augment": None, "random_erasing": 0.0},
    "standard": {"random_crop": True, "hflip": 0.5, "auto_augment": None, "random_erasing": 0.0},
    "strong": {"random_crop": True, "hflip": 0.5, "auto_augment": "trivial", "random_erasing": 0.25},
}


@dataclass
class Preprocess:
    """How an image file becomes the network's input tensor, at evaluation time."""

    img_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    in_chans: int = 3
    interpolation: str = "bilinear"

    @property
    def mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Rebuilt from a sidecar; ValueError names what does not make sense."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a mapping, got {type(d).__name__}")
        missing = [k for k in ("img_size", "resize_size", "mean", "std") if k not in d]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing")
        pre = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        for name in ("img_size", "resize_size", "in_chans"):
            value = getattr(pre, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if pre.in_chans not in (1, 3) or pre.resize_size < pre.img_size:
            raise ValueError(f"in_chans {pre.in_chans} (1 or 3) and resize_size {pre.resize_size} (at least "
                             f"img_size {pre.img_size}) do not fit")
        for name in ("mean", "std"):
            values = getattr(pre, name)
            if (not isinstance(values, list) or len(values) != pre.in_chans
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
                raise ValueError(f"{name} must be {pre.in_chans} number(s), got {values!r}")
        if any(v <= 0 for v in pre.std):
            raise ValueError(f"std must be positive, got {pre.std}")
        if pre.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"unknown interpolation {pre.interpolation!r}")
        return pre


def imagenet_stats(in_chans: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                   ) -> tuple[list[float], list[float]]:
    """RGB normalisation statistics (ImageNet's, or the given ones) for `in_chans` inputs."""
    if in_chans == 1:  # the statistics of the gray an RGB network sees for a grayscale image
        return [sum(mean) / 3], [sum(std) / 3]
    return list(mean), list(std)


def make_preprocess(img_size: int, crop_pct: float, in_chans: int, interpolation: str,
                    mean: list[float], std: list[float]) -> Preprocess:
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(f"normalisation has {len(mean)} channel(s) but the images have {in_chans}")
    return Preprocess(img_size=img_size, resize_size=math.floor(img_size / crop_pct + 0.5), mean=list(mean),
                      std=list(std), in_chans=in_chans, interpolation=interpolation)


def interpolation_mode(name: str) -> InterpolationMode:
    return InterpolationMode(name)


def eval_transform(pre: Preprocess) -> v2.Compose:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(pre.resize_size, interpolation=interpolation_mode(pre.interpolation), antialias=True),
        v2.CenterCrop(pre.img_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(pre.mean, pre.std),
    ])


def train_transform(pre: Preprocess, aug: AugmentConfig) -> v2.Compose:
    """The preset's random operations, each overridable by its own option."""
    preset = PRESETS[aug.preset]
    hflip = preset["hflip"] if aug.hflip is None else aug.hflip
    auto = preset["auto_augment"] if aug.auto_augment is None else aug.auto_augment
    erasing = preset["random_erasing"] if aug.random_erasing is None else aug.random_erasing
    interp = interpolation_mode(pre.interpolation)
    ops: list[Any] = [v2.ToImage()]
    if preset["random_crop"]:
        ops.append(v2.RandomResizedCrop(pre.img_size, scale=tuple(aug.scale), interpolation=interp, antialias=True))
    else:
        ops += [v2.Resize(pre.resize_size, interpolation=interp, antialias=True), v2.CenterCrop(pre.img_size)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if aug.vflip > 0:
        ops.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.rotation > 0:
        ops.append(v2.RandomRotation(aug.rotation, interpolation=interp))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j if pre.in_chans == 3 else None))
    if auto == "trivial":
        ops.append(v2.TrivialAugmentWide(interpolation=interp))
    elif auto == "rand":
        ops.append(v2.RandAugment(interpolation=interp))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if aug.noise > 0:
        ops.append(v2.GaussianNoise(sigma=aug.noise, clip=True))
    ops.append(v2.Normalize(pre.mean, pre.std))
    if erasing > 0:
        ops.append(v2.RandomErasing(erasing, value=0))
    return v2.Compose(ops)


class BatchMix:
    """MixUp and/or CutMix on a batch (one of them at random when both are on), with probability p."""

    def __init__(self, aug: AugmentConfig, num_classes: int):
        mixers = []
        if aug.mixup > 0:
            mixers.append(v2.MixUp(alpha=aug.mixup, num_classes=num_classes))
        if aug.cutmix > 0:
            mixers.append(v2.CutMix(alpha=aug.cutmix, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)
        self.p = aug.mix_prob

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is None or torch.rand(()).item() >= self.p:
            return images, labels
        return self.mix(images, labels)
