"""Evaluate a model on labelled images, through the same Predictor that predicts, benchmarks and serves.

The preprocessing comes from the model's own record (sidecar or file metadata), so evaluation sees
images exactly as validation did during training, whatever the backend.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.folder import ImageFolderScan, Sample, scan_folder, thumbnail
from ..errors import DataError
from ..io import write_json
from ..runtime.predictor import Predictor
from .metrics import ClassificationReport, classification_report, most_confident_mistakes
from .plots import plot_confusion, plot_image_grid

GRID_IMAGES = 16
PREDICTION_FORMATS = ("table", "csv", "json")  # what format_predictions writes


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


def evaluate_samples(predictor: Predictor, samples: list[Sample], out_dir: str | os.PathLike, *, name: str = "eval",
                     batch_size: int, workers: int, tta: str | None = None) -> ClassificationReport:
    """Metrics, confusion matrix (PNG + CSV), a grid of predictions and one of confident mistakes."""
    logits, targets = predictor.infer(samples, batch_size, workers, tta)
    out_dir = Path(out_dir)
    probs = logits.softmax(-1).numpy()
    report = classification_report(probs, targets.numpy(), predictor.classes)
    plot_confusion(report.confusion, predictor.classes, out_dir / "plots" / f"confusion_{name}.png")
    report.write_confusion_csv(out_dir / f"confusion_{name}.csv")
    write_json(out_dir / f"metrics_{name}.json", {**report.to_dict(), "tta": tta})

    pred = probs.argmax(1)
    shown = np.random.default_rng(0).permutation(len(samples))[:GRID_IMAGES]
    _grid(predictor, samples, shown, probs, pred, out_dir / "plots" / f"predictions_{name}.png",
          f"{name}: predictions (green right, red wrong)")
    wrong = most_confident_mistakes(probs, targets.numpy(), GRID_IMAGES)
    if len(wrong):
        _grid(predictor, samples, wrong, probs, pred, out_dir / "plots" / f"mistakes_{name}.png",
              f"{name}: most confident mistakes")
    return report


def _grid(predictor: Predictor, samples: list[Sample], idx: np.ndarray, probs: np.ndarray, pred: np.ndarray,
          path: Path, title: str) -> None:
    classes = predictor.classes
    images = [thumbnail(samples[i][0], predictor.pre.mode) for i in idx]
    titles = [f"true: {classes[samples[i][1]]}\npred: {classes[pred[i]]} ({probs[i, pred[i]]:.0%})"
              for i in idx]
    colors = ["green" if pred[i] == samples[i][1] else "red" for i in idx]
    plot_image_grid(images, titles, path, colors=colors, suptitle=title)


def format_predictions(rows: list[dict[str, Any]], fmt: str) -> str:
    """As an aligned table, CSV (one row per image and rank, per object of a detector, per class of a segmenter's
    mask) or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    boxes = any("objects" in r for r in rows)
    masks = any("mask" in r for r in rows)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        ood = any("ood" in r for r in rows)
        header = (["path", "class", "score", "x1", "y1", "x2", "y2"] if boxes else
                  ["path", "mask", "class", "share"] if masks else
                  ["path", "rank", "class", "prob"] + (["ood_score", "ood_flagged"] if ood else []))
        w.writerow(header + ["error"])
        for r in rows:
            if "error" in r:
                w.writerow([r["path"]] + [""] * (len(header) - 1) + [r["error"]])
            for rank, t in enumerate(r.get("top", []), 1):
                verdict = [f"{r['ood']['score']:.4f}", int(r["ood"]["flagged"])] if ood else []
                w.writerow([r["path"], rank, t["class"], f"{t['prob']:.6f}", *verdict, ""])
            for t in r.get("objects", []):
                w.writerow([r["path"], t["class"], f"{t['score']:.4f}", *t["box"], ""])
            for c, share in r.get("pixels", {}).items():
                w.writerow([r["path"], r["mask"], c, f"{share:.4f}", ""])
        return buf.getvalue()
    width = max(len(r["path"]) for r in rows)
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['path']:<{width}}  error: {r['error']}")
        elif boxes:
            found = ", ".join(f"{t['class']} {t['score']:.2f} at {','.join(f'{v:g}' for v in t['box'])}"
                              for t in r["objects"])
            lines.append(f"{r['path']:<{width}}  {len(r['objects'])} object(s)" + (f": {found}" if found else ""))
        elif masks:
            shares = sorted(r["pixels"].items(), key=lambda kv: -kv[1])
            lines.append(f"{r['path']:<{width}}  {r['mask']}: " + ", ".join(f"{c} {v:.1%}" for c, v in shares))
        else:
            flag = "  [out of distribution]" if r.get("ood", {}).get("flagged") else ""
            lines.append(f"{r['path']:<{width}}  " + "  ".join(f"{t['class']} {t['prob']:.1%}" for t in r["top"])
                         + flag)
    return "\n".join(lines)
