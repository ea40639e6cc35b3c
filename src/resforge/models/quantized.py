"""The structure of a network trained for int8 (quantisation-aware training), so it rebuilds from its record.

Two transforms, applied in order:
  - "fused": each batch norm folded into the convolution before it (the convolution gains a bias,
    the norm becomes an Identity): what an int8 engine runs, so training sees the same weights;
  - "fakequant": every convolution and linear layer rounds its weights to int8 per output channel
    (symmetric, scale max|w|/127: what onnxruntime computes from the exported weights), and the
    network input and every ReLU output round to uint8 on a learned scale (LSQ, Esser et al. 2020),
    the tensors onnxruntime quantises on their own in a ResNet (max-pooling and flattening keep
    their input's scale).

Rounding passes gradients straight through; the learned scales are parameters, saved with the
weights, and `compress.qat` hands them to the int8 exporter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .layers import parent_of, replace_layer

U8 = (0, 255)
S8 = 127  # symmetric int8 weights: -127..127, as onnxruntime quantises them


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass; its gradient times `factor` (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 rounding of a weight."""
    scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / S8
    scale = scale.view(-1, *([1] * (w.dim() - 1)))
    return _round_ste(w / scale).clamp(-S8, S8) * scale


class ActivationQuant(nn.Module):
    """uint8 rounding of a tensor on a learned scale; the zero point is fixed when the range is first set."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))

    def set_range(self, low: float, high: float) -> None:
        """Scale and zero point of onnxruntime's asymmetric uint8 for the range [low, high] (which holds 0)."""
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / (U8[1] - U8[0]) or 1.0
        with torch.no_grad():
            self.scale.fill_(scale)
            self.zero_point.fill_(round(U8[0] - low / scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = _grad_scale(self.scale, 1 / math.sqrt(x[0].numel() * U8[1])).abs().clamp_min(1e-12)
        q = (_round_ste(x.float() / scale) + self.zero_point).clamp(*U8)
        return ((q - self.zero_point) * scale).to(x.dtype)


class QuantReLU(nn.ReLU):
    """A ReLU whose output is rounded to uint8 (`quant`)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = ActivationQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(F.relu(x))


class QConv2d(nn.Conv2d):
    """A convolution on int8-rounded weights; the first one of the network also rounds its input."""

    input_quant: ActivationQuant | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self._conv_forward(x, fake_quant_weight(self.weight), self.bias)


class QLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant_weight(self.weight), self.bias)


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(convolution, batch norm) names where the norm reads the convolution's output directly."""
    names = {m: n for n, m in model.named_modules()}
    outputs: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            outputs[id(out)] = names[module]
        elif isinstance(module, nn.BatchNorm2d) and id(args[0]) in outputs:
            pairs.append((outputs[id(args[0])], names[module]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return pairs


def apply_fused(model: nn.Module, pairs: list[list[str]], weights: bool = True) -> None:
    """Fold each named batch norm into its convolution (with `weights`: their values too; else only the shape)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    for conv_name, bn_name in pairs:
        (cp, ca), (bp, ba) = parent_of(model, conv_name), parent_of(model, bn_name)
        conv, bn = getattr(cp, ca), getattr(bp, ba)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, (nn.BatchNorm2d, nn.Identity)):
            raise CheckpointError(f"{conv_name} and {bn_name} are not a convolution and its batch norm")
        if weights:
            w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                        bn.bias)
            conv.weight, conv.bias = nn.Parameter(w.detach()), nn.Parameter(b.detach())
        elif conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        setattr(bp, ba, nn.Identity())


def apply_fake_quant(model: nn.Module, input_conv: str) -> None:
    """Swap convolutions, linear layers and ReLUs for their int8-rounding forms (same parameter names)."""
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if type(module) is nn.Conv2d:
            new: nn.Module = QConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                     module.padding, module.dilation, module.groups, module.bias is not None,
                                     module.padding_mode)
            new.input_quant = ActivationQuant() if name == input_conv else None
        elif type(module) is nn.Linear:
            new = QLinear(module.in_features, module.out_features, module.bias is not None)
        elif type(module) is nn.ReLU:
            new = QuantReLU()
        else:
            continue
        new.load_state_dict(module.state_dict(), strict=False)
        replace_layer(model, name, new)


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuant]:
    """The learned uint8 quantisers by the name of the module whose tensor they round (the first
    convolution's: the network input)."""
    found = {n: m.input_quant for n, m in model.named_modules()
             if isinstance(m, QConv2d) and m.input_quant is not None}
    found.update({n: m.quant for n, m in model.named_modules() if isinstance(m, QuantReLU)})
    return found
