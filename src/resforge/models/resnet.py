"""The ResNet family of He et al. (2015), "Deep Residual Learning for Image Recognition".

One generic `ResNet` class; depths, widths and tricks are keyword arguments, never copies of it.
Module names follow torchvision (`conv1`, `bn1`, `layer1..4`, `downsample`, `fc`) and timm
(`act1`, `se.fc1`, the ResNet-D `conv1.0/1/3/4/6` stem and `downsample.1/2`), so checkpoints from
either load without a key mapping.

Variants (the `variant` argument):
  - "v1.5" (default, torchvision/timm): the stride of a bottleneck sits on its 3x3 conv;
  - "v1" (the paper, Caffe, Keras): the stride sits on the first 1x1 conv;
  - "d" (Bag of Tricks, He et al. 2019): three-conv deep stem and avg-pool shortcut.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.ops import SqueezeExcitation, StochasticDepth

from ..errors import ConfigError
from .spec import ACTIVATIONS, VARIANTS, checked

BLOCKS = ("basic", "bottleneck")


def _make_norm(kind: str) -> Callable[[int], nn.Module]:
    if kind == "groupnorm":
        # 32 groups as in Wu & He (2018), fewer when a (narrow or pruned) layer has fewer channels.
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    return nn.BatchNorm2d


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


def _round_channels(c: float) -> int:
    """Round a scaled channel count to a multiple of 8 (at least 8), as width multipliers do."""
    return max(8, int(c + 4) // 8 * 8)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, mid: Sequence[int], cout: int, stride: int, downsample: nn.Module | None,
                 groups: int, stride_in_1x1: bool, act: Callable[[], nn.Module],
                 norm: Callable[[int], nn.Module], se: int, drop_path: float):
        super().__init__()
        (w,) = mid
        self.conv1 = _conv3x3(cin, w, stride)
        self.bn1 = norm(w)
        self.act1 = act()
        self.conv2 = _conv3x3(w, cout)
        self.bn2 = norm(cout)
        self.se = SqueezeExcitation(cout, se) if se else None  # se: the squeeze width (0: none)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.downsample = downsample
        self.act2 = act()

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    @property
    def last_conv(self) -> nn.Module:
        return self.conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:
            out = self.se(out)
        return self.act2(self.drop_path(out) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, cin: int, mid: Sequence[int], cout: int, stride: int, downsample: nn.Module | None,
                 groups: int, stride_in_1x1: bool, act: Callable[[], nn.Module],
                 norm: Callable[[int], nn.Module], se: int, drop_path: float):
        super().__init__()
        w1, w2 = mid
        self.conv1 = _conv1x1(cin, w1, stride if stride_in_1x1 else 1)
        self.bn1 = norm(w1)
        self.act1 = act()
        self.conv2 = _conv3x3(w1, w2, 1 if stride_in_1x1 else stride, groups)
        self.bn2 = norm(w2)
        self.act2 = act()
        self.conv3 = _conv1x1(w2, cout)
        self.bn3 = norm(cout)
        self.se = SqueezeExcitation(cout, se) if se else None  # se: the squeeze width (0: none)
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()
        self.downsample = downsample
        self.act3 = act()

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    @property
    def last_conv(self) -> nn.Module:
        return self.conv3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.se is not None:
            out = self.se(out)
        return self.act3(self.drop_path(out) + shortcut)


def _se_channels(c: int) -> int:
    """Squeeze width: 1/16 of the channels (Hu et al. 2018), rounded to 8."""
    return _round_channels(c / 16)


def derived_widths(kw: dict[str, Any], stem_width: int | None = None,
                   stage_widths: Sequence[int] | None = None) -> dict[str, Any]:
    """The widths an unpruned network derives from its options (`kw` as `ResNet.spec()` gives them).

    A given stem or stage width is taken as the base of what follows from it (the deep stem's
    inner width, SE squeeze widths, which blocks need a projection), as in a network built so.
    """
    block, layers, width = kw["block"], kw["layers"], kw["width"]
    expansion = 4 if block == "bottleneck" else 1
    planes = [_round_channels(64 * 2**i * width) for i in range(len(layers))]
    stem = stem_width or _round_channels(64 * width)
    stages = list(stage_widths or [p * expansion for p in planes])
    inner, projections, cin = [], [], stem
    for i, (p, n) in enumerate(zip(planes, layers)):
        w = max(1, int(p * kw["base_width"] / 64)) * kw["groups"]  # at least one channel per group
        inner.append([[w, w] if block == "bottleneck" else [p] for _ in range(n)])
        projections.append([j == 0 and (i > 0 or cin != stages[i]) for j in range(n)])
        cin = stages[i]
    return {"stem_width": stem, "stage_widths": stages, "inner_widths": inner, "projections": projections,
            "deep_stem_widths": [stem // 2, stem // 2],
            "se_widths": [[_se_channels(c)] * n for c, n in zip(stages, layers)]}


class ResNet(nn.Module):
    """A residual network; see the module docstring for the variants.

    `stem_width`, `stage_widths` and `inner_widths` override the widths derived from
    `width`/`groups`/`base_width`: a pruned network is rebuilt from them.
    """

    def __init__(self, block: str = "bottleneck", layers: Sequence[int] = (3, 4, 6, 3), *,
                 num_classes: int = 1000, in_chans: int = 3, groups: int = 1, base_width: int = 64,
                 stem_width: int | None = None, stage_widths: Sequence[int] | None = None,
                 inner_widths: Sequence[Sequence[Sequence[int]]] | None = None,
                 deep_stem_widths: Sequence[int] | None = None, se_widths: Sequence[Sequence[int]] | None = None,
                 projections: Sequence[Sequence[bool]] | None = None, **options: Any):
        """`options`: the fields of `models.spec.ModelSpec` (variant, width, act, ...)."""
        super().__init__()
        if block not in BLOCKS:
            raise ConfigError(f"unknown block {block!r}; choose one of: {', '.join(BLOCKS)}")
        self.options = checked(**options)
        self.options.variant = self.options.variant or VARIANTS[0]
        o = self.options
        if len(layers) != 4 or min(layers) < 1:
            raise ConfigError(f"layers must be four positive block counts, got {list(layers)}")
        if block == "basic" and (groups != 1 or base_width != 64):
            raise ConfigError("basic blocks support only groups=1 and base_width=64")
        if in_chans < 1 or num_classes < 0:
            raise ConfigError("in_chans must be positive and num_classes non-negative")
        self._blocks = dict(block=block, layers=list(layers), groups=groups, base_width=base_width)

        if stage_widths is not None and len(stage_widths) != len(layers):
            raise ConfigError(f"stage_widths do not match the {len(layers)} stages in layers")
        derived = derived_widths(self._keywords(), stem_width, stage_widths)
        stem_width = stem_width or derived["stem_width"]
        stage_widths = list(stage_widths or derived["stage_widths"])
        inner_widths = [[list(w) for w in stage] for stage in (inner_widths or derived["inner_widths"])]
        deep_stem_widths = list(deep_stem_widths or derived["deep_stem_widths"])
        se_widths = [list(s) for s in (se_widths or derived["se_widths"])]
        projections = [list(s) for s in (projections or derived["projections"])]
        if any([len(s) for s in table] != list(layers) for table in (inner_widths, se_widths, projections)):
            raise ConfigError("stage_widths/inner_widths/se_widths/projections do not match the blocks in layers")

        actf, normf = ACTIVATIONS[o.act], _make_norm(o.norm)
        block_cls = Bottleneck if block == "bottleneck" else BasicBlock
        small_input, variant = o.small_input, o.variant
        stem_stride = 1 if small_input else 2
        if variant == "d":
            c1, c2 = deep_stem_widths
            self.conv1 = nn.Sequential(
                _conv3x3(in_chans, c1, stem_stride), normf(c1), actf(),
                _conv3x3(c1, c2), normf(c2), actf(),
                _conv3x3(c2, stem_width))
        elif small_input:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, 2, 3, bias=False)
        self.bn1 = normf(stem_width)
        self.act1 = actf()
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)

        n_blocks, idx, cin = sum(layers), 0, stem_width
        self.feature_info: list[dict[str, Any]] = []
        reduction = 1 if small_input else 4
        for i, (n, cout) in enumerate(zip(layers, stage_widths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                downsample = self._shortcut(cin, cout, s, variant == "d", normf) if projections[i][j] else None
                dp = o.drop_path_rate * idx / max(n_blocks - 1, 1)
                blocks.append(block_cls(cin, inner_widths[i][j], cout, s, downsample, groups,
                                        variant == "v1", actf, normf, se_widths[i][j] if o.se else 0, dp))
                cin, idx = cout, idx + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append({"name": f"layer{i + 1}", "channels": cout, "reduction": reduction})

        self.num_features = cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(o.drop_rate)
        self.fc: nn.Module = nn.Linear(cin, num_classes) if num_classes else nn.Identity()
        self.model_name: str | None = None  # the registry name, when built by create_model
        self.transforms: list[dict[str, Any]] = []  # what was done to it since (pruned, ...), for its sidecar
        # Where pretrained weights came from and the input normalisation they expect (timm's habit).
        self.pretrained_cfg: dict[str, Any] = {}
        self._init_weights(o.init, o.zero_init_residual)

    @staticmethod
    def _shortcut(cin: int, cout: int, stride: int, avg_down: bool, normf: Callable[[int], nn.Module]) -> nn.Module:
        if avg_down:
            pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
                    if stride > 1 else nn.Identity())
            return nn.Sequential(pool, _conv1x1(cin, cout), normf(cout))
        return nn.Sequential(_conv1x1(cin, cout, stride), normf(cout))

    def _init_weights(self, init: str, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "he":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as the identity (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm.weight)

    @property
    def num_classes(self) -> int:
        return getattr(self.fc, "out_features", 0)  # a Linear, or its low-rank factors

    @property
    def stem_conv(self) -> nn.Conv2d:
        """The first convolution: the one whose input channels follow `in_chans`."""
        return self.conv1[0] if isinstance(self.conv1, nn.Sequential) else self.conv1

    def parts(self) -> dict[str, list[nn.Module]]:
        """The stem, the four stages and the head, in order (what freezing, learning rates and summaries
        name)."""
        stages = {info["name"]: [getattr(self, info["name"])] for info in self.feature_info}
        return {"stem": [self.conv1, self.bn1, self.act1, self.maxpool], **stages,
                "head": [self.avgpool, self.drop, self.fc]}

    def get_classifier(self) -> nn.Module:
        """The layer whose outputs are the classes (timm's name)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised head; 0 leaves pooled features as the output."""
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def _keywords(self) -> dict[str, Any]:
        """The block structure and the options, as keywords of the constructor."""
        return {**self._blocks, **dataclasses.asdict(self.options)}

    def spec(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this exact architecture: the options, and every width that
        differs from what they derive (as pruning leaves them)."""
        kw = dict(self._keywords(), num_classes=self.num_classes, in_chans=self.stem_conv.in_channels)
        stages = [getattr(self, f"layer{i + 1}") for i in range(len(kw["layers"]))]
        stem = self.conv1[-1] if isinstance(self.conv1, nn.Sequential) else self.conv1
        live = {"stem_width": stem.out_channels,  # convolutions, not norms: int8 training folds the norms away
                "stage_widths": [stage[-1].last_conv.out_channels for stage in stages],
                "inner_widths": [[[b.conv1.out_channels] if isinstance(b, BasicBlock)
                                  else [b.conv1.out_channels, b.conv2.out_channels] for b in stage]
                                 for stage in stages],
                "projections": [[b.downsample is not None for b in stage] for stage in stages]}
        if kw["variant"] == "d":
            live["deep_stem_widths"] = [self.conv1[0].out_channels, self.conv1[3].out_channels]
        if kw["se"]:
            live["se_widths"] = [[b.se.fc1.out_channels for b in stage] for stage in stages]
        base = derived_widths(kw)
        derived = derived_widths(kw, live["stem_width"], live["stage_widths"])
        for key, value in live.items():  # stem and stage widths against the options, the rest against them
            if value != (base if key in ("stem_width", "stage_widths") else derived)[key]:
                kw[key] = value
        return kw

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The C2..C5 maps (outputs of layer1..layer4), for detection and segmentation heads."""
        x = self.forward_stem(x)
        maps = []
        for info in self.feature_info:
            x = getattr(self, info["name"])(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (C5), before pooling."""
        x = self.forward_stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        x = self.drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
