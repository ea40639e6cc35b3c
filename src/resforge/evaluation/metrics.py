"""Top-k accuracy, confusion matrix and per-class precision/recall/F1, in numpy and torch only.

Ties between scores go to the lower class index, as `argmax` does, so a model that outputs the same
score for every class is right only for class 0 and never scores 100% by accident.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..io import write_csv

_AVERAGED = ("precision", "recall", "f1")


@dataclass
class ClassificationReport:
    """Metrics of one evaluation; `top5` is top-k accuracy with k = min(5, number of classes)."""

    classes: list[str]
    num_samples: int
    top1: float
    top5: float
    confusion: np.ndarray  # [C, C] int64, rows = true class, columns = predicted class
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray

    @property
    def k(self) -> int:
        """The k of `top5`: 5, or the class count when there are fewer classes."""
        return min(5, len(self.classes))

    @property
    def macro(self) -> dict[str, float]:
        """Unweighted mean over all classes, absent ones included (as scikit-learn with `labels=`)."""
        return {m: float(getattr(self, m).mean()) for m in _AVERAGED}

    @property
    def weighted(self) -> dict[str, float]:
        """Mean weighted by support: dominated by the large classes."""
        return {m: float(np.average(getattr(self, m), weights=self.support)) for m in _AVERAGED}

    def to_dict(self) -> dict:
        per_class = {c: {"precision": float(self.precision[i]), "recall": float(self.recall[i]),
                         "f1": float(self.f1[i]), "support": int(self.support[i])}
                     for i, c in enumerate(self.classes)}
        return {"num_samples": self.num_samples, "top1": self.top1, "top5": self.top5,
                "macro": self.macro, "weighted": self.weighted, "per_class": per_class,
                "classes": list(self.classes), "confusion": self.confusion.tolist()}

    def to_markdown(self) -> str:
        lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        rows = [(c.replace("|", "\\|"), self.precision[i], self.recall[i], self.f1[i], self.support[i])
                for i, c in enumerate(self.classes)]
        rows += [(f"**{name} avg**", avg["precision"], avg["recall"], avg["f1"], self.num_samples)
                 for name, avg in (("macro", self.macro), ("weighted", self.weighted))]
        lines += [f"| {c} | {p:.3f} | {r:.3f} | {f:.3f} | {int(n)} |" for c, p, r, f, n in rows]
        return "\n".join(lines + ["", f"top-1: {self.top1:.2%}  ", f"top-{self.k}: {self.top5:.2%}"])

    def write_confusion_csv(self, path: str | os.PathLike) -> None:
        write_csv(path, ["true\\pred", *self.classes],
                  ([c, *map(int, row)] for c, row in zip(self.classes, self.confusion)))


def _check(probs: np.ndarray, targets: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    probs, targets = np.asarray(probs), np.asarray(targets)
    if probs.ndim != 2 or (num_classes is not None and probs.shape[1] != num_classes):
        want = f"[N, {num_classes}]" if num_classes is not None else "[N, C]"
        raise ValueError(f"scores must have shape {want}, got {list(probs.shape)}")
    if targets.shape != probs.shape[:1]:
        raise ValueError(f"targets must have shape [{probs.shape[0]}] to match the scores, got {list(targets.shape)}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if len(targets) == 0:
        raise ValueError("no samples to evaluate")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise ValueError(f"targets must lie in [0, {probs.shape[1] - 1}], got {targets.min()}..{targets.max()}")
    if np.isnan(probs).any():
        raise ValueError("scores contain NaN")
    return probs, targets


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, and 0 where b is 0 (scikit-learn's zero_division=0), without a warning."""
    return np.divide(a, b, out=np.zeros(a.shape, dtype=np.float64), where=b != 0)


def classification_report(probs: np.ndarray, targets: np.ndarray, classes: list[str]) -> ClassificationReport:
    """Metrics from scores [N, C] (probabilities or logits: only their order counts) and labels [N]."""
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique")
    probs, targets = _check(probs, targets, len(classes))
    n, c = probs.shape
    confusion = np.bincount(targets * c + probs.argmax(1), minlength=c * c).reshape(c, c).astype(np.int64)
    tp, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    top5 = topk_correct(torch.tensor(probs), torch.tensor(targets), (5,))[5]
    return ClassificationReport(
        classes=list(classes), num_samples=n, top1=float(tp.sum() / n), top5=top5 / n, confusion=confusion,
        precision=_safe_div(tp, predicted), recall=_safe_div(tp, support),
        f1=_safe_div(2 * tp, support + predicted), support=support)


def topk_hits(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many samples have their target among the top k scores, for each k (clipped to the class count), as
    a tensor on the logits' device: nothing waits for the device to finish.

    Soft targets [N, C] (mixup, cutmix) count as their argmax.
    """
    if targets.ndim == 2:
        targets = targets.argmax(1)
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, C] and targets [N] or [N, C], got {list(logits.shape)} "
                         f"and {list(targets.shape)}")
    targets = targets.long()[:, None]
    own = logits.gather(1, targets)
    lower = torch.arange(logits.shape[1], device=logits.device) < targets
    rank = ((logits > own) | ((logits == own) & lower)).sum(1)  # classes ranked above the target
    return torch.stack([(rank < min(k, logits.shape[1])).sum() for k in ks])


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """`topk_hits` as {k: count}."""
    return dict(zip(ks, topk_hits(logits, targets, ks).tolist()))


def most_confident_mistakes(probs: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k wrong predictions with the highest predicted score, most confident first."""
    probs, targets = _check(probs, targets)
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != targets)
    order = np.argsort(-probs[wrong, pred[wrong]], kind="stable")
    return wrong[order[:k]]
