"""Parameters, MACs and output shapes per stage, counted on the model itself.

MACs come from torch's FlopCounterMode (convolutions and matrix products; one MAC = two FLOPs),
so a pruned or otherwise altered model is measured as it is, not looked up. A model built on the
meta device is summarised without allocating or computing anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .detection import Detector
from .segmentation import Segmenter



@dataclass
class StageRow:
    name: str
    output_shape: list[int]
    params: int
    macs: int


@dataclass
class ModelSummary:
    name: str
    img_size: int
    in_chans: int
    params: int
    trainable: int
    macs: int
    stages: list[StageRow] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{self.name} at {self.img_size}x{self.img_size}, {self.in_chans} input channel(s)",
                 f"{'stage':<8}{'output':>16}{'params':>14}{'MACs':>10}"]
        for r in self.stages:
            shape = "x".join(map(str, r.output_shape))
            lines.append(f"{r.name:<8}{shape:>16}{r.params:>14,}{_si(r.macs):>10}")
        lines.append(f"{'total':<8}{'':>16}{self.params:>14,}{_si(self.macs):>10}")
        lines.append(f"{self.params:,} parameters ({self.trainable:,} trainable), "
                     f"{self.macs / 1e9:.2f} GMACs per image")
        return "\n".join(lines)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def summarize(model: nn.Module, img_size: int = 224, name: str = "model") -> ModelSummary:
    """Count one image's cost, stage by stage, through the model's own parts (its stem and head methods; a
    detector's pyramid and heads, or a segmenter's head, as one stage, on an image of `img_size` square)."""
    p = next(model.parameters())
    x = torch.zeros(1, model.stem_conv.in_channels, img_size, img_size, device=p.device, dtype=p.dtype)
    parts = model.parts()
    if isinstance(model, (Detector, Segmenter)):
        image = x

        def whole(_: torch.Tensor) -> torch.Tensor:  # the whole network, less the backbone counted before
            if isinstance(model, Detector):
                return torch.tensor([len(model([image[0]])[0]["boxes"])])
            return model(image)["out"][0]
        stages: list[tuple[str, list[nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = [
            (part, modules, nn.Sequential(*modules) if part != "head" else whole) for part, modules in parts.items()]
    else:
        stages = [(part, modules, model.forward_stem if part == "stem" else model.forward_head if part == "head"
                   else nn.Sequential(*modules)) for part, modules in parts.items()]
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for stage_name, modules, fn in stages:
                with FlopCounterMode(display=False) as counter:
                    x = fn(x)
                macs = counter.get_total_flops() // 2
                if stage_name == "head" and isinstance(model, (Detector, Segmenter)):
                    macs -= sum(r.macs for r in rows)
                rows.append(StageRow(stage_name, list(x.shape[1:]), _params(*modules), macs))
    finally:
        model.train(was_training)
    return ModelSummary(
        name=name, img_size=img_size, in_chans=model.stem_conv.in_channels,
        params=_params(model), trainable=sum(q.numel() for q in model.parameters() if q.requires_grad),
        macs=sum(r.macs for r in rows), stages=rows)
