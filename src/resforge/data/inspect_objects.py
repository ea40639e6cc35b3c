"""What a detection folder holds, before training on it: images, objects per class, box sizes, negatives,
skipped annotations, and the boxes drawn on a few images (issue 26).

Everything comes from `scan_detection`, so the report counts what a run would train on: the same boxes
clipped, the same annotations skipped. Figures are drawn on bare `Figure`s and written through
`io.atomic_path`, as evaluation.plots does; they are drawn here rather than imported from there because
data sits below evaluation and knows nothing of it.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.utils import draw_bounding_boxes

from ..errors import ConfigError
from ..io import atomic_path, write_json
from .annotations import DetectionScan, Objects, scan_detection
from .folder import DEFAULT_MAX_PIXELS, load_image

SMALL, MEDIUM = 32**2, 96**2  # COCO's box-area buckets, in pixels of the image as decoded
SPLITS = ("train", "val", "test")
THUMB = 256  # long side of an image in samples.png
DPI = 110


@dataclass
class ObjectsReport:
    root: str
    format: str  # "coco", "voc" or "yolo"
    reason: str  # why that format was recognised, and where the class names came from
    classes: list[str]
    images: dict[str, int]  # split -> usable images
    negatives: dict[str, int]  # split -> images without objects (kept: they teach the background)
    objects: dict[str, list[int]]  # split -> objects per class
    box_size: dict[str, dict[str, float]] | None  # "relative" sqrt(box/image area), "pixels" sqrt(box area):
    #                                               p10, median, p90 over every box; None without boxes
    size_buckets: dict[str, int]  # COCO small (< 32²), medium (< 96²), large, by box area in pixels
    boxes_per_image: dict[str, float]  # mean, max: crowded images need more detections per image
    clipped: int  # boxes partly outside their image, clipped and kept
    difficult: int  # VOC `difficult` objects, kept as ordinary boxes
    skipped: int  # entries of skipped.csv: annotations or whole images not used
    skip_reasons: dict[str, int]  # reason without its particulars -> entries

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        splits = list(self.images)
        total = sum(sum(c) for c in self.objects.values())
        neg = sum(self.negatives.values())
        rows = [*zip(self.classes, zip(*self.objects.values())), ("images", self.images.values()),
                ("no objects", self.negatives.values())]
        width = max(len(name) for name, _ in rows)
        lines = [f"{self.root}: {self.format} folder, {len(self.classes)} classes, "
                 f"{sum(self.images.values()):,} images ({neg:,} without objects), {total:,} objects",
                 f"{'':<{width}}" + "".join(f"{s:>8}" for s in splits)]
        lines += [f"{name:<{width}}" + "".join(f"{v:>8,}" for v in values) for name, values in rows]
        if self.box_size:
            r, p = self.box_size["relative"], self.box_size["pixels"]
            lines.append(f"box size, sqrt(box/image area): median {r['median']:.3f} (10-90%: {r['p10']:.3f}-"
                         f"{r['p90']:.3f}); in pixels median {p['median']:.0f} ({p['p10']:.0f}-{p['p90']:.0f})")
        lines.append("COCO sizes: " + ", ".join(f"{k} {v:,}" for k, v in self.size_buckets.items())
                     + f"; boxes per image: mean {self.boxes_per_image['mean']:.2f}, "
                       f"max {self.boxes_per_image['max']:.0f}")
        lines.append(f"clipped to their image: {self.clipped:,} box(es); VOC difficult: {self.difficult:,}")
        reasons = ", ".join(f"{k} ({v:,})" for k, v in self.skip_reasons.items())
        lines.append(f"skipped {self.skipped:,}" + (f": {reasons}" if reasons else ""))
        return "\n".join(lines)


def reason_kind(reason: str) -> str:
    """A skip reason without its particulars (coordinates, sizes, ids, the error's details), so that like
    reasons tally together: "zero-area box: [1, 2, 1, 9]" -> "zero-area box"."""
    head = re.split(r": | \(", reason, maxsplit=1)[0]
    return re.sub(r"\d+(\.\d+)?", "N", head)


def _box_arrays(objs: list[Objects]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Width and height in pixels (N x 2), the image's area (N) and the label (N) of every box."""
    rows = [(x2 - x1, y2 - y1, o.width * o.height, label)
            for o in objs for (x1, y1, x2, y2), label in zip(o.boxes, o.labels)]
    a = np.asarray(rows, dtype=float).reshape(-1, 4)
    return a[:, :2], a[:, 2], a[:, 3].astype(int)


def _spread(x: np.ndarray) -> dict[str, float]:
    p10, median, p90 = np.percentile(x, [10, 50, 90])
    return {"p10": float(p10), "median": float(median), "p90": float(p90)}


def _all(scan: DetectionScan) -> list[Objects]:
    return sorted((o for s in SPLITS for o in getattr(scan, s)), key=lambda o: o.path)


def summarize(scan: DetectionScan) -> ObjectsReport:
    """The report of a scanned folder: counts per split, box sizes, what was skipped and why."""
    splits = {s: getattr(scan, s) for s in SPLITS if getattr(scan, s) or s == "train"}
    everything = _all(scan)
    wh, image_area, _ = _box_arrays(everything)
    area = wh.prod(axis=1)
    per_image = [len(o.boxes) for o in everything]
    return ObjectsReport(
        root=scan.root, format=scan.format, reason=scan.reason, classes=scan.classes,
        images={s: len(v) for s, v in splits.items()},
        negatives={s: sum(not o.boxes for o in v) for s, v in splits.items()},
        objects={s: scan.box_counts(s) for s in splits},
        box_size={"relative": _spread(np.sqrt(area / image_area)), "pixels": _spread(np.sqrt(area))}
        if len(area) else None,
        size_buckets={"small": int((area < SMALL).sum()), "medium": int(((area >= SMALL) & (area < MEDIUM)).sum()),
                      "large": int((area >= MEDIUM).sum())},
        boxes_per_image={"mean": float(np.mean(per_image)), "max": max(per_image)},
        clipped=scan.clipped, difficult=scan.difficult, skipped=len(scan.skipped),
        skip_reasons=dict(Counter(reason_kind(r) for _, r in scan.skipped).most_common()))


def class_colors(n: int) -> list[str]:
    """One colour per class, the same in every figure (tab10, repeating past ten classes)."""
    cmap = colormaps["tab10"]
    return [to_hex(cmap(i % 10)) for i in range(n)]


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def plot_box_sizes(scan: DetectionScan, path: Path) -> Path:
    """Relative box size per class (log x: sizes span orders of magnitude) beside width against height in pixels,
    with COCO's small/medium/large boundaries drawn."""
    wh, image_area, labels = _box_arrays(_all(scan))
    rel = np.sqrt(wh.prod(axis=1) / image_area)
    colors = class_colors(len(scan.classes))
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    hist, scatter = fig.subplots(1, 2)
    hist.set(xscale="log", xlabel="sqrt(box area / image area)", ylabel="boxes", title="box size relative to image")
    scatter.set(xscale="log", yscale="log", xlabel="box width (px)", ylabel="box height (px)",
                title="box width and height")
    if not len(rel):
        for ax in (hist, scatter):
            ax.text(0.5, 0.5, "no boxes", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    bins = np.geomspace(rel.min() / 1.1, 1.0, 30)
    for c, (name, color) in enumerate(zip(scan.classes, colors)):
        if (labels == c).any():
            hist.hist(rel[labels == c], bins=bins, histtype="step", linewidth=1.5, color=color, label=name)
            scatter.scatter(*wh[labels == c].T, s=8, alpha=0.6, color=color, label=name)
    x = np.geomspace(wh[:, 0].min() / 2, wh[:, 0].max() * 2, 50)
    for area, style, name in ((SMALL, "--", "small|medium (32²)"), (MEDIUM, ":", "medium|large (96²)")):
        scatter.plot(x, area / x, linestyle=style, color="gray", linewidth=1, label=f"COCO {name}")
    scatter.set(xlim=(x[0], x[-1]), ylim=(wh[:, 1].min() / 2, wh[:, 1].max() * 2))
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    if len(scan.classes) <= 12:
        hist.legend(fontsize=8)
        scatter.legend(fontsize=8)
    return _save(fig, path)


def plot_objects_per_class(report: ObjectsReport, path: Path) -> Path:
    """Objects per class, one stacked bar per class across the splits: imbalance at a glance."""
    fig = Figure(figsize=(max(5.0, 0.45 * len(report.classes) + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(report.classes))
    for split, counts in report.objects.items():
        ax.bar(range(len(counts)), counts, bottom=bottom, label=f"{split} ({report.images[split]:,} images)")
        bottom += counts
    ax.set_xticks(range(len(report.classes)), report.classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(ylabel="objects", title=f"objects per class; images without objects: {sum(report.negatives.values()):,}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pick_samples(items: list[Objects], n: int, seed: int) -> list[Objects]:
    """A seeded draw of `n` images, images with objects first but one negative among them when there is one
    (and room for more than one image): what the boxes look like, and that negatives are there."""
    rng = np.random.default_rng(seed)
    pos, neg = [o for o in items if o.boxes], [o for o in items if not o.boxes]
    n_neg = min(len(neg), max(n - len(pos), 1 if n > 1 else 0))
    n_pos = min(len(pos), n - n_neg)
    return ([pos[i] for i in rng.choice(len(pos), n_pos, replace=False)]
            + [neg[i] for i in rng.choice(len(neg), n_neg, replace=False)])


def _drawn(obj: Objects, classes: list[str], colors: list[str], max_pixels: int) -> np.ndarray:
    """A thumbnail of the image with its boxes and class names drawn, HxWx3 uint8."""
    im = load_image(obj.path, "RGB", max_pixels, min_size=THUMB)
    im.thumbnail((THUMB, THUMB))
    pixels = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    if obj.boxes:
        scale = torch.tensor([im.width / obj.width, im.height / obj.height] * 2)
        pixels = draw_bounding_boxes(pixels, torch.tensor(obj.boxes) * scale, [classes[c] for c in obj.labels],
                                     colors=[colors[c] for c in obj.labels], width=2)
    return pixels.permute(1, 2, 0).numpy()


def plot_samples(scan: DetectionScan, path: Path, n: int, seed: int, max_pixels: int) -> Path:
    """A grid of `n` images drawn by `pick_samples`, their boxes drawn with class names."""
    picks = pick_samples(_all(scan), n, seed)
    colors = class_colors(len(scan.classes))
    ncols = math.ceil(math.sqrt(len(picks)))
    nrows = math.ceil(len(picks) / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.8 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, obj in zip(axes, picks):
        ax.imshow(_drawn(obj, scan.classes, colors, max_pixels))
        count = f"{len(obj.boxes)} object{'s' if len(obj.boxes) != 1 else ''}" if obj.boxes else "no objects"
        ax.set_title(f"{os.path.basename(obj.path)}\n{count}", fontsize=8)
    fig.suptitle(f"{Path(scan.root).name}: {len(picks)} images, seed {seed}")
    return _save(fig, path)


def inspect_objects(root: str | os.PathLike, out: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                    images: int = 12, seed: int = 0) -> ObjectsReport:
    """Scan a detection folder as training would (splits as the folder gives them, none drawn) and write
    inspect.json, skipped.csv (when something was skipped), box_sizes.png, objects_per_class.png and
    samples.png (`images` images, a `seed`ed draw) under `out`."""
    if images < 1:
        raise ConfigError("images must be at least 1")
    scan = scan_detection(root, val_split=0.0, max_pixels=max_pixels)
    report = summarize(scan)
    out = Path(out)
    write_json(out / "inspect.json", report.to_dict())
    if scan.skipped:
        scan.write_skipped_csv(out / "skipped.csv")
    else:  # a list left by an earlier inspection would name problems the folder no longer has
        (out / "skipped.csv").unlink(missing_ok=True)
    plot_box_sizes(scan, out / "box_sizes.png")
    plot_objects_per_class(report, out / "objects_per_class.png")
    plot_samples(scan, out / "samples.png", images, seed, max_pixels)
    return report
