"""Semantic-segmentation figures from one pixel confusion matrix accumulated over a whole split.

Accumulating first and dividing once (as torchvision's reference and mmseg do) weighs every pixel alike; a
mean of per-image IoUs would let a small image with one stray pixel count as much as a large one. A class with
no pixel in the ground truth nor in the predictions has no IoU and is left out of the means.
"""

from __future__ import annotations

from typing import Any

import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """K x K counts (rows: ground truth, columns: prediction) of the pixels whose target is not ignored."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(matrix: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy, mean Dice, and IoU and Dice per class (None where a class is absent from both the
    ground truth and the predictions) from a confusion matrix."""
    m = matrix.double()
    tp, truth, predicted = m.diag(), m.sum(1), m.sum(0)
    union = truth + predicted - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
    dice = torch.where(present, 2 * tp / (truth + predicted).clamp(min=1), torch.nan)
    total = m.sum()

    def mean(v: torch.Tensor) -> float:
        return float(v[present].mean()) if present.any() else 0.0

    def per_class(v: torch.Tensor) -> dict[str, float | None]:
        return {c: (None if torch.isnan(x) else float(x)) for c, x in zip(classes, v)}

    return {"miou": mean(iou), "pixel_acc": float(tp.sum() / total) if total else 0.0, "dice": mean(dice),
            "iou": per_class(iou), "dice_per_class": per_class(dice), "pixels": int(total),
            "confusion": matrix.tolist()}
