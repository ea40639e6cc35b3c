"""Structured (channel) pruning: whole channels leave the network, so every runtime runs it faster.

Torch-Pruning's dependency graph (DepGraph, Fang et al. 2023) finds which channels are coupled:
those that meet at a residual add are removed together, with the batch norms, shortcuts and SE
layers that read them. What it leaves is an ordinary ResNet of other widths; `ResNet.spec()` reads
them, so the result is saved as our spec + safetensors and never as a pickled module. A detector's
backbone is pruned with its feature pyramid attached, a segmenter's with its head: their convolutions
keep their outputs (the heads' widths are the spec's) and lose the inputs the backbone no longer makes.

Importance of a channel group: "l1" / "l2" (weight magnitude), "bn-scale" (the batch-norm scale,
network slimming, Liu et al. 2017: train with `--l1-bn` first), "taylor" (first-order Taylor
expansion of the loss, Molchanov et al. 2019, from gradients on a few training batches).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models import ResNet
from ..models import transforms
from ..models.detection import Detector
from ..models.segmentation import Segmenter
from ..models.summary import summarize
from ..models.transforms import percent
from .latency import least_change_within, onnxruntime_latency

log = logging.getLogger("resforge")

IMPORTANCE = ("l1", "l2", "bn-scale", "taylor")
MAX_STEPS = 50  # a MACs target is approached in this many equal steps of the channel ratio, at most
MAX_RATIO = 0.95  # no layer keeps fewer than 5% of its channels on the way to a MACs target


def check_target(ratio: float | None, macs: float | None, sparsity: float | None = None,
                 latency: float | None = None) -> None:
    if sum(v is not None for v in (ratio, macs, sparsity, latency)) != 1:
        raise ConfigError("give one pruning target: --ratio (share of channels removed), --macs (share of MACs "
                          "kept), --latency (milliseconds at batch 1, measured here) or --sparsity (share of "
                          "weights zeroed, unstructured)")
    for name, value in (("ratio", ratio), ("macs", macs), ("sparsity", sparsity)):
        if value is not None and not 0 < value < 1:
            raise ConfigError(f"--{name} must lie between 0 and 1 (exclusive), got {value:g}")
    if latency is not None and not latency > 0:
        raise ConfigError(f"--latency is milliseconds at batch 1 and must be positive, got {latency:g}")


def _importance(kind: str, model: ResNet) -> Any:
    import torch_pruning as tp

    if kind not in IMPORTANCE:
        raise ConfigError(f"unknown importance {kind!r}; choose one of: {', '.join(IMPORTANCE)}")
    if kind == "bn-scale":
        if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            raise ConfigError("bn-scale importance (network slimming) reads batch-norm scales, and this model has "
                              "no batch norm (norm=groupnorm): use l1, l2 or taylor")
        return tp.importance.BNScaleImportance()
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.MagnitudeImportance(p=1 if kind == "l1" else 2)


def prunable(model: nn.Module, importance: str) -> tuple[nn.Module, ResNet, list[nn.Module]]:
    """(what Torch-Pruning traces, the ResNet whose MACs count, the layers whose outputs stay) of `model`: a
    ResNet, a detector's backbone with its pyramid, or a segmenter (its head keeps its widths)."""
    if isinstance(model, (Detector, Segmenter)):
        if importance == "taylor":
            raise ConfigError("taylor importance takes gradients of a classifier's loss: prune a dense model by "
                              "l1, l2 or bn-scale")
        if isinstance(model, Segmenter):
            if model.segmenter == "fcn" or model.aux_classifier is not None:
                raise ConfigError("an FCN head (segmenter fcn, or --aux) takes its width from the backbone's, so a "
                                  "pruned one could not be rebuilt: prune a deeplabv3 or deeplabv3plus without --aux")
            return model, model.backbone, [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
        if model.spec()["frozen_bn"]:
            raise ConfigError("this detector's backbone has frozen batch norm (--frozen-bn), whose fixed scales "
                              "Torch-Pruning cannot cut: fine-tune it without --frozen-bn first")
        return model.backbone, model.resnet, [m for m in model.backbone.fpn.modules() if isinstance(m, nn.Conv2d)]
    if not isinstance(model, ResNet):
        raise ConfigError(f"channel pruning rebuilds ResNets from their widths, and {model.model_name or 'this model'} "
                          "is not one: distil a ResNet into it instead (train --teacher)")
    return model, model, [model.get_classifier()]


def prune_model(model: ResNet | Detector | Segmenter, img_size: int, *, ratio: float | None = None,
                macs: float | None = None, steps: int | None = None, importance: str = "l1", round_to: int = 8,
                gradients: Callable[[ResNet], None] | None = None) -> dict[str, Any]:
    """Remove channels from `model` (a ResNet, or a dense model's backbone) in place, the same share from each
    layer; return what changed.

    `ratio` removes that share of each layer's channels; `macs` removes channels in MAX_STEPS equal
    steps towards MAX_RATIO until the network (a dense model's backbone) keeps at most that share of its
    MACs; `steps` takes that many of those steps (what a latency target searches over). Widths are
    multiples of `round_to`. `gradients` fills `.grad` from a few training batches, which "taylor"
    needs before each step.
    """
    import torch_pruning as tp

    if steps is None:
        check_target(ratio, macs)
    elif ratio is not None or macs is not None or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(f"steps ({steps}) is a number of the {MAX_STEPS} pruning steps, without ratio or macs")
    traced, network, kept = prunable(model, importance)
    transforms.check(model, "pruned")
    if importance == "taylor" and gradients is None:
        raise ConfigError("taylor importance needs training batches for its gradients")
    if round_to < 1:
        raise ConfigError(f"round_to must be at least 1, got {round_to}")
    model.eval()
    before = summarize(network, img_size)
    example = torch.zeros(1, network.stem_conv.in_channels, img_size, img_size)
    pruner = tp.pruner.BasePruner(traced, example, importance=_importance(importance, network),
                                  pruning_ratio=ratio if ratio is not None else MAX_RATIO,
                                  iterative_steps=1 if ratio is not None else MAX_STEPS,
                                  ignored_layers=kept, round_to=round_to)
    after, taken = before, 0
    for taken in range(1, 1 + (1 if ratio is not None else steps or MAX_STEPS)):
        if gradients is not None:
            model.zero_grad(set_to_none=True)
            gradients(model)
        pruner.step()
        after = summarize(network, img_size)
        if macs is not None and after.macs <= macs * before.macs:
            break
    model.zero_grad(set_to_none=True)
    if macs is not None and after.macs > macs * before.macs:
        raise ConfigError(f"pruning reached {percent(after.macs / before.macs)} of the MACs, not the {percent(macs)} "
                          f"asked: each layer keeps at least {1 - MAX_RATIO:.0%} of its channels; ask for more MACs")
    record = {"kind": "pruned", "importance": importance, "round_to": round_to,
              **({"ratio": ratio} if ratio is not None else
                 {"macs_target": macs, "steps": taken, "of": MAX_STEPS, "towards_ratio": MAX_RATIO} if macs is not None
                 else {"steps": steps, "of": MAX_STEPS, "towards_ratio": MAX_RATIO}),
              "macs": [before.macs, after.macs], "params": [before.params, after.params]}
    return transforms.record(model, record)


def structured(*, ratio: float | None, macs: float | None, importance: str, round_to: int,
               latency: float | None = None, taylor_batches: int = 8) -> Callable[[Any], dict[str, Any]]:
    """The transform of a compression run that prunes channels (taylor: from the trainer's first batches;
    a `latency` target in ms: measured on onnxruntime at batch 1 and the run's input size)."""
    def transform(trainer: Any) -> dict[str, Any]:
        gradients = None
        if importance == "taylor":
            batches = [trainer.stepper.prepare_batch(x, y) for (x, y), _ in zip(trainer.train_loader, range(taylor_batches))]
            gradients = taylor_gradients(batches, torch.nn.functional.cross_entropy)
        if latency is None:
            return prune_model(trainer.model, trainer.pre.img_size, ratio=ratio, macs=macs, importance=importance,
                               round_to=round_to, gradients=gradients)
        if not isinstance(trainer.model, ResNet):
            raise ConfigError("--latency times a classifier's graph: prune a dense model to --ratio or --macs")
        timer = onnxruntime_latency(trainer.classes, trainer.pre)
        found = latency_steps(trainer.model, latency, timer, trainer.pre.img_size, importance=importance,
                              round_to=round_to, gradients=gradients)
        record = prune_model(trainer.model, trainer.pre.img_size, steps=found["steps"], importance=importance,
                             round_to=round_to, gradients=gradients)
        record.update(latency_target_ms=latency, latency_ms=found["latency_ms"])
        return record
    return transform


def latency_steps(model: ResNet, target_ms: float, timer: Callable[[nn.Module], float], img_size: int,
                  **prune_options: Any) -> dict[str, Any]:
    """The fewest pruning steps whose pruned copy of `model` runs within `target_ms` by `timer`; `model` is
    left as it is."""
    steps, times = least_change_within(
        model, target_ms, timer, range(1, MAX_STEPS + 1),
        lambda trial, k: prune_model(trial, img_size, steps=k, **prune_options),
        f"each layer keeps at least {1 - MAX_RATIO:.0%} of its channels")
    return {"steps": steps, "latency_ms": times}


def taylor_gradients(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[ResNet], None]:
    """A `gradients` function for `prune_model`: the summed gradient of `loss` over `batches`."""
    batches = list(batches)

    def fill(model: ResNet) -> None:
        model.eval()  # batch norms keep their statistics: only the weights' sensitivity is asked
        for x, y in batches:
            loss(model(x), y).backward()
    return fill
