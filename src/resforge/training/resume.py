"""Continuing a run: what may change, reading its files under the run's lock, and putting a trainer back
where the checkpoint left it (the schedule refitted when the length changed, a lost best model recovered)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config, load_yaml, merge, resolve_key
from ..errors import CheckpointError, ConfigError
from ..models import load_model, save_model
from .checkpoint import RunLock, load_checkpoint, set_rng_state
from .optim import Schedule

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger("resforge")

# What a resumed run may change; anything else would make it another experiment.
RESUMABLE = {"train.epochs", "train.patience", "train.time_limit", "train.device", "data.workers", "data.decode"}


def read_run(run_dir: Path, overrides: dict[str, Any] | None) -> tuple[RunLock, dict[str, Any] | None, Config]:
    """Lock the run, then read its checkpoint (or its config.yaml when it has none) and apply the overrides."""
    ckpt, config_file = run_dir / "last.ckpt", run_dir / "config.yaml"
    if not ckpt.is_file() and not config_file.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {ckpt}")
    lock = RunLock(run_dir)
    try:
        if ckpt.is_file():
            state = load_checkpoint(ckpt)
            cfg = merge(Config(), state["config"], str(ckpt))
        else:
            state = None
            cfg = merge(Config(), load_yaml(config_file), str(config_file))
            log.warning("%s has no checkpoint (it stopped before its first epoch was saved): starting it again "
                        "from its config.yaml", run_dir)
        for key, value in (overrides or {}).items():
            key = resolve_key(key)
            if key not in RESUMABLE:
                raise ConfigError(f"{key} cannot change when resuming (only {', '.join(sorted(RESUMABLE))}); "
                                  f"start a new run, e.g. with --pretrained {run_dir}/best.safetensors")
            merge(cfg, {key: value})
    except BaseException:
        lock.release()
        raise
    return lock, state, cfg


def restore(trainer: Trainer, state: dict[str, Any]) -> None:
    """The trainer as the checkpoint left it: weights, optimiser, counters, history, RNG."""
    classes = state["data"]["classes"]
    if classes != trainer.classes:
        raise CheckpointError(f"the classes in {trainer.cfg.data.root} changed since the run started "
                              f"({', '.join(classes)} then, {', '.join(trainer.classes)} now); start a new run")
    trainer.model.load_state_dict(state["model"])
    if trainer.ema is not None and state.get("ema") is not None:
        trainer.ema.load_state_dict(state["ema"])
    step = trainer.stepper
    step.optimizer.load_state_dict(state["optimizer"])
    if state["scaler"]:  # empty when the run did not use fp16 (it may now, on another device)
        step.scaler.load_state_dict(state["scaler"])
    trainer.epoch, trainer.step = state["epoch"], state["step"]
    trainer.history, trainer.best, trainer.bad_epochs = state["history"], state["best"], state["bad_epochs"]
    finished = state["finished"]
    _check_extension(trainer, finished)
    schedule = Schedule.from_state_dict(state["schedule"])
    trainer.schedule = schedule.resized(trainer.step, trainer.cfg.train.epochs * trainer.steps_per_epoch, finished)
    if finished:
        log.info("extending a finished run: a new cosine cycle over epochs %d-%d", trainer.epoch + 1,
                 trainer.cfg.train.epochs)
        trainer.bad_epochs = 0
    if trainer.world.main:
        _recover_best(trainer)
    trainer.best = trainer.world.broadcast(trainer.best)
    set_rng_state(state["rng"])


def _check_extension(trainer: Trainer, finished: bool) -> None:
    """A resumed run must have something left to do: epochs, or time under its limit."""
    t = trainer.cfg.train
    if t.time_limit:
        spent = trainer.time_spent
        left = t.time_limit * 60 - spent
        if left <= 0:
            raise ConfigError(f"this run has used its {t.time_limit:g}-minute time limit; pass a larger "
                              "--time-limit to train further (or --time-limit 0 with --epochs N)")
        if finished or t.epochs <= trainer.epoch:  # a first plan, refitted by the budget once the pace is known
            t.epochs = trainer.epoch + max(1, round(left / (spent / max(1, len(trainer.history)))))
    elif t.epochs <= trainer.epoch:
        raise ConfigError(f"this run already trained {trainer.epoch} epochs; pass --epochs above {trainer.epoch} "
                          "to train further")


def _recover_best(trainer: Trainer) -> None:
    """A best model that is gone or unreadable is rewritten when the checkpoint holds it, else forgotten."""
    best = trainer.best
    if best["epoch"] is None:
        return
    path = trainer.run_dir / "best.safetensors"
    try:
        load_model(path)
        return
    except CheckpointError as e:
        problem = str(e)
    last = trainer.history[-1]
    if best["epoch"] == last["epoch"]:
        which = best["weights"]
        model = trainer.ema.module if which == "ema" else trainer.model
        save_model(model, path, trainer.model_meta(last, which))
        log.warning("%s; rewritten from last.ckpt (epoch %d)", problem, best["epoch"])
    else:
        log.warning("%s, and last.ckpt holds epoch %d, not the best epoch %d: that model is lost; the best "
                    "epoch from now on is saved in its place", problem, last["epoch"], best["epoch"])
        trainer.best = {"score": None, "epoch": None, "weights": None}
