"""Semantic segmenters over resforge's ResNets: torchvision's DeepLabV3 and FCN, and DeepLabV3+.

DeepLabV3 and FCN are torchvision's heads (`ASPP`, `FCNHead`) over the backbone's last map, wired as
`deeplabv3_resnet50` and `fcn_resnet50` wire theirs (the backbone's stride replaced by dilation, an optional
auxiliary FCN head on layer3), so their checkpoints load key for key and the outputs match. DeepLabV3+ (Chen et
al. 2018, "Encoder-Decoder with Atrous Separable Convolution") adds the paper's decoder: ASPP's output, upsampled
to C2's resolution, joined by C2 reduced to 48 channels, two 3x3 convolutions, then the classes. The backbone is
any registry ResNet; images come in normalised (as for classifiers); the logits come out at the input's size.
"""

from __future__ import annotations

import dataclasses
import typing
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead

from ..errors import ConfigError
from ..options import convert, option
from .resnet import BasicBlock, ResNet

SEGMENTERS = ("deeplabv3", "deeplabv3plus", "fcn")
OUTPUT_STRIDES = (8, 16, 32)
RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}  # ASPP's rates scale with the map's resolution
LOW_CHANNELS = 48  # DeepLabV3+'s reduced C2, the paper's choice


@dataclass
class SegmenterSpec:
    """A segmenter's options beside its backbone's (`ModelSpec`)."""

    output_stride: int = option(8, "the backbone's output stride: 8 (layer3 and layer4 dilated, torchvision's), 16 "
                                   "(layer4 only: about a third of the cost) or 32 (none)")
    aux: bool = option(False, "an auxiliary FCN head on layer3, trained with weight 0.5 as torchvision's reference "
                              "trains (--aux-loss); not used for predictions")
    head_channels: int = option(256, "deeplabv3, deeplabv3plus: channels of ASPP and the decoder", gt=0)


def checked_spec(**options: Any) -> SegmenterSpec:
    """The segmenter options of these keywords, converted and checked (a ConfigError names the option)."""
    spec = SegmenterSpec(**options)
    hints = typing.get_type_hints(SegmenterSpec)
    for f in dataclasses.fields(spec):
        setattr(spec, f.name, convert(f.name, hints[f.name], getattr(spec, f.name), f.metadata))
    if spec.output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, not "
                          f"{spec.output_stride}")
    return spec


def dilate(body: ResNet, output_stride: int) -> ResNet:
    """`body` with the strides of its last stages replaced by dilation, as torchvision's
    `replace_stride_with_dilation` builds it: the first block of a dilated stage keeps the dilation before it, the
    rest double it. The weights are untouched, so a classifier's load as they are. In a ResNet-D shortcut the
    2x2 average pool that strode goes (a 1x1 convolution follows it)."""
    stages = [info["name"] for info in body.feature_info]
    dilated = stages[len(stages) - {8: 2, 16: 1, 32: 0}[output_stride]:]
    dilation = 1
    for info in body.feature_info:
        if info["name"] not in dilated:
            continue
        previous, dilation = dilation, dilation * 2
        for j, block in enumerate(getattr(body, info["name"])):
            first = previous if j == 0 else dilation
            if isinstance(block, BasicBlock):
                pairs = [(block.conv1, first), (block.conv2, dilation)]
            else:
                pairs = [(block.conv2, first)]
            for conv, d in pairs:
                conv.dilation, conv.padding = (d, d), (d, d)
            for m in block.modules():
                if isinstance(m, nn.Conv2d):
                    m.stride = (1, 1)
            if block.downsample is not None and isinstance(block.downsample[0], nn.AvgPool2d):
                block.downsample[0] = nn.Identity()
        info["reduction"] = body.feature_info[stages.index(info["name"]) - 1]["reduction"]
    return body


class DeepLabV3PlusHead(nn.Module):
    """ASPP over C5, upsampled to C2's resolution and fused with it (the paper's decoder)."""

    def __init__(self, high_channels: int, low_channels: int, num_classes: int, rates: tuple[int, ...],
                 channels: int = 256):
        super().__init__()
        self.aspp = ASPP(high_channels, list(rates), channels)
        self.low = nn.Sequential(nn.Conv2d(low_channels, LOW_CHANNELS, 1, bias=False), nn.BatchNorm2d(LOW_CHANNELS),
                                 nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(channels + LOW_CHANNELS, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([x, self.low(low)], 1)))


def _deeplab_head(in_channels: int, num_classes: int, rates: tuple[int, ...], channels: int) -> nn.Sequential:
    """torchvision's `DeepLabHead` (same modules, same keys) at `channels` wide (torchvision's: 256)."""
    return nn.Sequential(ASPP(in_channels, list(rates), channels),
                         nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, num_classes, 1))


class Segmenter(nn.Module):
    """A backbone and a head that give per-pixel class logits at the input's size: `{"out": N x K x H x W}`, and
    `"aux"` beside it when the auxiliary head is on (torchvision's output)."""

    segmenter: ClassVar[str]

    def __init__(self, *, num_classes: int, backbone: str = "resnet50",
                 backbone_options: dict[str, Any] | None = None, **options: Any):
        """`backbone` is a registry name built with `backbone_options` (`ModelSpec`'s, or a pruned network's
        widths); `options` are `SegmenterSpec`'s."""
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"a segmenter tells at least two classes apart (the background counts), not "
                              f"{num_classes}")
        s = checked_spec(**options)
        from .registry import headless_resnet  # the registry registers the segmenters: imported here

        body = dilate(headless_resnet(backbone, dict(backbone_options or {}), "a segmenter"), s.output_stride)
        self.backbone = body
        channels = [info["channels"] for info in body.feature_info]
        rates = RATES[s.output_stride]
        if self.segmenter == "deeplabv3":
            self.classifier: nn.Module = _deeplab_head(channels[3], num_classes, rates, s.head_channels)
        elif self.segmenter == "deeplabv3plus":
            self.classifier = DeepLabV3PlusHead(channels[3], channels[0], num_classes, rates, s.head_channels)
        else:
            self.classifier = FCNHead(channels[3], num_classes)
        self.aux_classifier = FCNHead(channels[2], num_classes) if s.aux else None
        self._spec = {"num_classes": num_classes, "backbone": backbone, **dataclasses.asdict(s)}
        self.model_name, self.transforms = self.segmenter, []
        self.pretrained_cfg: dict[str, Any] = {}  # where starting weights came from, as create_model records it

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._run(x, aux=self.aux_classifier is not None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The class logits alone: what predictions use (the auxiliary head's layer3 pass is skipped)."""
        return self._run(x, aux=False)["out"]

    def _run(self, x: torch.Tensor, aux: bool) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        read = {3} | ({0} if self.segmenter == "deeplabv3plus" else set()) | ({2} if aux else set())
        maps = {}
        x = self.backbone.forward_stem(x)
        for i, info in enumerate(self.backbone.feature_info):  # only the maps the heads read are kept alive
            x = getattr(self.backbone, info["name"])(x)
            if i in read:
                maps[i] = x
        logits = self.classifier(maps[3], maps[0]) if self.segmenter == "deeplabv3plus" else self.classifier(maps[3])
        out = OrderedDict(out=F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
        if aux:
            out["aux"] = F.interpolate(self.aux_classifier(maps[2]), size=size, mode="bilinear", align_corners=False)
        return out

    def spec(self) -> dict[str, Any]:
        options = self.backbone.spec()  # the widths as they are now (pruned, say)
        options.pop("num_classes")
        return {**self._spec, "backbone_options": options}

    @property
    def num_classes(self) -> int:
        return self._spec["num_classes"]

    @property
    def body(self) -> ResNet:
        return self.backbone

    @property
    def stem_conv(self) -> nn.Conv2d:
        return self.backbone.stem_conv

    def class_layers(self) -> list[nn.Module]:
        """The layers whose shapes follow the class count: fresh when weights for other classes are loaded."""
        head = self.classifier.classifier if isinstance(self.classifier, DeepLabV3PlusHead) else self.classifier[-1]
        return [head] + ([self.aux_classifier[-1]] if self.aux_classifier is not None else [])

    def parts(self) -> dict[str, list[nn.Module]]:
        stages = self.backbone.parts()
        stages.pop("head")
        return {**stages, "head": [self.classifier] + ([self.aux_classifier] if self.aux_classifier else [])}


class DeepLabV3(Segmenter):
    segmenter = "deeplabv3"


class DeepLabV3Plus(Segmenter):
    segmenter = "deeplabv3plus"


class FCN(Segmenter):
    segmenter = "fcn"


SEGMENTER_CLASSES: dict[str, type[Segmenter]] = {c.segmenter: c for c in (DeepLabV3, DeepLabV3Plus, FCN)}


class SegmenterLogits(nn.Module):
    """A segmenter as runners and exporters take a network: a batch in, its class logits out (the auxiliary
    head, for training only, is left out)."""

    def __init__(self, segmenter: Segmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter.logits(x)
