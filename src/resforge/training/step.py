"""One optimiser step in four calls, shared by the training loop, lr-find, pruning's Taylor importance,
quantisation-aware training's ranges and the auto recipe's pace measure: `prepare_batch` (device, layout,
the task's batch transform), `compute_loss` (autocast, the criterion, the L1 penalties), `backward`
(accumulation) and `optimizer_step` (the rate, clipping, the grad scaler)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..config import OptimConfig
from ..data.gpu_decode import EncodedBatch
from ..device import autocast, to_device
from ..errors import ConfigError
from .optim import apply_lr, build_optimizer

BatchTransform = Callable[[Any, Any], tuple[Any, Any]]
Call = Callable[[nn.Module, Any, Any], Any]


def call_on_images(forward: nn.Module, x: Any, y: Any) -> Any:
    """The training forward pass of a network that sees only the images (a classifier)."""
    return forward(x)


@dataclass
class Step:
    model: nn.Module  # whose parameters are trained
    forward: nn.Module  # what the batch goes through: the model, compiled or wrapped by DDP
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    optim: OptimConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    batch_transform: BatchTransform
    decoder: Callable[[EncodedBatch], torch.Tensor] | None = None
    call: Call = call_on_images  # the task's training forward pass (a detector sees the targets too)
    scaler: torch.amp.GradScaler = field(init=False)
    base_lrs: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.trained_params = [p for p in self.model.parameters() if p.requires_grad]
        self.l1_weights = [p for p in self.trained_params if p.ndim > 1]
        self.bn_scales = [m.weight for m in self.model.modules()  # SyncBatchNorm too
                          if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight.requires_grad]
        if self.optim.l1_bn and not self.bn_scales:
            raise ConfigError("optim.l1_bn (network slimming) penalises batch-norm scales, and this model has none "
                              "to train (norm=groupnorm, or frozen)")

    @classmethod
    def build(cls, model: nn.Module, forward: nn.Module, optim: OptimConfig, lr: float, criterion: nn.Module,
              device: torch.device, amp_dtype: torch.dtype | None, memory_format: torch.memory_format,
              batch_transform: BatchTransform, decoder: Any = None, call: Call = call_on_images) -> Step:
        return cls(model, forward, criterion, build_optimizer(model, optim, lr), optim, device, amp_dtype,
                   memory_format, batch_transform, decoder, call)

    def prepare_batch(self, x: Any, y: Any) -> tuple[Any, Any]:
        """A loader's batch on the device (decoded there, for data.decode gpu), in the run's layout, with the
        task's batch transform (MixUp/CutMix when the recipe says so)."""
        if isinstance(x, EncodedBatch):
            x = self.decoder(x)
        return self.batch_transform(to_device(x, self.device, self.memory_format), to_device(y, self.device))

    def compute_loss(self, x: Any, y: Any) -> tuple[torch.Tensor, Any]:
        """(loss, outputs) of a prepared batch: the training forward pass, the criterion and the L1 penalties."""
        with autocast(self.device, self.amp_dtype):
            outputs = self.call(self.forward, x, y)
            loss = self.criterion(outputs, y, x)
        o = self.optim
        if o.l1:
            loss = loss + o.l1 * sum(w.abs().sum() for w in self.l1_weights)
        if o.l1_bn:
            loss = loss + o.l1_bn * sum(w.abs().sum() for w in self.bn_scales)
        return loss, outputs

    def backward(self, loss: torch.Tensor, first: bool) -> None:
        """Accumulate the gradient of one micro-batch; `first` clears the last step's gradients."""
        if first:  # just before backward, not after the step: backward then reuses the freed memory
            self.optimizer.zero_grad(set_to_none=True)  # instead of faulting in new pages
        self.scaler.scale(loss / self.optim.accum_steps).backward()

    def optimizer_step(self, lr_factor: float) -> None:
        """One optimiser step at `lr_factor` x the base rates, with the recipe's gradient clipping."""
        apply_lr(self.optimizer, self.base_lrs, lr_factor)
        if self.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trained_params, self.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def update_ema(ema: AveragedModel, model: nn.Module, decay: float) -> None:
    """One EMA step with timm's warm-up (early on, the average follows the weights faster). Not
    `AveragedModel.update_parameters`, which reads its count back from the device at every step; the count
    stays on the host here."""
    n = int(ema.n_averaged)
    averaged = [*ema.module.parameters(), *ema.module.buffers()]
    current = [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()] if n else []
        if floats:
            weight = 1 - min(decay, (1 + n) / (10 + n))
            torch._foreach_lerp_([a for a, _ in floats], [c.detach() for _, c in floats], weight)
        for a, c in zip(averaged, current):
            if not n or not a.is_floating_point():
                a.copy_(c.detach())
    ema.n_averaged += 1
