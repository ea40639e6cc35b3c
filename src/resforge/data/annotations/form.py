"""The one form every detection format is read into, and the raw records the readers hand over.

Apart from the package's `__init__` so the readers (coco, voc, yolo) import it without importing the scan.
A reader only parses text: it never decodes an image and never judges a box against an image size;
the scan does both once for every format, so each rule (clip, skip, count) lives in one place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...io import write_csv

Box = tuple[float, float, float, float]  # x1, y1, x2, y2
Skip = tuple[str, str]  # (file, or "file#annotation", reason)


@dataclass
class Objects:
    """One image and its annotated objects, in pixels of the image as decoded (upright, EXIF applied)."""

    path: str  # absolute image path
    width: int
    height: int
    boxes: list[Box]  # clipped to the image
    labels: list[int]  # indices into DetectionScan.classes
    masks: list[Any] | None = None  # per object: COCO polygon list or RLE dict (None for a box-only object)
    iscrowd: list[int] | None = None  # COCO only: crowd regions are kept, COCO evaluation needs them


@dataclass
class DetectionScan:
    """What a detection folder holds: its format, classes, the usable images of each split, what was skipped."""

    root: str
    format: str  # "coco", "voc" or "yolo"
    reason: str  # why this format was recognised, and where the class names came from
    classes: list[str]
    train: list[Objects]
    val: list[Objects]
    test: list[Objects] = field(default_factory=list)
    val_source: str = "folder"  # "folder" (given), "<share> of the images, seed <n>", or folder.RECORDED
    skipped: list[Skip] = field(default_factory=list)
    clipped: int = 0  # boxes partly outside their image, clipped and kept
    difficult: int = 0  # VOC `difficult` objects, kept as ordinary boxes

    def write_skipped_csv(self, path: str | os.PathLike) -> None:
        """skipped.csv (path relative to the root, reason), written atomically."""
        write_csv(path, ["path", "reason"], ((os.path.relpath(p, self.root), r) for p, r in self.skipped))

    def write_split_csv(self, path: str | os.PathLike) -> None:
        """Which image went where, so a run's split is reproducible (`read_recorded_split` reads it back)."""
        write_csv(path, ["split", "path"], ((split, os.path.relpath(o.path, self.root))
                                            for split in ("train", "val", "test") for o in getattr(self, split)))

    def box_counts(self, split: str) -> list[int]:
        """Objects per class in one split."""
        labels = [label for o in getattr(self, split) for label in o.labels]
        return np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(self.classes)).tolist()


@dataclass
class RawBox:
    """One annotated object as a file states it, before it is checked against its image."""

    ref: str  # "file#annotation 7", "file#object 2", "file#line 3": where a skip points the user
    key: Hashable = None  # the class as the file names it: COCO category id, VOC name, YOLO class id
    box: Box = (0.0, 0.0, 0.0, 0.0)  # x1, y1, x2, y2: pixels, or fractions of the image when normalized
    problem: str | None = None  # found while parsing: skipped with this reason
    mask: Any = None  # COCO segmentation as given, or one YOLO polygon [[x1, y1, ...]]
    crowd: int = 0
    difficult: bool = False


@dataclass
class RawImage:
    """One image as an annotation file names it."""

    path: str
    source: str  # the annotation file, relative to the root, for messages
    boxes: list[RawBox] = field(default_factory=list)
    size: tuple[float, float] | None = None  # width, height the annotation declares, if it does
    normalized: bool = False  # YOLO: boxes and polygons in fractions of the image size
    problem: str | None = None  # the whole image is skipped with this reason


@dataclass
class Level:
    """What a reader found in one folder: images per split ("" when the folder gives no split)."""

    splits: dict[str, list[RawImage]]
    skipped: list[Skip] = field(default_factory=list)
    categories: dict[Any, str] = field(default_factory=dict)  # COCO: category id -> name


@dataclass
class Classes:
    """Class names and how a file's class key maps to an index; `unknown(key)` is the skip reason."""

    names: list[str]
    index: dict[Hashable, int]
    unknown: Callable[[Any], str]
    note: str  # where the names came from, for DetectionScan.reason


def declared_size(width: Any, height: Any) -> tuple[tuple[float, float] | None, str | None]:
    """The image size an annotation states: None when it states none (missing or 0), a reason when it is unusable."""
    if width in (None, 0, "0", "") and height in (None, 0, "0", ""):
        return None, None
    try:
        w, h = float(width), float(height)
    except (TypeError, ValueError):
        w = h = math.nan
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        return None, f"image size {width}x{height} in the annotation is not a positive size"
    return (w, h), None


def place_box(box: Box, width: int, height: int) -> tuple[Box | None, str | None, bool]:
    """(the box clipped to the image, None, whether it was clipped), or (None, why it is skipped, False)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, "box coordinate is not a finite number (NaN or infinity)", False
    if x2 < x1 or y2 < y1:
        return None, f"inverted box (x2 < x1 or y2 < y1): {_fmt(box)}", False
    if x2 == x1 or y2 == y1:
        return None, f"zero-area box: {_fmt(box)}", False
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        return None, f"box wholly outside the {width}x{height} image: {_fmt(box)}", False
    c = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    tol = 1e-3  # a fraction of a pixel from YOLO's float round-trip is not an annotation outside the image
    clipped = x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol
    return c, None, clipped


def _fmt(box: Box) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in box) + "]"
