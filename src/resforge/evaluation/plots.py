"""Figures of a run, drawn on bare `Figure` objects (no pyplot: no global state, safe in threads and headless).

Each function writes one PNG through `atomic_path`, so a crash mid-drawing keeps the previous file.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ..io import atomic_path

log = logging.getLogger("resforge")

DPI = 110
_HISTORY_PANELS = (("loss", ("train_loss", "val_loss", "ema_val_loss")),
                   ("accuracy", ("val_top1", "ema_val_top1", "val_top5", "val_map", "val_map50", "ema_val_map50")),
                   ("learning rate", ("lr",)))


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    from matplotlib import ft2font

    try:
        return frozenset(ft2font.FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


@functools.lru_cache(maxsize=None)
def _font_for(chars: frozenset[int]) -> str | None:
    """The name of an installed font that has every one of `chars`, or None."""
    from matplotlib import font_manager

    for entry in font_manager.fontManager.ttflist:
        if chars <= _charmap(entry.fname):
            return entry.name
    return None


_warned: set[frozenset[int]] = set()


@contextlib.contextmanager
def _fonts_for(texts: list[str]) -> Iterator[list[str]]:
    """Labels as the figure can draw them: a font that has their characters joins the default one;
    when no installed font has them, they are written as U+XXXX, and that is said once, not drawn as boxes."""
    from matplotlib import font_manager

    base = font_manager.findfont(matplotlib.rcParams["font.sans-serif"][0])
    missing = frozenset(ord(c) for t in texts for c in t if c.isprintable() and not c.isspace()) - _charmap(base)
    extra = _font_for(missing) if missing else None
    if extra is not None:
        with matplotlib.rc_context({"font.family": ["sans-serif", extra]}):
            yield texts
        return
    if missing and missing not in _warned:
        _warned.add(missing)
        log.warning("no installed font has the characters %s of the class names: plots write them as U+XXXX "
                    "(install a font that has them, e.g. Debian's fonts-noto-cjk)",
                    "".join(sorted(map(chr, missing)))[:20])
    yield ["".join(c if ord(c) not in missing else f"<U+{ord(c):04X}>" for c in t) for t in texts]


def _number(value: float | str | None) -> float | None:
    """A finite float, or None for a missing, empty (as read from a CSV) or NaN entry."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def plot_history(rows: list[dict[str, float]], path: str | os.PathLike, k: int = 5) -> Path:
    """Loss, accuracy and learning rate per epoch; a series absent or NaN in some rows is drawn where present.
    `k`: what `val_top5` holds (top-k with k = min(5, classes)), named so in the legend."""
    if not rows:
        raise ValueError("no epochs to plot")
    fig = Figure(figsize=(15, 4), layout="constrained")
    for ax, (title, keys) in zip(fig.subplots(1, len(_HISTORY_PANELS)), _HISTORY_PANELS):
        for key in keys:
            points = [(_number(r.get("epoch", i + 1)), _number(r.get(key))) for i, r in enumerate(rows)]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key.replace("top5", f"top{k}"))
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        if title == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return _save(fig, path)


def plot_confusion(confusion: np.ndarray, classes: list[str], path: str | os.PathLike,
                   normalize: bool = True) -> Path:
    """Heat map, rows true and columns predicted; `normalize` shows each true class's row as fractions."""
    confusion = np.asarray(confusion)
    n = len(classes)
    if confusion.shape != (n, n):
        raise ValueError(f"confusion matrix must be {n}x{n} for {n} classes, got {list(confusion.shape)}")
    rows = confusion.sum(1, keepdims=True)
    values = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows != 0) if normalize else confusion
    side = min(3 + 0.45 * n, 18)
    fontsize = min(9.0, 45 * side / n)  # about 60% of a cell's height in points
    with _fonts_for(list(classes)) as labels:
        return _draw_confusion(values, labels, path, normalize, side, fontsize)


def _draw_confusion(values: np.ndarray, classes: list[str], path: str | os.PathLike, normalize: bool, side: float,
                    fontsize: float) -> Path:
    n = len(classes)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else max(values.max(), 1))
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticks(range(n), classes, fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="true",
           title="confusion matrix" + (" (fraction of each true class)" if normalize else " (counts)"))
    if n <= 20:
        dark = 0.5 * im.norm.vmax
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=8,
                    color="white" if v > dark else "black")
    return _save(fig, path)


def plot_image_grid(images: list[np.ndarray], titles: list[str], path: str | os.PathLike,
                    colors: list[str | None] | None = None, ncols: int | None = None,
                    suptitle: str | None = None) -> Path:
    """Tiles of HxW (grayscale) or HxWx3 uint8 images, each titled, the title coloured by `colors`."""
    if not images:
        raise ValueError("no images to plot")
    colors = colors or [None] * len(images)
    if not len(titles) == len(colors) == len(images):
        raise ValueError(f"{len(images)} images need as many titles and colours, "
                         f"got {len(titles)} and {len(colors)}")
    with _fonts_for([*titles, suptitle or ""]) as shown:
        return _draw_grid(images, shown[:-1], path, colors, ncols, shown[-1] or None)


def _draw_grid(images: list[np.ndarray], titles: list[str], path: str | os.PathLike, colors: list[str | None],
               ncols: int | None, suptitle: str | None) -> Path:
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    fig = Figure(figsize=(2.2 * ncols, 2.5 * nrows + (0.4 if suptitle else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, title, color in zip(axes, images, titles, colors):
        gray = image.ndim == 2
        ax.imshow(image, cmap="gray" if gray else None, vmin=0 if gray else None, vmax=255 if gray else None)
        ax.set_title(title, fontsize=8, color=color or "black")
    if suptitle:
        fig.suptitle(suptitle)
    return _save(fig, path)


def plot_lr_find(lrs: list[float], losses: list[float], suggestion: float | None, path: str | os.PathLike) -> Path:
    """Loss against learning rate (log axis), the suggested rate marked; diverged (infinite) losses are left out."""
    if not lrs or len(lrs) != len(losses):
        raise ValueError(f"need as many losses as learning rates (at least one), got {len(lrs)} and {len(losses)}")
    losses_arr = np.asarray(losses, dtype=float)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(lrs, np.where(np.isfinite(losses_arr), losses_arr, np.nan))
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="loss", title="learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.2e}")
        ax.legend()
    return _save(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other beats on both cost (lower) and accuracy (higher), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(variants: list[dict], path: str | os.PathLike, metric: str = "top-1") -> Path:
    """The score (top-1, mIoU, AP@.5) against latency at batch 1 and against file size, each variant labelled, the
    front joined."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    for ax, key, label in zip(fig.subplots(1, 2), ("latency_ms", "file_mb"), ("latency at batch 1 (ms)", "file (MB)")):
        points = [(v[key], 100 * v["score"]) for v in variants]
        ax.scatter(*zip(*points), color="tab:blue", zorder=3)
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", alpha=0.6,
                label="Pareto front")
        for v, (x, y) in zip(variants, points):
            ax.annotate(f"{v['name']} {v['backend']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel=label, ylabel=f"{metric} (%)", xscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("accuracy against cost, every variant")
    return _save(fig, path)


def plot_pr_curves(curves: dict[str, list[float]], path: str | os.PathLike) -> Path:
    """Precision against recall at IoU 0.5, one curve per class (COCO's 101 recall points), AP50 in the legend."""
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    recall = np.linspace(0, 1, 101)
    with _fonts_for(list(curves)) as names:
        for name, precision in zip(names, curves.values()):
            ax.plot(recall, precision, label=f"{name} (AP50 {np.mean(precision):.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="precision-recall at IoU 0.5")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)
