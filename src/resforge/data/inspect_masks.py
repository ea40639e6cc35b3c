"""What a segmentation folder holds, before training on it: images, the pixels of each class (the imbalance that
matters for segmentation), the images each class appears in, what was skipped, and a few images with their masks
laid over them.

Everything comes from `scan_masks`, so the report counts what a run would train on. Figures are drawn on bare
`Figure`s and written through `io.atomic_path`, as inspect_objects draws its own.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..io import atomic_path, write_json
from .folder import DEFAULT_MAX_PIXELS, load_image
from .inspect_objects import reason_kind
from .masks import MaskScan, overlay, palette, sample_mask, scan_masks

SPLITS = ("train", "val", "test")
SAMPLES = 8
DPI = 110


@dataclass
class MasksReport:
    root: str
    reason: str  # the layout found, and where the class names came from
    classes: list[str]
    ignore_index: int
    images: dict[str, int]  # split -> usable images
    pixels: dict[str, list[int]]  # split -> pixels of each class (ignored ones not counted)
    images_with: dict[str, list[int]]  # split -> images in which each class appears
    skipped: int
    skip_reasons: dict[str, int]  # reason without its particulars -> entries

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        lines = [f"{self.root}: {self.reason}", f"{len(self.classes)} classes; value {self.ignore_index} ignored",
                 "split   images  " + "  ".join(f"{c[:12]:>12}" for c in self.classes)]
        for split, n in self.images.items():
            total = max(sum(self.pixels[split]), 1)
            lines.append(f"{split:<7} {n:>6}  " + "  ".join(f"{100 * p / total:>11.1f}%" for p in self.pixels[split]))
        rare = [c for c, p in zip(self.classes, self.pixels.get("train", [])) if 0 < p < 0.01 * sum(
            self.pixels["train"])]
        if rare:
            lines.append(f"rare classes (under 1% of the training pixels): {', '.join(rare)}: --class-weights "
                         "weighs them up")
        absent = [c for c, p in zip(self.classes, self.pixels.get("train", [])) if p == 0]
        if absent:
            lines.append(f"classes with no training pixel: {', '.join(absent)}")
        if self.skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in self.skip_reasons.items())
            lines.append(f"skipped: {self.skipped} ({kinds}); see skipped.csv")
        return "\n".join(lines)


def summarize(scan: MaskScan) -> MasksReport:
    splits = [s for s in SPLITS if getattr(scan, s)]
    return MasksReport(
        scan.root, scan.reason, scan.classes, scan.ignore_index, {s: len(getattr(scan, s)) for s in splits},
        {s: scan.pixel_counts(s) for s in splits},
        {s: np.sum([np.asarray(m.pixels) > 0 for m in getattr(scan, s)], axis=0).astype(int).tolist()
         for s in splits},
        len(scan.skipped), dict(Counter(reason_kind(r) for _, r in scan.skipped)))


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def plot_pixels(report: MasksReport, colors: np.ndarray, path: Path) -> Path:
    """Each class's share of the pixels, per split, on a log scale: rare classes stay visible."""
    fig = Figure(figsize=(max(4.5, 0.6 * len(report.classes) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(report.pixels), 1)
    for k, (split, pixels) in enumerate(report.pixels.items()):
        total = max(sum(pixels), 1)
        ax.bar(np.arange(len(pixels)) + k * width, [100 * p / total for p in pixels], width, label=split,
               color=[tuple(c / 255) for c in colors] if k == 0 else None, edgecolor="black", linewidth=0.5)
    ax.set_xticks(np.arange(len(report.classes)) + width * (len(report.pixels) - 1) / 2, report.classes,
                  rotation=45 if len(report.classes) > 6 else 0, ha="right" if len(report.classes) > 6 else "center")
    ax.set_yscale("log")
    ax.set_ylabel("% of pixels")
    ax.legend(fontsize=8)
    ax.set_title("pixels per class")
    return _save(fig, path)


def plot_samples(scan: MaskScan, colors: np.ndarray, path: Path, max_pixels: int) -> Path:
    """A few images beside their masks laid over them, picked in a seeded order from every split."""
    items = scan.train + scan.val + scan.test
    picked = [items[i] for i in sorted(np.random.default_rng(0).permutation(len(items))[:SAMPLES].tolist())]
    fig = Figure(figsize=(4.4, 2.2 * len(picked)), layout="constrained")
    axes = fig.subplots(len(picked), 2, squeeze=False)
    for row, sample in zip(axes, picked):
        image = np.asarray(load_image(sample.path, "RGB", max_pixels))
        mask = sample_mask(sample, scan.colors, scan.ignore_index, max_pixels)
        for ax, shown, title in zip(row, (image, overlay(image, mask, colors, scan.ignore_index)),
                                    (Path(sample.path).name, "mask")):
            ax.imshow(shown)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return _save(fig, path)


def inspect_masks(root: str | os.PathLike, out: str | os.PathLike, *, ignore_index: int = 255,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> MasksReport:
    """The report of a segmentation folder, written to `out` as inspect.json, pixels_per_class.png, samples.png
    (and skipped.csv when something was skipped)."""
    scan = scan_masks(root, ignore_index=ignore_index, val_split=0.0, max_pixels=max_pixels)
    out = Path(out)
    report = summarize(scan)
    write_json(out / "inspect.json", report.to_dict())
    if scan.skipped:
        scan.write_skipped_csv(out / "skipped.csv")
    colors = palette(len(scan.classes), scan.colors)
    plot_pixels(report, colors, out / "pixels_per_class.png")
    plot_samples(scan, colors, out / "samples.png", max_pixels)
    return report
