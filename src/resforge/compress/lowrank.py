"""Low-rank factorisation: the classifier and 1x1 convolutions by truncated SVD, 3x3 convolutions by
Tucker-2 (HOSVD of the output and input modes; Kim et al. 2016), each at the smallest rank that
keeps `energy` of its squared singular values, and only where the factors cost fewer MACs than the
layer. The factorised network is an ordinary module tree (`models.lowrank`), recorded in the spec's
transforms, so it saves as safetensors and rebuilds from its sidecar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models import transforms
from ..models.layers import replace_layer
from ..models.lowrank import LowRankConv, LowRankLinear, factorized
from ..models.summary import summarize
from .latency import least_change_within, onnxruntime_latency

ENERGY = 0.9  # the share of each layer's energy low-rank keeps unless told otherwise (lowrank, optimize)
ENERGIES = tuple(round(0.99 - 0.01 * i, 2) for i in range(50))  # what a latency target searches, least change first


def energy_rank(singular: torch.Tensor, energy: float) -> int:
    """The fewest leading singular values whose squares hold `energy` of the total."""
    share = (singular ** 2).cumsum(0) / (singular ** 2).sum()
    return int((share < energy).sum()) + 1


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(matrix.double(), full_matrices=False)


def _factor_1x1(layer: nn.Module, weight: torch.Tensor, energy: float) -> nn.Module | None:
    """W (out x in) ~ (U S^1/2)(S^1/2 V^T): two layers through rank r."""
    out_c, in_c = weight.shape[:2]
    u, s, vh = _svd(weight.reshape(out_c, -1))
    r = energy_rank(s, energy)
    if r * (out_c + weight[0].numel()) >= weight.numel():  # no saving at this rank
        return None
    root = s[:r].sqrt()
    first, second = (vh[:r] * root[:, None]), (u[:, :r] * root)
    new = factorized(layer, [r])
    with torch.no_grad():
        new[0].weight.copy_(first.reshape(new[0].weight.shape).float())
        new[1].weight.copy_(second.reshape(new[1].weight.shape).float())
        if layer.bias is not None:
            new[1].bias.copy_(layer.bias)
    return new


def _tucker2(conv: nn.Conv2d, energy: float) -> nn.Module | None:
    """W (out x in x k x k) ~ core x_0 U_out x_1 U_in: 1x1 in -> r_in, kxk r_in -> r_out, 1x1 r_out -> out."""
    w = conv.weight.detach().double()
    out_c, in_c, kh, kw = w.shape
    u_out, s_out, _ = torch.linalg.svd(w.reshape(out_c, -1), full_matrices=False)
    u_in, s_in, _ = torch.linalg.svd(w.transpose(0, 1).reshape(in_c, -1), full_matrices=False)
    r_out, r_in = energy_rank(s_out, energy), energy_rank(s_in, energy)
    if in_c * r_in + r_in * r_out * kh * kw + r_out * out_c >= w.numel():
        return None
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)  # (r_out, r_in, k, k)
    new = factorized(conv, [r_in, r_out])
    with torch.no_grad():
        new[0].weight.copy_(u_in.T.reshape(r_in, in_c, 1, 1).float())
        new[1].weight.copy_(core.float())
        new[2].weight.copy_(u_out.reshape(out_c, r_out, 1, 1).float())
        if conv.bias is not None:
            new[2].bias.copy_(conv.bias)
    return new


def check_target(energy: float | None, latency: float | None) -> None:
    if energy is not None and latency is not None:
        raise ConfigError("give one low-rank target: --energy (share of each layer's energy kept) or --latency "
                          "(milliseconds at batch 1, measured here)")
    if energy is not None and not 0 < energy < 1:
        raise ConfigError(f"--energy must lie between 0 and 1 (exclusive), got {energy:g}")
    if latency is not None and not latency > 0:
        raise ConfigError(f"--latency is milliseconds at batch 1 and must be positive, got {latency:g}")


def _replace_layers(model: nn.Module, energy: float) -> dict[str, list[int]]:
    """Replace every layer that gains by its low-rank factors at `energy`, in place; return their ranks."""
    ranks: dict[str, list[int]] = {}
    for name, layer in list(model.named_modules()):
        if ".se." in f".{name}." or isinstance(layer, (LowRankConv, LowRankLinear)):
            continue  # squeeze-excitation layers are tiny; a factor is not factorised again
        new = None
        if isinstance(layer, nn.Linear):
            new = _factor_1x1(layer, layer.weight.detach(), energy)
        elif isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.in_channels > 3:
            new = (_factor_1x1(layer, layer.weight.detach(), energy) if layer.kernel_size == (1, 1)
                   else _tucker2(layer, energy))
        if new is not None:
            replace_layer(model, name, new)
            ranks[name] = new.ranks
    return ranks


def factorize_model(model: nn.Module, img_size: int, energy: float) -> dict[str, Any]:
    """Replace every layer that gains by its low-rank factors, in place; return the transform record."""
    record = _factorize(model, img_size, energy)
    if record is None:
        raise ConfigError(f"at energy {energy:g} no layer has a low-rank form cheaper than itself: lower --energy")
    return record


def _factorize(model: nn.Module, img_size: int, energy: float) -> dict[str, Any] | None:
    """factorize_model, or None (the model untouched) where no layer gains."""
    check_target(energy, None)
    transforms.check(model, "lowrank")
    before = summarize(model, img_size)
    ranks = _replace_layers(model, energy)
    if not ranks:
        return None
    after = summarize(model, img_size)
    return transforms.record(model, {"kind": "lowrank", "energy": energy, "ranks": ranks,
                                     "macs": [before.macs, after.macs], "params": [before.params, after.params]})


def latency_energy(model: nn.Module, target_ms: float, timer: Callable[[nn.Module], float], img_size: int
                   ) -> tuple[float, list[float]]:
    """The highest of ENERGIES whose factorised copy of `model` runs within `target_ms` by `timer`, with the
    times before and after; `model` is left as it is."""
    transforms.check(model, "lowrank")
    return least_change_within(model, target_ms, timer, ENERGIES, lambda trial, e: _factorize(trial, img_size, e),
                               f"energy {ENERGIES[-1]:g}, the lowest tried")


def factorization(*, energy: float | None, latency: float | None) -> Callable[[Any], dict[str, Any]]:
    """The transform of a compression run that factorises at `energy`, or at the highest of ENERGIES whose
    network runs within `latency` ms (measured on onnxruntime at batch 1 and the run's input size)."""
    def transform(trainer: Any) -> dict[str, Any]:
        model, size = trainer.model, trainer.pre.img_size
        if latency is None:
            return factorize_model(model, size, energy)
        found, times = latency_energy(model, latency, onnxruntime_latency(trainer.classes, trainer.pre), size)
        record = factorize_model(model, size, found)
        record.update(latency_target_ms=latency, latency_ms=times)
        return record
    return transform
