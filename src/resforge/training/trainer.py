"""The training loop: a folder in, a run directory out.

Everything the loop does per step is in `_train_epoch`, top to bottom: mixing, autocast, loss,
NaN check, accumulation, clipping, the optimiser and EMA updates. Each epoch then validates the
model (and its EMA), appends a row to `metrics.csv`, saves `best.safetensors` when the chosen
metric improves, and rewrites `last.ckpt` atomically for `--resume`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .. import __version__
from ..config import Config, merge, validate
from ..data.folder import ImageFolderScan, scan_folder
from ..data.loader import CACHE_AUTO_BYTES, ImageDataset, cache_bytes, default_workers, make_loader
from ..data.transforms import BatchMix, Preprocess, eval_transform, imagenet_stats, make_preprocess, train_transform
from ..device import resolve_amp, resolve_device
from ..errors import CheckpointError, ConfigError, TrainingError
from ..evaluation.metrics import topk_correct
from ..evaluation.runner import autocast, infer
from ..io import write_csv, write_json, write_text
from ..models import ResNet, create_model, save_model
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .optim import Schedule, apply_lr, build_optimizer, default_lr, freeze, set_train_mode

log = logging.getLogger("resforge")

Callback = Callable[[str, "Trainer"], None]
# What a resumed run may change; anything else would make it another experiment.
RESUMABLE = {"train.epochs", "train.patience", "train.time_limit", "train.device", "data.workers"}


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def new_run_dir(cfg: Config) -> Path:
    """`project/name`, numbered (`name-2`, ...) when taken, unless `exist_ok`."""
    base = cfg.train.name or f"{cfg.model.name}-{Path(cfg.data.root).resolve().name}"
    root = Path(cfg.train.project)
    path, n = root / base, 1
    path.parent.mkdir(parents=True, exist_ok=True)  # a name may hold folders: group/run
    while True:
        try:  # mkdir claims the name, so two runs started at once cannot share it
            path.mkdir(exist_ok=cfg.train.exist_ok)
            return path
        except FileExistsError:
            n += 1
            path = root / f"{base}-{n}"


def _ema_fn(decay: float) -> Callable:
    """EMA update with timm's warm-up: early on, the average follows the weights faster."""
    def update(ema: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        d = min(decay, (1 + int(n)) / (10 + int(n)))
        if ema[0].is_floating_point():
            torch._foreach_lerp_(ema, current, 1 - d)
        else:
            for e, c in zip(ema, current):
                e.copy_(c)
    return update


def dataset_stats(samples: list, pre: Preprocess, limit: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (up to `limit`) training images as the network will see them."""
    plain = Preprocess(**{**pre.to_dict(), "mean": [0.0] * pre.in_chans, "std": [1.0] * pre.in_chans})
    step = max(1, len(samples) // limit)
    ds = ImageDataset(samples[::step], eval_transform(plain), plain)
    total = torch.zeros(pre.in_chans, dtype=torch.float64)
    sq = torch.zeros_like(total)
    n = 0
    for i in range(len(ds)):
        x = ds[i][0].double()
        total += x.sum((1, 2))
        sq += (x * x).sum((1, 2))
        n += x[0].numel()
    mean = total / n
    std = (sq / n - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


class Trainer:
    """One training run. Build it from a config (or `Trainer.resume(run_dir)`), then call `fit()`."""

    def __init__(self, cfg: Config, *, run_dir: str | os.PathLike | None = None, callbacks: list[Callback] = (),
                 progress: bool = True):
        validate(cfg)
        if not cfg.data.root:
            raise ConfigError("no data folder given")
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.progress = progress
        self.device = resolve_device(cfg.train.device)
        self.amp_dtype = resolve_amp(cfg.train.amp, self.device)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        with torch.device("meta"):  # a bad model option fails now, not after the whole folder is decoded
            create_model(cfg.model.name, num_classes=2, **self._model_kwargs())
        seed_everything(cfg.train.seed, cfg.train.deterministic)

        d = cfg.data
        self.scan: ImageFolderScan = scan_folder(d.root, val_split=d.val_split, seed=d.split_seed,
                                                 max_pixels=d.max_pixels)
        if not self.scan.val:
            raise ConfigError("no validation images: set data.val_split above 0 or add a val folder")
        self.classes = self.scan.classes
        self.model = self._build_model()
        self.pre = self._build_preprocess()

        workers = default_workers() if d.workers < 0 else d.workers
        pin = self.device.type == "cuda"
        self.train_set = ImageDataset(self.scan.train, train_transform(self.pre, cfg.augment), self.pre,
                                      seed=cfg.train.seed, max_pixels=d.max_pixels)
        self.val_set = ImageDataset(self.scan.val, eval_transform(self.pre), self.pre, max_pixels=d.max_pixels)
        cached = d.cache == "on" or (d.cache == "auto" and cache_bytes(
            self.scan.train + self.scan.val, self.scan.sizes, self.pre) < CACHE_AUTO_BYTES)
        if cached:
            for ds in (self.train_set, self.val_set):
                ds.build_cache(progress)
        self.train_loader = make_loader(self.train_set, d.batch_size, train=True, workers=workers,
                                        seed=cfg.train.seed, pin_memory=pin)
        self.val_loader = make_loader(self.val_set, d.batch_size, train=False, workers=workers,
                                      seed=cfg.train.seed, pin_memory=pin)
        self.mix = BatchMix(cfg.augment, len(self.classes))

        o, t = cfg.optim, cfg.train
        if o.freeze and not cfg.model.pretrained:
            log.warning("freezing %s of a randomly initialised model: those layers will never learn; "
                        "give --pretrained weights (or no --freeze)", ", ".join(o.freeze))
        self.frozen = freeze(self.model, o.freeze)
        self.lr = default_lr(o, d.batch_size)
        self.optimizer = build_optimizer(self.model, o, self.lr)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.steps_per_epoch = math.ceil(len(self.train_loader) / o.accum_steps)
        self.schedule = Schedule.create(o, t.epochs, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = (AveragedModel(self.model, multi_avg_fn=_ema_fn(t.ema_decay), use_buffers=True)
                    if t.ema else None)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
        self.fwd_model = torch.compile(self.model) if t.compile else self.model

        self.epoch, self.step = 0, 0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"score": None, "epoch": None, "weights": None}
        self.bad_epochs = 0
        self.finished = False
        self.run_dir = Path(run_dir) if run_dir else None

    # -- set-up -----------------------------------------------------------------------------------
    def _model_kwargs(self) -> dict[str, Any]:
        m, d = self.cfg.model, self.cfg.data
        kwargs = dict(in_chans=d.in_chans, small_input=m.small_input if m.small_input is not None else d.img_size <= 64,
                      width=m.width, act=m.act, norm=m.norm, se=m.se, drop_rate=m.drop_rate,
                      drop_path_rate=m.drop_path_rate, zero_init_residual=m.zero_init_residual, init=m.init)
        return {**kwargs, "variant": m.variant} if m.variant else kwargs

    def _build_model(self) -> ResNet:
        model = create_model(self.cfg.model.name, pretrained=self.cfg.model.pretrained,
                             num_classes=len(self.classes), **self._model_kwargs())
        return model.to(self.device, memory_format=self.memory_format)

    def _build_preprocess(self) -> Preprocess:
        d = self.cfg.data
        mean, std = imagenet_stats(d.in_chans)
        pretrained = self.model.pretrained_cfg
        if d.normalize == "auto" and "mean" in pretrained:
            mean, std = imagenet_stats(d.in_chans, pretrained["mean"], pretrained["std"])
        elif d.normalize == "none":
            mean, std = [0.0] * d.in_chans, [1.0] * d.in_chans
        pre = make_preprocess(d.img_size, d.crop_pct, d.in_chans, d.interpolation, mean, std)
        if d.normalize == "dataset":
            pre.mean, pre.std = dataset_stats(self.scan.train, pre)
        return pre

    # -- resume -----------------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None,
               callbacks: list[Callback] = (), progress: bool = True) -> Trainer:
        """Continue a run from its `last.ckpt`; only the options in RESUMABLE may change."""
        from ..config import _resolve_key

        run_dir = Path(run_dir)
        state = load_checkpoint(run_dir / "last.ckpt")
        cfg = merge(Config(), state["config"], f"{run_dir}/last.ckpt")
        for key, value in (overrides or {}).items():
            key = _resolve_key(key)
            if key not in RESUMABLE:
                raise ConfigError(f"{key} cannot change when resuming (only {', '.join(sorted(RESUMABLE))}); "
                                  "start a new run, e.g. with --pretrained " f"{run_dir}/best.safetensors")
            merge(cfg, {key: value})
        trainer = cls(cfg, run_dir=run_dir, callbacks=callbacks, progress=progress)
        trainer._load_state(state)
        return trainer

    def _data_record(self) -> dict[str, Any]:
        """What resuming checks the folder against."""
        return {"classes": self.classes, "train": len(self.scan.train), "val": len(self.scan.val)}

    def _load_state(self, state: dict[str, Any]) -> None:
        data = self._data_record()
        if state["data"]["classes"] != data["classes"]:
            raise CheckpointError(f"the classes in {self.cfg.data.root} changed since the run started "
                                  f"({', '.join(state['data']['classes'])} then, {', '.join(self.classes)} now); "
                                  "start a new run")
        if state["data"] != data:
            log.warning("%s changed since the run started: %d/%d train/val images then, %d/%d now",
                        self.cfg.data.root, state["data"]["train"], state["data"]["val"], data["train"], data["val"])
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the run did not use fp16 (it may now, on another device)
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best, self.bad_epochs = state["history"], state["best"], state["bad_epochs"]
        finished = state["finished"]
        if self.cfg.train.epochs <= self.epoch:
            raise ConfigError(f"this run already trained {self.epoch} epochs; pass --epochs above {self.epoch} "
                              "to train further")
        schedule = Schedule.from_state_dict(state["schedule"])
        self.schedule = schedule.resized(self.step, self.cfg.train.epochs * self.steps_per_epoch, finished)
        if finished:
            log.info("extending a finished run: a new cosine cycle over epochs %d-%d", self.epoch + 1,
                     self.cfg.train.epochs)
            self.bad_epochs = 0
        set_rng_state(state["rng"])

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": self.schedule.state_dict(), "epoch": self.epoch, "step": self.step,
                "history": self.history, "best": self.best, "bad_epochs": self.bad_epochs,
                "finished": self.finished, "rng": rng_state(), "config": self.cfg.to_dict(),
                "data": self._data_record(),
                "version": __version__}

    # -- the loop ---------------------------------------------------------------------------------
    def _emit(self, event: str) -> None:
        for cb in self.callbacks:
            cb(event, self)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        accum = cfg.optim.accum_steps
        set_train_mode(self.model, self.frozen)
        self.train_loader.sampler.set_epoch(epoch)
        l1_weights = [p for p in self.model.parameters() if p.requires_grad and p.ndim > 1] if cfg.optim.l1 else []
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss_sum, correct, seen, n_batches = 0.0, 0, 0, len(self.train_loader)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                   disable=None if self.progress else True, unit="batch")
        start = time.perf_counter()
        for i, (x, y) in enumerate(bar):
            self.batch = i
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            y = y.to(self.device, non_blocking=True)
            x, y = self.mix(x, y)
            with autocast(self.device, self.amp_dtype):
                logits = self.fwd_model(x)
                loss = self.criterion(logits.float(), y)
            if l1_weights:
                loss = loss + cfg.optim.l1 * sum(w.abs().sum() for w in l1_weights)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                where = f"epoch {epoch + 1}, batch {i + 1}, optimiser step {self.step + 1}"
                kept = (f"the last good checkpoint is {self.run_dir / 'last.ckpt'} (epoch {self.epoch})"
                        if self.epoch else "no checkpoint was written yet")
                raise TrainingError(f"the loss became {loss_value} at {where}; {kept}. Lower optim.lr, "
                                    "set optim.clip_grad, or turn mixed precision off (train.amp off)")
            if i % accum == 0:  # just before backward, not after the step: backward then reuses the freed
                self.optimizer.zero_grad(set_to_none=True)  # memory instead of faulting in new pages (8% on CPU)
            self.scaler.scale(loss / accum).backward()
            if (i + 1) % accum == 0 or i + 1 == n_batches:
                apply_lr(self.optimizer, self.base_lrs, self.schedule.factor(self.step))
                if cfg.optim.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                self.step += 1
            loss_sum += loss_value * len(x)
            correct += topk_correct(logits.detach(), y, (1,))[1]
            seen += len(x)
            if i % 10 == 0 or i + 1 == n_batches:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}",
                                lr=f"{self.optimizer.param_groups[-1]['lr']:.2e}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
            self._emit("batch_end")
        self.optimizer.zero_grad(set_to_none=True)  # no gradients held through validation and saving
        elapsed = time.perf_counter() - start
        return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                "lr": self.optimizer.param_groups[-1]["lr"], "img_per_s": seen / elapsed, "train_time_s": elapsed}

    def _validate(self) -> dict[str, float]:
        row = {}
        models = [("val", self.fwd_model)] + ([("ema_val", self.ema.module)] if self.ema is not None else [])
        for prefix, model in models:
            logits, targets = infer(model, self.val_loader, self.device, self.amp_dtype, self.cfg.train.channels_last)
            k = topk_correct(logits, targets, (1, 5))
            row[f"{prefix}_loss"] = F.cross_entropy(logits, targets).item()
            row[f"{prefix}_top1"] = k[1] / len(targets)
            row[f"{prefix}_top5"] = k[5] / len(targets)
        return row

    def _score(self, row: dict[str, float], prefix: str) -> float:
        """Higher is better."""
        metric = self.cfg.train.metric.replace("val_", f"{prefix}_")
        return -row[metric] if metric.endswith("loss") else row[metric]

    def _update_best(self, row: dict[str, float]) -> bool:
        candidates = [("model", self._score(row, "val"))]
        if self.ema is not None:
            candidates.append(("ema", self._score(row, "ema_val")))
        which, score = max(candidates, key=lambda c: c[1])
        if self.best["score"] is not None and score <= self.best["score"]:
            self.bad_epochs += 1
            return False
        self.best = {"score": score, "epoch": row["epoch"], "weights": which}
        self.bad_epochs = 0
        model = self.ema.module if which == "ema" else self.model
        save_model(model, self.run_dir / "best.safetensors", self.model_meta(row, which))
        return True

    def model_meta(self, row: dict[str, float], which: str) -> dict[str, Any]:
        """What the sidecar of a saved model records besides its architecture."""
        prefix = "ema_val" if which == "ema" else "val"
        return {"classes": self.classes, "preprocess": self.pre.to_dict(),
                "metrics": {k.replace(prefix, "val"): v for k, v in row.items() if k.startswith(prefix + "_")},
                "trained": {"run": str(self.run_dir), "epoch": row["epoch"], "weights": which,
                            "data": str(Path(self.cfg.data.root).resolve()),
                            "pretrained": self.cfg.model.pretrained, "resforge": __version__,
                            "torch": torch.__version__}}

    def _write_run_files(self) -> None:
        write_text(self.run_dir / "config.yaml", self.cfg.to_yaml())
        write_json(self.run_dir / "classes.json", self.classes)
        self.scan.write_split_csv(self.run_dir / "split.csv")
        if self.scan.skipped:
            self.scan.write_skipped_csv(self.run_dir / "skipped.csv")

    def _write_metrics(self) -> None:
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        write_csv(self.run_dir / "metrics.csv", keys, ([row.get(k, "") for k in keys] for row in self.history))

    def _log_epoch(self, row: dict[str, float]) -> None:
        parts = [f"epoch {row['epoch']}/{self.cfg.train.epochs}",
                 f"train loss {row['train_loss']:.3f} acc {row['train_top1']:.1%}",
                 f"val loss {row['val_loss']:.3f} top1 {row['val_top1']:.1%} top5 {row['val_top5']:.1%}"]
        if "ema_val_top1" in row:
            parts.append(f"ema top1 {row['ema_val_top1']:.1%}")
        parts.append(f"lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s  {row['epoch_time_s']:.1f}s")
        log.info("  ".join(parts))

    def _fit_to_time_limit(self, elapsed: float, epochs_done: int) -> None:
        """Set the run's length to the epochs that fit in `time_limit` at the pace so far; the lr schedule
        is refitted without a jump (see `Schedule.resized`)."""
        t = self.cfg.train
        per_epoch = elapsed / epochs_done
        fits = self.epoch + int((t.time_limit * 60 - elapsed) // per_epoch)
        if fits != t.epochs:
            t.epochs = max(self.epoch, fits)
            self.schedule = self.schedule.resized(self.step, max(t.epochs * self.steps_per_epoch, self.step + 1),
                                                  finished=False)

    def fit(self) -> dict[str, Any]:
        """Train to the configured number of epochs (or an early stop); return the run's summary."""
        cfg = self.cfg
        if self.run_dir is None:
            self.run_dir = new_run_dir(cfg)
        for stale in self.run_dir.glob(".*.tmp"):  # left by a process killed while saving
            stale.unlink()
        self._write_run_files()
        if self.scan.skipped:
            log.warning("skipped %d unreadable or non-image file(s); see %s", len(self.scan.skipped),
                        self.run_dir / "skipped.csv")
        self._emit("train_start")
        started, first_epoch = time.perf_counter(), self.epoch
        try:
            while self.epoch < cfg.train.epochs:
                t0 = time.perf_counter()
                row = self._train_epoch(self.epoch)
                row.update(self._validate())
                row["epoch_time_s"] = time.perf_counter() - t0
                self.history.append(row)
                self._write_metrics()
                self._update_best(row)
                self.epoch += 1
                if cfg.train.time_limit:
                    self._fit_to_time_limit(time.perf_counter() - started, self.epoch - first_epoch)
                stop = bool(cfg.train.patience) and self.bad_epochs >= cfg.train.patience
                self.finished = stop or self.epoch >= cfg.train.epochs
                save_checkpoint(self.run_dir / "last.ckpt", self._state())
                self._log_epoch(row)
                self._emit("epoch_end")
                if stop:
                    log.info("no improvement of %s for %d epochs: stopping early", cfg.train.metric,
                             cfg.train.patience)
                    break
        except KeyboardInterrupt:
            log.warning("interrupted; continue with: resforge train --resume %s", self.run_dir)
            raise
        self._emit("train_end")
        return {"run_dir": str(self.run_dir), "epochs": self.epoch, "best_epoch": self.best["epoch"],
                "best_weights": self.best["weights"], "metric": cfg.train.metric,
                "stopped_early": self.epoch < cfg.train.epochs,
                "train_time_s": sum(r["epoch_time_s"] for r in self.history),
                "history": self.history}

