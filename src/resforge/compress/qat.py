"""Quantisation-aware training: fine-tune the network as the int8 engine will run it, then export it
with the scales it learned.

The route: batch norms are folded into their convolutions first (the int8 graph has none), then the
network trains with int8-rounded weights and uint8-rounded activations (`models.quantized`), the
activation scales learned. The export is the plain fp32 graph of the trained weights, quantised by
onnxruntime's `quantize_static` with the learned scale and zero point of every quantised tensor given
as `TensorQuantOverrides`; the weight scales need none, since onnxruntime computes per channel the
same max|w|/127 that training rounded with. We take this route because the alternatives are closed:
`torch.ao.quantization` is deprecated, and the dynamo ONNX exporter fails on FakeQuantize
(pytorch#167063). What training does not round (the residual branch's output before the add, the
pooled features) onnxruntime calibrates as in post-training quantisation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..models import transforms
from ..models.layers import replace_layer
from ..models.quantized import (QConv2d, QLinear, QuantReLU, activation_quantizers, apply_fake_quant, apply_fused,
                                conv_bn_pairs)

INIT_BATCHES = 8  # training batches whose ranges set the activation scales before training learns them


def check_model(model: nn.Module) -> None:
    transforms.check(model, "fused")
    acts = {type(m).__name__ for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU,
                                                                          nn.SiLU, nn.GELU, nn.Mish, nn.Hardswish))}
    if acts - {"ReLU"}:
        raise ConfigError(f"quantisation-aware training maps its learned scales onto ReLU outputs; this model uses "
                          f"{', '.join(sorted(acts - {'ReLU'}))}: quantise it after training (without --qat)")
    if any(isinstance(m, nn.GroupNorm) for m in model.modules()):
        raise ConfigError("quantisation-aware training folds batch norms into the convolutions; this model has "
                          "group norms, which no int8 engine folds: quantise it after training (without --qat)")


def prepare(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Fold the batch norms and make `model` round to int8 in place, its activation scales set from the
    ranges `batches` reach; the two transforms are recorded on the model."""
    check_model(model)
    batches = list(batches)
    if not batches:
        raise ConfigError("quantisation-aware training needs training images to set its first scales")
    was_training = model.training
    pairs = [list(p) for p in conv_bn_pairs(model, batches[0][:1])]
    apply_fused(model, pairs)
    input_conv = next(n for n, m in model.named_modules() if m is model.stem_conv)
    ranges = _ranges(model, input_conv, batches)
    apply_fake_quant(model, input_conv)
    for name, quant in activation_quantizers(model).items():
        quant.set_range(*ranges[name])
    transforms.record(model, {"kind": "fused", "pairs": pairs})
    transforms.record(model, {"kind": "fakequant", "input_conv": input_conv})
    model.train(was_training)
    return {"kind": "qat", "folded": len(pairs), "learned_scales": len(ranges)}


def _ranges(model: nn.Module, input_conv: str, batches: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """(min, max) of the network input and of every ReLU output over `batches`."""
    ranges: dict[str, tuple[float, float]] = {}

    def track(name: str, t: torch.Tensor) -> None:
        low, high = float(t.min()), float(t.max())
        old = ranges.get(name, (low, high))
        ranges[name] = (min(old[0], low), max(old[1], high))

    handles = []
    for name, m in model.named_modules():
        if name == input_conv:
            handles.append(m.register_forward_pre_hook(lambda _m, args, n=name: track(n, args[0])))
        elif type(m) is nn.ReLU:
            handles.append(m.register_forward_hook(lambda _m, _a, out, n=name: track(n, out)))
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return ranges


def transform(batches: int = INIT_BATCHES) -> Callable[[Any], dict[str, Any]]:
    """The transform of a compression run that prepares the trainer's model for QAT (first scales from
    the first training batches, as the evaluation preprocessing leaves them)."""
    def apply(trainer: Any) -> dict[str, Any]:
        check_model(trainer.model)
        images = [trainer.stepper.prepare_batch(x, y)[0] for (x, y), _ in zip(trainer.train_loader, range(batches))]
        return prepare(trainer.model, images)
    return apply


def plain(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[float, int]]]:
    """The fp32 network the int8 engine is given (no rounding), and the learned (scale, zero point) of
    each rounded tensor by the name of the ReLU whose output it is ("": the network input)."""
    inputs = {n for n, m in model.named_modules() if isinstance(m, QConv2d) and m.input_quant is not None}
    learned = {"" if name in inputs else name: (float(q.scale.detach().abs()), int(q.zero_point))
               for name, q in activation_quantizers(model).items()}
    net = copy.deepcopy(model).cpu().float().eval()
    for name, module in list(net.named_modules()):
        if isinstance(module, QConv2d):
            new: nn.Module = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                       module.padding, module.dilation, module.groups, module.bias is not None,
                                       module.padding_mode)
        elif isinstance(module, QLinear):
            new = nn.Linear(module.in_features, module.out_features, module.bias is not None)
        elif isinstance(module, QuantReLU):
            new = nn.ReLU()
        else:
            continue
        new.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith(("quant.",
                                                                                              "input_quant."))})
        replace_layer(net, name, new)
    net.transforms = [t for t in net.transforms if t.get("kind") != "fakequant"]
    return net, learned


def overrides(proto: Any, net: nn.Module, learned: dict[str, tuple[float, int]], input_name: str,
              example: torch.Tensor) -> dict[str, list[dict[str, np.ndarray]]]:
    """onnxruntime's TensorQuantOverrides: the learned scales keyed by the exported graph's tensor names.

    The ReLUs of the graph are the network's in the order they run (the exporter traces the forward
    pass); the input convolution's tensor is the graph input."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda _m, _a, _o, n=n: order.append(n))
               for n, m in net.named_modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for h in handles:
            h.remove()
    relus = [n.output[0] for n in proto.graph.node if n.op_type == "Relu"]
    if len(relus) != len(order):
        raise ConfigError(f"the exported graph has {len(relus)} ReLUs where the network ran {len(order)}: the learned "
                          "scales cannot be placed")
    names = {"": input_name, **dict(zip(order, relus))}
    out = {}
    for module, (scale, zero_point) in learned.items():
        if module not in names:
            raise ConfigError(f"the learned scale of {module} has no tensor in the exported graph")
        out[names[module]] = [{"scale": np.array(scale, np.float32), "zero_point": np.array(zero_point, np.uint8)}]
    return out
