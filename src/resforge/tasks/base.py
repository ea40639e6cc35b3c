"""What a task tells the training run, the evaluation and the reports; everything else is shared."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import Config
from ..data.folder import ImageFolderScan
from ..data.transforms import Preprocess

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Datasets:
    """A run's training and validation sets; `decoder` finishes training batches on the GPU (data.decode gpu)."""

    train: Dataset
    val: Dataset
    decoder: Callable[[Any], torch.Tensor] | None = None


class Task(ABC):
    """One kind of prediction. Figures are named as `metrics.csv` names them: `train_<figure>` for the running
    training figures, `<prefix>_<metric>` for validation (prefix `val`, or `ema_val` for the EMA weights)."""

    name: ClassVar[str]
    train_figures: ClassVar[tuple[str, ...]]  # sums over a batch's samples, averaged over the epoch

    @abstractmethod
    def build_model(self, cfg: Config, num_classes: int, pretrained: bool = True) -> nn.Module:
        """A new network for `num_classes` as `cfg.model` describes it, with `cfg.model.pretrained`'s weights unless
        `pretrained` is False (a probe: the meta-device check of the options, the pace measure)."""

    @abstractmethod
    def scan(self, cfg: Config, split_csv: str | os.PathLike | None) -> ImageFolderScan:
        """The folder's samples by split (or the split a run recorded), with what was skipped and why."""

    @abstractmethod
    def datasets(self, cfg: Config, scan: ImageFolderScan, pre: Preprocess, device: torch.device) -> Datasets:
        ...

    @abstractmethod
    def batch_transform(self, cfg: Config, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor],
                                                                          tuple[torch.Tensor, torch.Tensor]]:
        """What is done to a whole batch on the device before the forward pass (e.g. MixUp)."""

    @abstractmethod
    def criterion(self, cfg: Config, classes: list[str], pre: Preprocess | None, device: torch.device,
                  amp_dtype: torch.dtype | None, memory_format: torch.memory_format) -> nn.Module:
        """The loss, called as `loss(outputs, targets, images)`. `pre` None: the run's preprocessing is not yet
        known (the pace is being measured), so checks against it wait."""

    @abstractmethod
    def batch_figures(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sums over the batch of each of `train_figures`, on the device (read back only now and then)."""

    @abstractmethod
    def validate(self, forward: Forward, loader: Any, prefix: str, world: Any) -> dict[str, float]:
        """The validation metrics of one model over every process's share of the split, named `<prefix>_...`."""

    @abstractmethod
    def epoch_line(self, row: dict[str, float], num_classes: int) -> str:
        """An epoch's figures for the log, beside the shared ones (epoch, learning rate, pace)."""

    @abstractmethod
    def evaluate(self, predictor: Any, samples: list, out_dir: Path, name: str, batch_size: int,
                 workers: int) -> Any:
        """The finished run's evaluation of its best model on one split: metrics, plots, files."""

    @abstractmethod
    def result_line(self, name: str, report: Any) -> str:
        """One line of a split's results for the run's closing summary."""
