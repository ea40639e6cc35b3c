"""Structured (channel) pruning: whole channels leave the network, so every runtime runs it faster.

Torch-Pruning's dependency graph (DepGraph, Fang et al. 2023) finds which channels are coupled:
those that meet at a residual add are removed together, with the batch norms, shortcuts and SE
layers that read them. What it leaves is an ordinary ResNet of other widths; `ResNet.spec()` reads
them, so the result is saved as our spec + safetensors and never as a pickled module.

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
from ..models.summary import summarize

log = logging.getLogger("resforge")

IMPORTANCE = ("l1", "l2", "bn-scale", "taylor")
MAX_STEPS = 50  # a MACs target is approached in this many equal steps of the channel ratio, at most
MAX_RATIO = 0.95  # no layer keeps fewer than 5% of its channels on the way to a MACs target


def check_target(ratio: float | None, macs: float | None, sparsity: float | None = None) -> None:
    if sum(v is not None for v in (ratio, macs, sparsity)) != 1:
        raise ConfigError("give one pruning target: --ratio (share of channels removed), --macs (share of MACs "
                          "kept) or --sparsity (share of weights zeroed, unstructured)")
    for name, value in (("ratio", ratio), ("macs", macs), ("sparsity", sparsity)):
        if value is not None and not 0 < value < 1:
            raise ConfigError(f"--{name} must lie between 0 and 1 (exclusive), got {value:g}")


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


def prune_model(model: ResNet, img_size: int, *, ratio: float | None = None, macs: float | None = None,
                importance: str = "l1", round_to: int = 8,
                gradients: Callable[[ResNet], None] | None = None) -> dict[str, Any]:
    """Remove channels from `model` in place, the same share from each layer; return what changed.

    `ratio` removes that share of each layer's channels; `macs` removes channels in steps until the
    network keeps at most that share of its MACs. Widths are multiples of `round_to`. `gradients`
    fills `.grad` from a few training batches, which "taylor" needs before each step.
    """
    import torch_pruning as tp

    check_target(ratio, macs)
    if any(t.get("kind") == "lowrank" for t in model.transforms):
        raise ConfigError("this model is factorised (low-rank): prune the run it came from, then factorise")
    if importance == "taylor" and gradients is None:
        raise ConfigError("taylor importance needs training batches for its gradients")
    if round_to < 1:
        raise ConfigError(f"round_to must be at least 1, got {round_to}")
    model.eval()
    before = summarize(model, img_size)
    example = torch.zeros(1, model.stem_conv.in_channels, img_size, img_size)
    steps = 1 if ratio is not None else MAX_STEPS
    pruner = tp.pruner.BasePruner(model, example, importance=_importance(importance, model),
                                  pruning_ratio=ratio if ratio is not None else MAX_RATIO, iterative_steps=steps,
                                  ignored_layers=[model.fc], round_to=round_to)
    after = before
    for _ in range(steps):
        if gradients is not None:
            model.zero_grad(set_to_none=True)
            gradients(model)
        pruner.step()
        after = summarize(model, img_size)
        if macs is not None and after.macs <= macs * before.macs:
            break
    model.zero_grad(set_to_none=True)
    if macs is not None and after.macs > macs * before.macs:
        raise ConfigError(f"pruning reached {after.macs / before.macs:.0%} of the MACs, not the {macs:.0%} asked: "
                          f"each layer keeps at least {1 - MAX_RATIO:.0%} of its channels; ask for more MACs")
    record = {"kind": "pruned", "importance": importance, "round_to": round_to,
              **({"ratio": ratio} if ratio is not None else {"macs_target": macs}),
              "macs": [before.macs, after.macs], "params": [before.params, after.params]}
    model.transforms.append(record)
    return record


def structured(*, ratio: float | None, macs: float | None, importance: str, round_to: int,
               taylor_batches: int = 8) -> Callable[[Any], dict[str, Any]]:
    """The transform of a compression run that prunes channels (taylor: from the trainer's first batches)."""
    def transform(trainer: Any) -> dict[str, Any]:
        gradients = None
        if importance == "taylor":
            batches = [trainer.prepare_batch(x, y) for (x, y), _ in zip(trainer.train_loader, range(taylor_batches))]
            gradients = taylor_gradients(batches, torch.nn.functional.cross_entropy)
        return prune_model(trainer.model, trainer.pre.img_size, ratio=ratio, macs=macs, importance=importance,
                           round_to=round_to, gradients=gradients)
    return transform


def taylor_gradients(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[ResNet], None]:
    """A `gradients` function for `prune_model`: the summed gradient of `loss` over `batches`."""
    batches = list(batches)

    def fill(model: ResNet) -> None:
        model.eval()  # batch norms keep their statistics: only the weights' sensitivity is asked
        for x, y in batches:
            loss(model(x), y).backward()
    return fill


def describe(record: dict[str, Any]) -> str:
    (m0, m1), (p0, p1) = record["macs"], record["params"]
    return (f"pruned by {record['importance']}: {m1 / 1e6:,.1f}M MACs of {m0 / 1e6:,.1f}M ({m1 / m0:.0%}), "
            f"{p1:,} parameters of {p0:,} ({p1 / p0:.0%})")
