"""`report.md` of a run: what went in, what came out, how good it is, on one page."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import Config
from .io import write_text
from .models.summary import ModelSummary


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def images_per_second(rows: list[dict[str, Any]]) -> float:
    """Training images over training time, all epochs together (a mean of per-epoch rates overweights short,
    fast epochs)."""
    images = sum(r.get("train_images", r["img_per_s"] * r["train_time_s"]) for r in rows)
    return images / max(1e-9, sum(r["train_time_s"] for r in rows))


def write_run_report(run_dir: str | os.PathLike, cfg: Config, task: Any, scan: Any, summary: dict[str, Any],
                     model: ModelSummary, results: dict[str, Any]) -> Path:
    """The page, its data and results sections as the run's task (`tasks.Task`) writes them."""
    run_dir = Path(run_dir)
    o, t, a, d = cfg.optim, cfg.train, cfg.augment, cfg.data
    rows = summary["history"]
    speed = images_per_second(rows)
    out = [f"# {run_dir.name}", ""]
    out += ["## Data", "", *task.report_data(cfg, scan)]
    out += ["## Model", "",
            f"- `{cfg.model.name}` at {d.img_size} px, {d.in_chans} channel(s): {model.params:,} parameters, "
            f"{model.macs / 1e9:.3g} GMACs per image",
            f"- weights: {cfg.model.pretrained or 'random initialisation'}", ""]
    out += ["## Recipe", "",
            f"- recipe `{cfg.recipe or 'defaults'}` (full config in `config.yaml`)"]
    if cfg.auto:
        out += ["- chosen by the auto recipe (anything you set wins):"] + [f"  - {r}" for r in cfg.auto.values()]
    out += [
            f"- {o.optimizer}, peak lr {summary['lr']:.3g}, schedule {o.schedule} (warm-up {o.warmup_epochs:g} "
            f"epochs), weight decay {o.weight_decay:g}, batch {d.batch_size}x{o.accum_steps}",
            f"- augmentation `{a.preset}`" + (f", mixup {a.mixup:g}" if a.mixup else "")
            + (f", cutmix {a.cutmix:g}" if a.cutmix else "")
            + f"; label smoothing {t.label_smoothing:g}; EMA {'on' if t.ema else 'off'}; "
            f"precision {summary['precision']}; freeze {', '.join(o.freeze) or 'none'}", ""]
    stop = " (stopped early)" if summary["stopped_early"] else ""
    out += ["## Training", "",
            f"- {summary['epochs']} of {t.epochs} epochs{stop} in {summary['train_time_s'] / 60:.1f} min, "
            f"{speed:.0f} training images/s on {summary['device']}",
            f"- {kept_epoch(summary, t.metric, t.keep)} -> `best.safetensors` + `best.json`", "",
            "![history](plots/history.png)", ""]
    out += ["## Results", "", *task.report_results(results, run_dir)]
    path = run_dir / "report.md"
    write_text(path, "\n".join(out))
    return path


def kept_epoch(summary: dict[str, Any], metric: str, keep: str) -> str:
    """Which epoch's weights a run kept, and why: "best epoch 7 by val_top1, ema weights"."""
    why = f"by {metric}" if keep == "best" else "(train.keep last)"
    return f"{keep} epoch {summary['best_epoch']} {why}, {summary['best_weights']} weights"
