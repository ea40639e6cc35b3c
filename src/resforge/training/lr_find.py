"""The learning-rate range test (Smith 2017; the fastai `lr_find` habit).

The learning rate grows exponentially from `start_lr` to `end_lr` over a short run of steps on
the real training set and recipe, each one the trainer's own step (loss, penalties, accumulation,
clipping); the loss (smoothed) is recorded until it diverges. The
suggestion is the rate where the smoothed loss falls fastest, before its minimum. The model and
optimiser are put back as they were afterwards.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, TrainingError
from .optim import set_train_mode
from .trainer import Trainer


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float | None
    reason: str = ""  # why there is no suggestion


MIN_STEPS = 5  # fewer smoothed losses show no slope to suggest from


def check_range(start_lr: float, end_lr: float, steps: int) -> None:
    if steps < MIN_STEPS or not 0 < start_lr < end_lr:
        raise ConfigError(f"lr-find needs at least {MIN_STEPS} steps and 0 < start_lr < end_lr")


def lr_find(trainer: Trainer, start_lr: float = 1e-6, end_lr: float = 10.0, steps: int = 100,
            smoothing: float = 0.9, diverge: float = 4.0) -> LRFindResult:
    check_range(start_lr, end_lr, steps)
    step = trainer.stepper
    model, opt = trainer.model, step.optimizer
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    top = max(step.base_lrs)  # the recipe's ratios between groups (e.g. a slower backbone) are kept
    accum = trainer.cfg.optim.accum_steps
    lrs, losses, avg, best = [], [], 0.0, math.inf
    set_train_mode(model, trainer.frozen)
    batches = _endless(trainer)
    try:
        for i in range(steps):
            lr = start_lr * (end_lr / start_lr) ** (i / max(1, steps - 1))
            value = 0.0
            for micro in range(accum):  # one probe is one real optimiser step, accumulation included
                loss, _ = step.compute_loss(*step.prepare_batch(*next(batches)))
                step.backward(loss, first=micro == 0)
                value += loss.item() / accum
            if not math.isfinite(value):
                break
            step.optimizer_step(lr / top)
            avg = smoothing * avg + (1 - smoothing) * value
            smoothed = avg / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > diverge * best:
                break
    finally:
        opt.zero_grad(set_to_none=True)
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
    if not lrs:
        raise TrainingError("the loss was not finite before the first step (at any learning rate): check the data "
                            "and the model options, or turn mixed precision off (train.amp off)")
    return LRFindResult(lrs, losses, *suggest_lr(lrs, losses))


def _endless(trainer: Trainer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches, epoch after epoch, each epoch shuffled as training would."""
    for epoch in itertools.count():
        trainer.train_loader.sampler.set_epoch(epoch)
        yield from trainer.train_loader


def suggest_lr(lrs: list[float], losses: list[float]) -> tuple[float | None, str]:
    """The steepest descent of loss against log(lr), up to the loss minimum; or None and why not."""
    if len(losses) < MIN_STEPS:  # the run asked for at least MIN_STEPS: it stopped early
        return None, (f"the loss diverged after {len(losses)} step(s), at lr {lrs[-1]:.2g}: lower --start-lr "
                      "or --end-lr")
    stop = int(np.argmin(losses)) + 1
    if stop == 1:
        return None, f"the loss was lowest at the start (lr {lrs[0]:.2g}) and only rose: lower --start-lr"
    if stop == 2:
        return None, (f"the loss fell for one step only (to lr {lrs[1]:.2g}), then rose: too little descent to "
                      "find its steepest part; lower --start-lr")
    grads = np.gradient(np.asarray(losses[:stop]), np.log(np.asarray(lrs[:stop])))
    return float(lrs[int(np.argmin(grads))]), ""
