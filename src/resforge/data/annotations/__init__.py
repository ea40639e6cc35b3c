"""Object-detection folders (COCO JSON, Pascal VOC XML, YOLO txt) read into one form: `DetectionScan`.

The format is recognised from the folder, at its top or inside split folders (train/, val/ or valid/, test/).
Every image is decoded once (folder.py's `load_image`, in a thread pool) and every box is checked against
the decoded size. Nothing bad stops the scan and nothing is dropped unsaid: a box partly outside its image is
clipped and counted; a zero-area, inverted, wholly outside or non-finite box, an unknown class, an image that
is missing, corrupt, over `max_pixels`, of another size than its annotation states, or annotated twice goes to
`skipped` with its reason, and the rest of its image is kept. Images with no boxes are kept as negatives.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import numpy as np

from ...errors import DataError
from ..folder import DEFAULT_MAX_PIXELS, RECORDED, SPLIT_DIRS, load_image
from . import coco, voc, yolo
from .form import Classes, DetectionScan, Objects, RawImage, Skip, place_box

__all__ = ["DetectionScan", "Objects", "read_recorded_split", "recognize", "scan_detection"]

FORMATS: dict[str, ModuleType] = {"coco": coco, "voc": voc, "yolo": yolo}
T = TypeVar("T")  # an image record with a `path` (Objects, a mask pair)
LOOKED_FOR = ("COCO JSON (annotations/*.json, or a .json in each split folder), Pascal VOC XML (Annotations/*.xml, "
              "or an .xml beside each image) or YOLO txt (images/ + labels/ folders)")


@dataclass
class _Found:
    format: str
    reason: str
    folders: dict[str, Path]  # split -> folder; "" -> the root, when no split folders are used


def _split_folders(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_DIRS.items():
        name = next((n for n in names if (root / n).is_dir()), None)
        if name:
            found[split] = root / name
    return found


def _holds(fmt: str, folder: Path, root: Path) -> str | None:
    """Why `folder` (a split folder) holds `fmt` annotations, or None."""
    return FORMATS[fmt].looks_like(folder, root) or (voc.looks_beside(folder, root) if fmt == "voc" else None)


def _locate(root: Path) -> _Found | None:
    """The format and the folders to read, from names and first bytes only."""
    for fmt, mod in FORMATS.items():
        if reason := mod.looks_like(root, root):
            return _Found(fmt, reason, {"": root})
    splits = _split_folders(root)
    if "train" in splits:
        for fmt in FORMATS:
            if reason := _holds(fmt, splits["train"], root):
                names = ", ".join(p.name for p in splits.values())
                return _Found(fmt, f"{reason} (split folders {names})", splits)
    if reason := voc.looks_beside(root, root):
        return _Found("voc", reason, {"": root})
    return None


def recognize(root: str | os.PathLike) -> tuple[str | None, str]:
    """(format, why) or (None, what was looked for); reads names and a few bytes, decodes no image."""
    root = Path(root)
    if not root.is_dir():
        return None, f"{root} is not a folder"
    found = _locate(root)
    return (found.format, found.reason) if found else (None, f"no {LOOKED_FOR} in {root}")


def _read(root: Path) -> tuple[_Found, dict[str, list[RawImage]], Classes, list[Skip]]:
    """Every image record by split ("" when none is given), the classes, and what the readers skipped."""
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    found = _locate(root)
    if found is None:
        raise DataError(f"no detection annotations found: looked for {LOOKED_FOR} in {root}")
    mod = FORMATS[found.format]
    levels = {}
    for split, folder in found.folders.items():
        if split and split != "train" and not _holds(found.format, folder, root):
            raise DataError(f"{folder} does not hold {found.format} annotations as {found.folders['train']} does")
        levels[split] = mod.read_level(folder, root)
    records: dict[str, list[RawImage]] = {}
    for split, level in levels.items():
        if split and any(level.splits):
            raise DataError(f"{found.folders[split]} is a split folder that splits again inside "
                            f"({', '.join(level.splits)}): keep one level of splits")
        for inner, recs in level.splits.items():
            records.setdefault(split or inner, []).extend(recs)
    if any(records) and "train" not in records:
        raise DataError(f"{root} gives the splits {', '.join(records)} but no train split")
    skipped = [s for lv in levels.values() for s in lv.skipped]
    return found, records, mod.resolve_classes(root, list(levels.values())), skipped


def _sizes(paths: list[str], max_pixels: int, threads: int | None) -> dict[str, tuple[int, int] | str]:
    """path -> decoded (width, height), or the reason it cannot be decoded; each image is decoded once."""
    def one(p: str) -> tuple[str, tuple[int, int] | str]:
        try:
            return p, load_image(p, "RGB", max_pixels).size
        except DataError as e:
            return p, str(e).removeprefix(f"{p}: ")

    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        return dict(pool.map(one, paths))


def _size_problem(rec: RawImage, size: tuple[int, int]) -> str | None:
    if rec.size is None or (round(rec.size[0]), round(rec.size[1])) == size:
        return None
    turned = " (turned by its EXIF orientation?)" if (round(rec.size[1]), round(rec.size[0])) == size else ""
    return f"image is {size[0]}x{size[1]} but {rec.source} says {rec.size[0]:g}x{rec.size[1]:g}{turned}"


class _Builder:
    """Checks every record against its decoded image and turns the good ones into `Objects`."""

    def __init__(self, fmt: str, classes: Classes, root: Path):
        self.fmt, self.classes, self.root = fmt, classes, root
        self.skipped: list[Skip] = []
        self.clipped = self.difficult = 0

    def _skip_image(self, path: str, reason: str, n_boxes: int) -> None:
        lost = f" ({n_boxes} annotated object{'s' if n_boxes != 1 else ''} skipped with it)" if n_boxes else ""
        self.skipped.append((path, reason + lost))

    def _label(self, key: Hashable) -> int | None:
        try:
            return self.classes.index.get(key)
        except TypeError:  # an unhashable class in the file (a list): unknown
            return None

    def objects(self, rec: RawImage, size: tuple[int, int]) -> Objects:
        w, h = size
        out = Objects(rec.path, w, h, [], [], masks=[], iscrowd=[] if self.fmt == "coco" else None)
        for b in rec.boxes:
            box, problem, clipped = (None, b.problem, False) if b.problem else \
                place_box(_scaled(b.box, rec.normalized, w, h), w, h)
            label = None if problem else self._label(b.key)
            if label is None and not problem:
                problem = self.classes.unknown(b.key)
            if problem:
                self.skipped.append((b.ref, problem))
                continue
            self.clipped += clipped
            self.difficult += b.difficult
            out.boxes.append(box)
            out.labels.append(label)
            out.masks.append(_polygon(b.mask, w, h) if rec.normalized and b.mask else b.mask)
            if out.iscrowd is not None:
                out.iscrowd.append(b.crowd)
        return out

    def build(self, records: list[RawImage], max_pixels: int, threads: int | None) -> dict[str, Objects]:
        """path -> Objects for every usable image."""
        by_path: dict[str, list[RawImage]] = {}
        for r in records:
            r.path = os.path.normpath(os.path.abspath(r.path))
            by_path.setdefault(r.path, []).append(r)
        todo = []
        for path, recs in by_path.items():
            n_boxes = sum(len(r.boxes) for r in recs)
            if len(recs) > 1:
                sources = list(dict.fromkeys(r.source for r in recs))
                why = f"named {len(recs)} times in {sources[0]}" if len(sources) == 1 else ", ".join(sources)
                self._skip_image(path, f"annotated more than once ({why})", n_boxes)
            elif recs[0].problem:
                self._skip_image(path, recs[0].problem, n_boxes)
            else:
                todo.append(recs[0])
        sizes = _sizes([r.path for r in todo], max_pixels, threads)
        out = {}
        for rec in todo:
            size = sizes[rec.path]
            problem = size if isinstance(size, str) else _size_problem(rec, size)
            if problem:
                self._skip_image(rec.path, problem, len(rec.boxes))
            else:
                out[rec.path] = self.objects(rec, size)
        if not any(m is not None for o in out.values() for m in o.masks):
            for o in out.values():
                o.masks = None  # a format or folder without masks says so once, not per object
        return out


def _scaled(box: tuple[float, ...], normalized: bool, w: int, h: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (x1 * w, y1 * h, x2 * w, y2 * h) if normalized else (x1, y1, x2, y2)


def _polygon(mask: list[list[float]], w: int, h: int) -> list[list[float]]:
    """A YOLO polygon in fractions of the image as a COCO polygon in pixels, its points clipped to the image."""
    return [[min(max(v * (h if i % 2 else w), 0.0), float(h if i % 2 else w)) for i, v in enumerate(poly)]
            for poly in mask]


def seeded_split(items: list[T], val_split: float, seed: int, weight: Callable[[T], int] | None = None
                 ) -> tuple[list[T], list[T]]:
    """Images drawn in a seeded order into val while their objects stay within `val_split` of all (an image
    without objects counts as one; `weight` may weigh each otherwise): at least one image, never all. Counting
    objects, not images, keeps a folder of a few large scenes from giving its biggest to validation."""
    items = sorted(items, key=lambda o: o.path)
    if val_split <= 0 or len(items) < 2:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    weights = [weight(o) if weight else max(1, len(o.labels)) for o in items]
    room, chosen = val_split * sum(weights), set()
    for i in order:
        if weights[i] <= room:
            chosen.add(i)
            room -= weights[i]
    if not chosen:  # every image holds more than the share: the one holding fewest
        chosen.add(min(order, key=lambda i: weights[i]))
    return ([o for i, o in enumerate(items) if i not in chosen], [o for i, o in enumerate(items) if i in chosen])


def _scan(root: Path, max_pixels: int, threads: int | None
          ) -> tuple[_Found, dict[str, list[RawImage]], Classes, _Builder, dict[str, Objects], list[Skip]]:
    found, records, classes, skipped = _read(root)
    builder = _Builder(found.format, classes, root)
    objects = builder.build([r for recs in records.values() for r in recs], max_pixels, threads)
    return found, records, classes, builder, objects, skipped + builder.skipped


def _no_images(root: Path, skipped: list[Skip]) -> DataError:
    first = "; ".join(f"{os.path.relpath(p, root)}: {r}" for p, r in skipped[:3])
    return DataError(f"no usable images in {root} ({len(skipped)} skipped{': ' + first if first else ''})")


def scan_detection(root: str | os.PathLike, *, val_split: float = 0.2, seed: int = 0,
                   max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None) -> DetectionScan:
    """Recognise the format, read every annotation, decode every image once, and split.

    Splits the folder gives (split folders, one COCO JSON per split, VOC ImageSets, images/train) are used;
    a missing val is carved out of train by a seeded `val_split` share of its images (test stays as it is);
    a folder that gives none is split the same way.
    """
    root = Path(os.path.abspath(root))
    found, records, classes, builder, objects, skipped = _scan(root, max_pixels, threads)
    split = {s: [objects[r.path] for r in recs if r.path in objects] for s, recs in records.items()}
    train = sorted(split.get("train", []) + split.get("", []), key=lambda o: o.path)
    if not train:
        raise _no_images(root, sorted(skipped))
    if "val" in split:
        val, val_source = sorted(split["val"], key=lambda o: o.path), "folder"
    else:
        train, val = seeded_split(train, val_split, seed)
        val_source = f"{val_split:g} of the images, seed {seed}"
    return DetectionScan(root=str(root), format=found.format, reason=f"{found.reason}; {classes.note}",
                         classes=classes.names, train=train, val=val,
                         test=sorted(split.get("test", []), key=lambda o: o.path), val_source=val_source,
                         skipped=sorted(skipped), clipped=builder.clipped, difficult=builder.difficult)


def read_split_rows(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The (split, path relative to the data folder) rows of a split.csv that `write_split_csv` wrote."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(r["split"], r["path"]) for r in csv.DictReader(f)]
    except (OSError, KeyError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a readable split record ({type(e).__name__}: {e})") from None
    if not rows or any(s not in SPLIT_DIRS for s, _ in rows):
        raise DataError(f"{path} is not a split record (rows of split train/val/test, path)")
    return rows


def read_recorded_split(root: str | os.PathLike, split_csv: str | os.PathLike, *,
                        max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None) -> DetectionScan:
    """The folder as a run recorded it (resume): the same images in the same splits, never drawn again.

    Images gone or no longer usable are skipped with the reason; images added since are skipped too, so
    validation stays the images the model never trained on.
    """
    root = Path(os.path.abspath(root))
    rows = read_split_rows(split_csv)
    found, _, classes, builder, objects, skipped = _scan(root, max_pixels, threads)
    known = {p for p, _ in skipped}
    split: dict[str, list[Objects]] = {"train": [], "val": [], "test": []}
    recorded = set()
    for s, rel in rows:
        p = os.path.normpath(os.path.join(root, rel))
        recorded.add(p)
        if p in objects:
            split[s].append(objects[p])
        elif p not in known:
            skipped.append((p, "in the recorded split but no longer in the folder's annotations"))
    skipped += [(p, "added since the run started: not in its recorded split") for p in objects if p not in recorded]
    if not split["train"]:
        raise _no_images(root, sorted(skipped))
    return DetectionScan(root=str(root), format=found.format, reason=f"{found.reason}; {classes.note}",
                         classes=classes.names, train=split["train"], val=split["val"], test=split["test"],
                         val_source=RECORDED, skipped=sorted(skipped), clipped=builder.clipped,
                         difficult=builder.difficult)
