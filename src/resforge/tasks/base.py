"""What a task tells the training run, the evaluation and the reports; everything else is shared."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import Config
from ..data.folder import ImageFolderScan
from ..data.transforms import Preprocess

Forward = Callable[[Any], Any]  # validation's forward pass: a batch in, the model's outputs


@dataclass
class Datasets:
    """A run's training and validation sets; `decoder` finishes training batches on the GPU (data.decode gpu);
    `train_collate`/`val_collate` make a batch of samples (None: torch's stacking); `cacheable` are the sets
    that may be kept in memory decoded (`data.cache`)."""

    train: Dataset
    val: Dataset
    decoder: Callable[[Any], torch.Tensor] | None = None
    train_collate: Callable[[list], Any] | None = None
    val_collate: Callable[[list], Any] | None = None
    cacheable: list[Dataset] = field(default_factory=list)


class Task(ABC):
    """One kind of prediction. Figures are named as `metrics.csv` names them: `train_<figure>` for the running
    training figures, `<prefix>_<metric>` for validation (prefix `val`, or `ema_val` for the EMA weights)."""

    name: ClassVar[str]
    train_figures: ClassVar[tuple[str, ...]]  # sums over a batch's samples, averaged over the epoch
    metrics: ClassVar[tuple[str, ...]]  # what train.metric may pick the best epoch by; the first unless it is set

    @abstractmethod
    def build_model(self, cfg: Config, num_classes: int, pretrained: bool = True) -> nn.Module:
        """A new network for `num_classes` as `cfg.model` describes it, with `cfg.model.pretrained`'s weights unless
        `pretrained` is False (a probe: the meta-device check of the options, the pace measure)."""

    @abstractmethod
    def adopt_init(self, cfg: Config) -> tuple[nn.Module, dict[str, Any]] | None:
        """`model.init_from`'s saved model, its architecture (and, for a classifier, its input options) set in
        `cfg` unless given; the model and its record when the trainer starts from it as it is, else None (the
        task's `build_model` takes what it needs from it)."""

    @abstractmethod
    def scan(self, cfg: Config, split_csv: str | os.PathLike | None) -> ImageFolderScan:
        """The folder's samples by split (or the split a run recorded), with what was skipped and why."""

    @abstractmethod
    def datasets(self, cfg: Config, scan: ImageFolderScan, pre: Preprocess, device: torch.device) -> Datasets:
        ...

    def train_call(self, forward: nn.Module, x: Any, y: Any) -> Any:
        """The training forward pass of a prepared batch (a classifier sees only the images)."""
        return forward(x)

    @abstractmethod
    def random_batch(self, cfg: Config, num_classes: int, device: torch.device) -> tuple[Any, Any]:
        """A batch of `cfg.data.batch_size` random samples, as the loader gives them: what the pace is timed on."""

    @abstractmethod
    def fit_recipe(self, cfg: Config, scan: Any, pace: Callable[[Config], float]) -> dict[str, str]:
        """The auto recipe: what the user left unset, chosen from the data and the measured pace (`pace(cfg)`
        images/s), set in `cfg`; returns each choice's reason by option."""

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
    def batch_figures(self, outputs: Any, targets: Any) -> torch.Tensor:
        """Sums over the batch of each of `train_figures`, on the device (read back only now and then); no
        gradient flows back through them."""

    @abstractmethod
    def validate(self, forward: Forward, loader: Any, prefix: str, world: Any) -> dict[str, float]:
        """The validation metrics of one model over every process's share of the split, named `<prefix>_...`."""

    @abstractmethod
    def epoch_line(self, row: dict[str, float], num_classes: int) -> str:
        """An epoch's figures for the log, beside the shared ones (epoch, learning rate, pace)."""

    def record(self, cfg: Config) -> dict[str, Any]:
        """What a saved model's record keeps beside what every task's does, for whoever uses the model later."""
        return {}

    @abstractmethod
    def load_best(self, path: Path, device: torch.device, precision: str) -> Any:
        """The run's saved best model, ready for `evaluate` on `device` at `precision`."""

    @abstractmethod
    def evaluate(self, predictor: Any, samples: list, out_dir: Path, name: str, batch_size: int,
                 workers: int) -> Any:
        """The finished run's evaluation of its best model on one split: metrics, plots, files."""

    def profile(self, predictor: Any, scan: Any, best: Path, batch_size: int) -> None:
        """Record in the saved model `best` what monitoring it in service compares with (a classifier's
        `runtime.profile`); nothing for a task without one."""

    @abstractmethod
    def report_data(self, cfg: Config, scan: Any) -> list[str]:
        """report.md's lines on the data: the folder, its splits, what was skipped."""

    @abstractmethod
    def report_results(self, results: dict[str, Any], run_dir: Path) -> list[str]:
        """report.md's lines on each split's results, with their plots."""

    @abstractmethod
    def result_line(self, name: str, report: Any) -> str:
        """One line of a split's results for the run's closing summary."""
