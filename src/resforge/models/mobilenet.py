"""MobileNetV3 (Howard et al. 2019), torchvision's, as a small student to distil a ResNet into.

The module tree is torchvision's own (`features`, `avgpool`, `classifier`), so torchvision's
checkpoints load by their keys. It answers what the rest of resforge asks a model: its parts (the
stem, four stages `layer1..layer4` ending at output strides 4..32, the head), its classifier,
`spec()` and `transforms`. The options of `ModelSpec` it has no use for (it has its own activations,
squeeze-excitation, norms and initialisation) are refused unless left at their defaults.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .spec import ModelSpec, checked

SIZES = ("small", "large")
OPTIONS = ("width", "small_input", "drop_rate")  # the ModelSpec options it takes
DEFAULTS = {"drop_rate": 0.2}  # torchvision's, where they are not ModelSpec's


class MobileNetV3(nn.Module):
    def __init__(self, size: str = "small", num_classes: int = 1000, in_chans: int = 3, **options: Any):
        from torchvision.models import mobilenet_v3_large, mobilenet_v3_small

        super().__init__()
        if size not in SIZES:
            raise ConfigError(f"MobileNetV3 comes in {' and '.join(SIZES)}, not {size!r}")
        spec, unset = checked(**{**DEFAULTS, **options}), ModelSpec()
        changed = [k for k in options if k not in OPTIONS and getattr(spec, k) != getattr(unset, k)]
        if changed:
            raise ConfigError(f"mobilenet_v3_{size} has its own activations, squeeze-excitation, norms and "
                              f"initialisation: drop {', '.join(changed)}")
        build = mobilenet_v3_small if size == "small" else mobilenet_v3_large
        net = build(num_classes=max(num_classes, 1), width_mult=spec.width, dropout=spec.drop_rate)
        self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier
        stem = self.features[0][0]
        if in_chans != stem.in_channels or spec.small_input:
            stride = 1 if spec.small_input else 2
            self.features[0][0] = nn.Conv2d(in_chans, stem.out_channels, 3, stride, 1, bias=False)
        if not num_classes:
            self.classifier[-1] = nn.Identity()
        self._kwargs = {"size": size, **{k: getattr(spec, k) for k in OPTIONS}}
        self.model_name: str | None = None
        self.transforms: list[dict[str, Any]] = []
        self.pretrained_cfg: dict[str, Any] = {}
        strided = [i for i, block in enumerate(self.features) if i and _stride(block) == 2]
        starts = [1, *strided[1:4]]  # layer1 from the first block: the stride-2 blocks begin the others
        self._stages = list(zip(starts, [*starts[1:], len(self.features)]))
        self.feature_info = [{"name": f"layer{i + 1}", "channels": _out_channels(self.features[b - 1]),
                              "reduction": 2 ** (i + 2) // (2 if spec.small_input else 1)}
                             for i, (_, b) in enumerate(self._stages)]
        self.num_features = self.classifier[0].in_features

    @property
    def stem_conv(self) -> nn.Conv2d:
        return self.features[0][0]

    def parts(self) -> dict[str, list[nn.Module]]:
        """The stem, the four stages and the head, in order (what freezing, learning rates and summaries
        name)."""
        stages = {f"layer{i + 1}": list(self.features[a:b]) for i, (a, b) in enumerate(self._stages)}
        return {"stem": [self.features[0]], **stages, "head": [self.avgpool, self.classifier]}

    def get_classifier(self) -> nn.Module:
        """The layer whose outputs are the classes (timm's name)."""
        return self.classifier[-1]

    @property
    def num_classes(self) -> int:
        return getattr(self.get_classifier(), "out_features", 0)

    def reset_classifier(self, num_classes: int) -> None:
        hidden = self.classifier[0].out_features
        self.classifier[-1] = nn.Linear(hidden, num_classes) if num_classes else nn.Identity()

    def spec(self) -> dict[str, Any]:
        return {**self._kwargs, "num_classes": self.num_classes, "in_chans": self.stem_conv.in_channels}

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[0](x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _stride(block: nn.Module) -> int:
    return max((m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d)), default=1)


def _out_channels(block: nn.Module) -> int:
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
