"""Optimisers, parameter groups, freezing, and the learning-rate schedule.

The schedule is a pure function of the optimiser step, stored as a few numbers in the checkpoint,
so a resumed run follows it exactly. What `--resume RUN --epochs N` does to it:
  - same N: nothing; the run continues as if never stopped;
  - another N, run unfinished: the rest of the decay is stretched (or squeezed) over the new length,
    from where it is now: no jump, and the curve keeps its shape however often it is refitted (a time
    limit refits it every few steps);
  - the run had finished or stopped early: a new cycle over the added epochs (Loshchilov & Hutter's
    warm restart): at most one epoch of warm-up back to the peak, then the same decay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import OptimConfig
from ..errors import ConfigError

ONECYCLE_DIV = 25.0  # OneCycleLR's div_factor: the cycle starts at peak/25 ...
ONECYCLE_FINAL = 1e4  # ... and ends at start/1e4 (final_div_factor)
ONECYCLE_PCT = 0.3  # share of the cycle spent rising


def default_lr(cfg: OptimConfig, batch_size: int) -> float:
    """Goyal et al.'s linear scaling for SGD (0.1 per 256 images); 1e-3 for the adaptive optimisers."""
    if cfg.lr is not None:
        return cfg.lr
    return 0.1 * batch_size * cfg.accum_steps / 256 if cfg.optimizer == "sgd" else 1e-3


def _part_modules(model: nn.Module, part: str) -> list[nn.Module]:
    """The modules of one of the model's `parts()`, or of all but its head ("backbone")."""
    named = model.parts()
    if part == "backbone":
        return [m for name, modules in named.items() if name != "head" for m in modules]
    return named[part]


def freeze(model: nn.Module, parts: list[str]) -> list[nn.Module]:
    """Stop gradients into `parts`; return the frozen modules, whose BatchNorm must stay in eval mode."""
    frozen = [m for part in parts for m in _part_modules(model, part)]
    for m in frozen:
        m.requires_grad_(False)
    if parts and not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("optim.freeze leaves nothing to train")
    return frozen


def set_train_mode(model: nn.Module, frozen: list[nn.Module]) -> None:
    """Training mode, except frozen parts: their BN statistics must not drift (the Keras fine-tuning rule)."""
    model.train()
    for m in frozen:
        m.eval()


def param_groups(model: nn.Module, cfg: OptimConfig, lr: float) -> list[dict]:
    """Trainable parameters grouped by (head or backbone) x (decayed or not).

    Norm weights and all biases (every tensor of one dimension) get no weight decay unless
    `wd_norm_bias` (Bag of Tricks, section 3.1); the backbone's lr is scaled by `backbone_lr_mult`.
    """
    head = {id(p) for m in model.parts()["head"] for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head, cfg.wd_norm_bias or p.ndim > 1), []).append(p)
    return [{"params": params, "lr": lr * (1.0 if is_head else cfg.backbone_lr_mult),
             "weight_decay": cfg.weight_decay if decay else 0.0}
            for (is_head, decay), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, lr)
    # Fused kernels where they are the fastest (benchmarks/train_throughput.py, benchmarks/gpu_train.py): Adam's
    # everywhere; SGD's on CUDA only, since on a CPU torch's default loop beats it.
    cuda = all(p.is_cuda for g in groups for p in g["params"])
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               fused=cuda or None)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    if cfg.optimizer == "rmsprop":
        # The TF-style settings EfficientNet/MobileNet recipes use with RMSProp.
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=1e-3, momentum=cfg.momentum)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}")


@dataclass
class Schedule:
    """Factor of each group's peak lr at an optimiser step, over one segment [start, end)."""

    kind: str
    end: int
    steps_per_epoch: int
    warmup: int = 0
    start: int = 0
    warm_from: float = 0.0  # factor at `start`, rising linearly to `peak` over `warmup` steps
    peak: float = 1.0
    final: float = 0.0  # factor reached at `end` (cosine, onecycle)
    step_size: int = 30  # epochs between decays (step)
    gamma: float = 0.1
    restart_warmup: int = 0  # warm-up of a restarted cycle
    progress: float = 0.0  # how far along the decay the segment starts (0: at the peak, 1: at the end)

    @classmethod
    def create(cls, cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> Schedule:
        total = epochs * steps_per_epoch
        warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
        s = cls(kind=cfg.schedule, end=total, steps_per_epoch=steps_per_epoch, warmup=warmup,
                final=cfg.min_lr_ratio, step_size=cfg.step_size, gamma=cfg.gamma,
                restart_warmup=min(warmup, steps_per_epoch))
        if cfg.schedule == "onecycle":
            s.warmup, s.warm_from = round(ONECYCLE_PCT * total), 1 / ONECYCLE_DIV
            s.final = 1 / (ONECYCLE_DIV * ONECYCLE_FINAL)
        return s

    def _decay(self, step: int) -> float:
        """The step schedule's drops; its epochs count from the run's start, whatever the segment."""
        return self.gamma ** ((step // self.steps_per_epoch) // self.step_size) if self.kind == "step" else 1.0

    def factor(self, step: int) -> float:
        decay = self._decay(step)
        t = step - self.start
        if t < self.warmup:
            frac = (t + 1) / self.warmup
            if self.kind == "onecycle":  # OneCycleLR anneals upwards with a cosine too
                frac = 0.5 * (1 - math.cos(math.pi * frac))
            return decay * (self.warm_from + (self.peak - self.warm_from) * frac)
        if self.kind in ("constant", "step"):
            return decay * self.peak
        return self.final + (self.peak - self.final) * 0.5 * (1 + math.cos(math.pi * self._progress(step)))

    def _progress(self, step: int) -> float:
        """Fraction of the decay done at `step` (0 during warm-up)."""
        t = step - self.start - self.warmup
        if t <= 0:
            return self.progress
        length = max(1, self.end - self.start - self.warmup)
        return self.progress + (1 - self.progress) * min(1.0, t / length)

    def resized(self, step: int, end: int, finished: bool) -> Schedule:
        """This schedule for a run that now ends at `end` (see the module docstring)."""
        if end == self.end and not finished:
            return self
        if finished:
            return Schedule(**{**asdict(self), "start": step, "end": end, "warmup": self.restart_warmup,
                               "warm_from": 0.0 if self.restart_warmup else 1.0, "peak": 1.0, "progress": 0.0})
        t = step - self.start
        if t < self.warmup:  # the rest of the warm-up at the same slope, then the whole decay over what is left
            now = self.warm_from + (self.peak - self.warm_from) * t / self.warmup
            return Schedule(**{**asdict(self), "start": step, "end": end, "warmup": self.warmup - t,
                               "warm_from": now})
        return Schedule(**{**asdict(self), "start": step, "end": end, "warmup": 0,
                           "progress": self._progress(step)})

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict) -> Schedule:
        return cls(**d)


def apply_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
