"""Evaluate a saved model on labelled images; predict on unlabelled ones.

Both rebuild the preprocessing from the model's sidecar, so they see images exactly as
validation did during training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.folder import ImageFolderScan, Sample, load_image, scan_folder
from ..data.loader import ImageDataset, make_loader, resolve_workers
from ..data.transforms import Preprocess, eval_transform
from ..errors import CheckpointError, DataError
from ..io import write_json
from ..models.weights import load_model
from .metrics import ClassificationReport, classification_report, most_confident_mistakes
from .plots import plot_confusion, plot_image_grid
from .runner import TTA_MODES, TenCropViews, infer

GRID_IMAGES = 16


@dataclass
class LoadedModel:
    """A saved model with what it needs to be used: its classes and its preprocessing."""

    model: nn.Module
    classes: list[str]
    pre: Preprocess
    meta: dict[str, Any]

    @classmethod
    def load(cls, source: str | os.PathLike, device: torch.device) -> LoadedModel:
        model, meta = load_model(source)
        if not {"classes", "preprocess"} <= meta.keys():
            raise CheckpointError(f"{source} has no classes or preprocessing in its sidecar: it was not saved by "
                                  "a training run, so it cannot classify images as it is")
        classes = meta["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise CheckpointError(f"the sidecar of {source} has no list of class names")
        if len(classes) != model.num_classes:
            raise CheckpointError(f"the sidecar of {source} names {len(classes)} classes but the model has "
                                  f"{model.num_classes} outputs")
        try:
            pre = Preprocess.from_dict(meta["preprocess"])
        except ValueError as e:
            raise CheckpointError(f"the sidecar of {source} has unusable preprocessing: {e}") from None
        if pre.in_chans != model.stem_conv.in_channels:
            raise CheckpointError(f"the sidecar of {source} feeds {pre.in_chans} channel(s) to a model that "
                                  f"takes {model.stem_conv.in_channels}")
        model = model.to(device, memory_format=torch.channels_last)
        return cls(model, classes, pre, meta)


def thumbnail(path: str, mode: str, size: int = 112) -> np.ndarray:
    im = load_image(path, mode)
    im.thumbnail((size, size))
    return np.asarray(im)


def labelled_samples(root: str | os.PathLike, classes: list[str]) -> tuple[list[Sample], ImageFolderScan]:
    """Images of a class-folder tree (or its test, else val split) labelled with the model's class indices,
    and the scan (whose `skipped` lists the unreadable files)."""
    scan = scan_folder(root, val_split=0.0, strict=False)
    unknown = [c for c in scan.classes if c not in classes]
    if unknown:
        raise DataError(f"{root} has classes the model does not know: {', '.join(unknown)} "
                        f"(the model's classes: {', '.join(classes)})")
    samples = scan.test or scan.val or scan.train
    index = [classes.index(c) for c in scan.classes]
    return [(p, index[label]) for p, label in samples], scan


def evaluate_samples(lm: LoadedModel, samples: list[Sample], out_dir: str | os.PathLike, *, name: str = "eval",
                     device: torch.device, amp_dtype: torch.dtype | None = None, batch_size: int = 64,
                     workers: int = -1, tta: str | None = None) -> ClassificationReport:
    """Metrics, confusion matrix (PNG + CSV), a grid of predictions and one of confident mistakes."""
    if tta is not None and tta not in TTA_MODES:
        raise DataError(f"unknown test-time augmentation {tta!r}; choose {' or '.join(TTA_MODES)}")
    out_dir = Path(out_dir)
    transform = TenCropViews(lm.pre) if tta == "multicrop" else eval_transform(lm.pre)
    ds = ImageDataset(samples, transform, lm.pre)
    loader = make_loader(ds, batch_size, train=False, workers=resolve_workers(workers), seed=0)
    logits, targets = infer(lm.model, loader, device, amp_dtype, flip=tta == "flip")
    probs = logits.softmax(-1).numpy()
    report = classification_report(probs, targets.numpy(), lm.classes)
    plot_confusion(report.confusion, lm.classes, out_dir / "plots" / f"confusion_{name}.png")
    report.write_confusion_csv(out_dir / f"confusion_{name}.csv")
    write_json(out_dir / f"metrics_{name}.json", {**report.to_dict(), "tta": tta})

    pred = probs.argmax(1)
    shown = np.random.default_rng(0).permutation(len(samples))[:GRID_IMAGES]
    _grid(lm, samples, shown, probs, pred, out_dir / "plots" / f"predictions_{name}.png",
          f"{name}: predictions (green right, red wrong)")
    wrong = most_confident_mistakes(probs, targets.numpy(), GRID_IMAGES)
    if len(wrong):
        _grid(lm, samples, wrong, probs, pred, out_dir / "plots" / f"mistakes_{name}.png",
              f"{name}: most confident mistakes")
    return report


def _grid(lm: LoadedModel, samples: list[Sample], idx: np.ndarray, probs: np.ndarray, pred: np.ndarray,
          path: Path, title: str) -> None:
    images = [thumbnail(samples[i][0], lm.pre.mode) for i in idx]
    titles = [f"true: {lm.classes[samples[i][1]]}\npred: {lm.classes[pred[i]]} ({probs[i, pred[i]]:.0%})"
              for i in idx]
    colors = ["green" if pred[i] == samples[i][1] else "red" for i in idx]
    plot_image_grid(images, titles, path, colors=colors, suptitle=title)


def predict_paths(lm: LoadedModel, paths: list[str], *, device: torch.device, topk: int = 5,
                  batch_size: int = 64, amp_dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """Top-k classes per image; an unreadable file gets an error entry instead of stopping the rest."""
    ds = ImageDataset([(p, -1) for p in paths], eval_transform(lm.pre), lm.pre)
    rows: dict[str, dict[str, Any]] = {}
    readable: list[str] = []

    def batches():  # decodes each file once, in order, setting unreadable ones aside
        xs = []
        for i, p in enumerate(paths):
            try:
                xs.append(ds[i][0])
            except DataError as e:
                rows[p] = {"path": p, "error": str(e).removeprefix(f"{p}: ")}
                continue
            readable.append(p)
            if len(xs) == batch_size:
                yield torch.stack(xs), torch.zeros(len(xs), dtype=torch.long)
                xs = []
        if xs:
            yield torch.stack(xs), torch.zeros(len(xs), dtype=torch.long)

    logits, _ = infer(lm.model, batches(), device, amp_dtype)
    if readable:
        top = logits.softmax(-1).topk(min(topk, len(lm.classes)), dim=-1)
        for p, vals, ids in zip(readable, top.values.tolist(), top.indices.tolist()):
            rows[p] = {"path": p, "top": [{"class": lm.classes[i], "prob": v} for i, v in zip(ids, vals)]}
    return [rows[p] for p in paths]


def format_predictions(rows: list[dict[str, Any]], fmt: str) -> str:
    """As an aligned table, CSV (one row per image and rank) or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "rank", "class", "prob", "error"])
        for r in rows:
            if "error" in r:
                w.writerow([r["path"], "", "", "", r["error"]])
            for rank, t in enumerate(r.get("top", []), 1):
                w.writerow([r["path"], rank, t["class"], f"{t['prob']:.6f}", ""])
        return buf.getvalue()
    width = max(len(r["path"]) for r in rows)
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['path']:<{width}}  error: {r['error']}")
        else:
            lines.append(f"{r['path']:<{width}}  " + "  ".join(f"{t['class']} {t['prob']:.1%}" for t in r["top"]))
    return "\n".join(lines)
