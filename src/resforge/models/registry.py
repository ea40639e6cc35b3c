"""Model names -> builders, and `create_model` (timm's habit)."""

from __future__ import annotations

import difflib
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import CheckpointError, ConfigError
from .detection import DETECTOR_CLASSES
from .mobilenet import MobileNetV3
from .resnet import ResNet
from .segmentation import SEGMENTER_CLASSES

log = logging.getLogger("resforge")

Builder = Callable[..., nn.Module]
_BUILDERS: dict[str, Builder] = {}
_FAMILIES: dict[str, type[nn.Module]] = {}  # name -> the class its builder makes, which rebuilds it from its spec


def register_model(family: type[nn.Module]) -> Callable[[Builder], Builder]:
    """Register a builder under its function name; `family` is the class it builds, whose constructor takes
    the model's `spec()` back (so a saved model of that name is rebuilt without its builder)."""
    def add(fn: Builder) -> Builder:
        _BUILDERS[fn.__name__], _FAMILIES[fn.__name__] = fn, family
        return fn
    return add


@register_model(ResNet)
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18: basic blocks [2, 2, 2, 2]."""
    return ResNet("basic", (2, 2, 2, 2), **kwargs)


@register_model(ResNet)
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34: basic blocks [3, 4, 6, 3]."""
    return ResNet("basic", (3, 4, 6, 3), **kwargs)


@register_model(ResNet)
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50: bottleneck blocks [3, 4, 6, 3]."""
    return ResNet("bottleneck", (3, 4, 6, 3), **kwargs)


@register_model(ResNet)
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101: bottleneck blocks [3, 4, 23, 3]."""
    return ResNet("bottleneck", (3, 4, 23, 3), **kwargs)


@register_model(ResNet)
def resnet152(**kwargs: Any) -> ResNet:
    """ResNet-152: bottleneck blocks [3, 8, 36, 3]."""
    return ResNet("bottleneck", (3, 8, 36, 3), **kwargs)


@register_model(ResNet)
def wide_resnet50_2(**kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis): bottlenecks twice as wide inside."""
    return ResNet("bottleneck", (3, 4, 6, 3), base_width=128, **kwargs)


@register_model(ResNet)
def wide_resnet101_2(**kwargs: Any) -> ResNet:
    """Wide ResNet-101-2: bottlenecks twice as wide inside."""
    return ResNet("bottleneck", (3, 4, 23, 3), base_width=128, **kwargs)


@register_model(ResNet)
def resnext50_32x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al.): 32 groups of width 4 in each 3x3 conv."""
    return ResNet("bottleneck", (3, 4, 6, 3), groups=32, base_width=4, **kwargs)


@register_model(ResNet)
def resnext101_32x8d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d: 32 groups of width 8 in each 3x3 conv."""
    return ResNet("bottleneck", (3, 4, 23, 3), groups=32, base_width=8, **kwargs)


@register_model(MobileNetV3)
def mobilenet_v3_small(**kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Small (torchvision's): a small student to distil a ResNet into."""
    return MobileNetV3("small", **kwargs)


@register_model(MobileNetV3)
def mobilenet_v3_large(**kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Large (torchvision's): a student to distil a ResNet into."""
    return MobileNetV3("large", **kwargs)


# ResNet-D (deep stem, avg-pool shortcut) of each depth, named as timm names them.
for _depth in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    _d = functools.partial(_BUILDERS[_depth], variant="d")
    _d.__doc__ = f"{_BUILDERS[_depth].__doc__.split(':')[0]}-D: deep stem and avg-pool shortcut (Bag of Tricks)."
    _BUILDERS[f"{_depth}d"], _FAMILIES[f"{_depth}d"] = _d, ResNet


# Detectors and segmenters are built by their task over a registry backbone, and rebuilt from their spec here.
_FAMILIES.update(DETECTOR_CLASSES)
_FAMILIES.update(SEGMENTER_CLASSES)


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def describe_model(name: str) -> str:
    return (get_builder(name).__doc__ or "").strip().splitlines()[0]


def get_builder(name: str) -> Builder:
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, _BUILDERS, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint} (available: {', '.join(list_models())})")
    return _BUILDERS[name]


def create_model(name: str, *, pretrained: str | os.PathLike | None = None, num_classes: int = 1000,
                 sha256: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a model by name, optionally with weights from a path or URL.

    A checkpoint with another class count gets a fresh head; `in_chans` other than the
    checkpoint's folds the stem; a Keras checkpoint sets the v1 variant unless one is given.
    What was adapted is logged; anything else that does not fit raises `CheckpointError`.
    """
    builder = get_builder(name)
    state, hints = None, {}
    if pretrained is not None:
        from .weights import read_checkpoint

        state, hints = read_checkpoint(pretrained, sha256=sha256)
        if "variant" in hints and kwargs.setdefault("variant", hints["variant"]) != hints["variant"]:
            log.warning("%s holds %s-variant weights but variant=%s was asked for",
                        pretrained, hints["variant"], kwargs["variant"])
    model = builder(num_classes=num_classes, **kwargs)
    model.model_name = name
    if state is not None:
        from .weights import load_into

        for note in load_into(model, state, source=str(pretrained)):
            log.info(note)
        model.pretrained_cfg = {"source": str(pretrained), **hints.get("preprocess", {})}
    return model


def headless_resnet(name: str, options: dict[str, Any], role: str) -> ResNet:
    """The registry ResNet `name` without its classifier, as the backbone of a `role` (a detector, a segmenter):
    built from `ModelSpec` options, or rebuilt from the full spec a saved one recorded (pruned widths included)."""
    if "layers" in options:
        body = rebuild(name, {**options, "num_classes": 0}, f"the {name} backbone")
    else:
        body = create_model(name, num_classes=0, **options)
    if not isinstance(body, ResNet):
        raise ConfigError(f"{role}'s backbone is a ResNet, not {name}")
    return body


def rebuild(name: str | None, spec: dict[str, Any], source: str) -> nn.Module:
    """The network of registry name `name` (None: a ResNet built directly) from its `spec()`, freshly
    initialised; CheckpointError names what does not fit."""
    if name is not None and name not in _FAMILIES:
        raise CheckpointError(f"{source} holds a {name}, a model this resforge does not know "
                              f"(it knows {', '.join(list_models())}): update resforge")
    try:
        model = (ResNet if name is None else _FAMILIES[name])(**spec)
    except (TypeError, KeyError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{source} does not describe an architecture this resforge can build: {e}") from None
    model.model_name = name
    return model
