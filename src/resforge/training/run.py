"""The run stage: a config in, a trained, evaluated and reported run directory out.

`run` is what `resforge train` does from start to end (or from a killed run's checkpoint): the
processes (DDP when `devices` > 1), the trainer's epochs, then `finish`, which evaluates the best
model on the val and test splits as the task loads it (a classifier through the same `Predictor` that
serves it), draws the plots and writes `results.json` and `report.md`. Compression's fine-tunes end the same way
(`complete`), so every run directory holds the same files whatever made it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..device import precision_name
from ..errors import ConfigError
from ..evaluation.plots import plot_history
from ..io import write_json
from ..models.summary import summarize
from ..report import kept_epoch, write_run_report
from . import distributed
from .sparsity import write_report as write_sparsity_report
from .sparsity import zip_bytes
from .trainer import Callback, Trainer

log = logging.getLogger("resforge")


@dataclass
class RunResult:
    """A finished run: its summary (epochs, best epoch, history, ...), each split's report, and report.md."""

    run_dir: Path
    summary: dict[str, Any]
    results: dict[str, Any]
    report: Path

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary, "report": str(self.report), "results": {k: r.to_dict() for k, r in self.results.items()}}


def run(cfg: Config | None = None, *, resume: str | os.PathLike | None = None,
        overrides: dict[str, Any] | None = None, callbacks: list[Callback] = (), progress: bool = True,
        devices: int = 1) -> RunResult | dict[str, Any]:
    """Train `cfg` (or continue the run in `resume`, changing only `overrides`) and finish it. With `devices`
    > 1 it runs in that many processes; under torchrun, in the launcher's. Processes other than the first
    return the trainer's summary only: the first alone evaluates and writes."""
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"devices must be a whole number of processes, at least 1, got {devices!r}")
    if (cfg is None) == (resume is None):
        raise ConfigError("give a config to train, or a run directory to resume")
    if devices > 1 and not distributed.launched():
        return distributed.launch(run, dict(cfg=cfg, resume=resume, overrides=overrides, callbacks=callbacks,
                                            progress=progress), devices)
    try:
        if resume is not None:
            trainer = Trainer.resume(resume, overrides, callbacks=callbacks, progress=progress)
        else:
            trainer = Trainer(cfg, callbacks=callbacks, progress=progress)
        return complete(trainer)
    finally:
        distributed.leave()


def complete(trainer: Trainer) -> RunResult | dict[str, Any]:
    """Fit the trainer, then finish the run in the process that writes it."""
    summary = trainer.fit()
    return finish(trainer, summary) if trainer.world.main else summary


def finish(trainer: Trainer, summary: dict[str, Any]) -> RunResult:
    """Evaluate the best model on val (and test), draw the plots, write results.json and report.md."""
    run_dir, cfg, task = trainer.run_dir, trainer.cfg, trainer.task
    precision = precision_name(trainer.amp_dtype)
    best = task.load_best(run_dir / "best.safetensors", trainer.device, precision)
    results = {split: task.evaluate(best, samples, run_dir, split, cfg.data.batch_size, cfg.data.workers)
               for split in ("val", "test") if (samples := getattr(trainer.scan, split))}
    task.profile(best, trainer.scan, run_dir / "best.safetensors", cfg.data.batch_size)
    plot_history(summary["history"], run_dir / "plots" / "history.png", k=min(5, len(trainer.classes)))
    model_summary = summarize(best.model, cfg.data.img_size, cfg.model.name)
    if cfg.train.sparsity:
        rows = write_sparsity_report(best.model, run_dir / "sparsity.csv")
        log.info("sparsity %.1f%% of %s weights (per layer: %s); compressed %.2f MB (dense runtimes run it no "
                 "faster)", 100 * rows[-1]["sparsity"], f"{rows[-1]['weights']:,}", run_dir / "sparsity.csv",
                 zip_bytes(best.model) / 1e6)
    summary = {**summary, "lr": trainer.lr, "device": str(trainer.device), "precision": precision}
    write_json(run_dir / "results.json", {"summary": {k: v for k, v in summary.items() if k != "history"},
                                          **{k: r.to_dict() for k, r in results.items()}})
    report = write_run_report(run_dir, cfg, task, trainer.scan, summary, model_summary, results)
    log.info("")
    log.info("run %s: %d epochs, %s, %.1f min", run_dir, summary["epochs"],
             kept_epoch(summary, cfg.train.metric, cfg.train.keep), summary["train_time_s"] / 60)
    for name, r in results.items():
        log.info("  %s", task.result_line(name, r))
    log.info("report: %s", report)
    return RunResult(Path(run_dir), summary, results, report)
