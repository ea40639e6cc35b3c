"""MobileNetV3 (Howard et al. 2019), torchvision's, as a small student to distil a ResNet into.

The module tree is torchvision's own (`features`, `avgpool`, `classifier`), so torchvision's
checkpoints load by their keys; around it are the names the rest of resforge asks a model for: the
stem (`conv1`, `bn1`, `act1`), four stages `layer1..layer4` ending at output strides 4..32, the
classifier `fc`, `spec()` and `transforms`. The ResNet options that have no meaning here are refused
rather than ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

SIZES = ("small", "large")
# The ResNet options a MobileNetV3 takes only at these values (it has its own activations, SE and init).
FIXED = {"act": "relu", "norm": "batchnorm", "se": False, "drop_path_rate": 0.0, "init": "he",
         "zero_init_residual": True, "variant": None}


class MobileNetV3(nn.Module):
    def __init__(self, size: str = "small", num_classes: int = 1000, in_chans: int = 3, width: float = 1.0,
                 small_input: bool = False, drop_rate: float = 0.2, **resnet_options: Any):
        from torchvision.models import mobilenet_v3_large, mobilenet_v3_small

        super().__init__()
        if size not in SIZES:
            raise ConfigError(f"MobileNetV3 comes in {' and '.join(SIZES)}, not {size!r}")
        unknown = [k for k in resnet_options if k not in FIXED]
        if unknown:
            raise TypeError(f"unexpected MobileNetV3 option(s): {', '.join(unknown)}")
        changed = [k for k, v in resnet_options.items() if v != FIXED[k]]
        if changed:
            raise ConfigError(f"mobilenet_v3_{size} has its own activations, squeeze-excitation, norms and "
                              f"initialisation: drop {', '.join(changed)}")
        build = mobilenet_v3_small if size == "small" else mobilenet_v3_large
        net = build(num_classes=max(num_classes, 1), width_mult=width, dropout=drop_rate)
        self.features, self.avgpool, self.classifier = net.features, net.avgpool, net.classifier
        stem = self.features[0][0]
        if in_chans != stem.in_channels or small_input:
            self.features[0][0] = nn.Conv2d(in_chans, stem.out_channels, 3, 1 if small_input else 2, 1, bias=False)
        if not num_classes:
            self.classifier[-1] = nn.Identity()
        self._kwargs = {"size": size, "width": width, "small_input": small_input, "drop_rate": drop_rate}
        self.model_name: str | None = None
        self.transforms: list[dict[str, Any]] = []
        self.pretrained_cfg: dict[str, Any] = {}
        strided = [i for i, block in enumerate(self.features) if i and _stride(block) == 2]
        starts = [1, *strided[1:4]]  # layer1 from the first block: the stride-2 blocks begin the others
        self._stages = list(zip(starts, [*starts[1:], len(self.features)]))
        self.feature_info = [{"name": f"layer{i + 1}", "channels": _out_channels(self.features[b - 1]),
                              "reduction": 2 ** (i + 2) // (2 if small_input else 1)}
                             for i, (_, b) in enumerate(self._stages)]
        self.num_features = self.classifier[0].in_features

    # the stem and the stages, under the names freezing, summaries and exports ask for
    @property
    def conv1(self) -> nn.Module:
        return self.features[0][0]

    @property
    def bn1(self) -> nn.Module:
        return self.features[0][1]

    @property
    def act1(self) -> nn.Module:
        return self.features[0][2]

    @property
    def stem_conv(self) -> nn.Conv2d:
        return self.features[0][0]

    def _stage(self, i: int) -> nn.Sequential:
        a, b = self._stages[i]
        return nn.Sequential(*self.features[a:b])

    layer1 = property(lambda self: self._stage(0))
    layer2 = property(lambda self: self._stage(1))
    layer3 = property(lambda self: self._stage(2))
    layer4 = property(lambda self: self._stage(3))

    @property
    def fc(self) -> nn.Module:
        return self.classifier[-1]

    @property
    def num_classes(self) -> int:
        return getattr(self.fc, "out_features", 0)

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
