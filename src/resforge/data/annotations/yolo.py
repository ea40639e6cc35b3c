"""YOLO txt: `images/` + `labels/` (optionally `images/train` + `labels/train`, or `train/images` + `train/labels`
as split folders), one `cls cx cy w h` line per box in fractions of the image; a line with more numbers is a
YOLO segmentation polygon `cls x1 y1 x2 y2 ...`, kept as a COCO polygon with the box of its extent.

An image without a label file is a negative, as in Ultralytics. Class names come from `data.yaml` (`names:` a
list or an {id: name} dict) or `classes.txt`; without either, classes are named by their ids.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from ...errors import DataError
from ..folder import IMG_EXTENSIONS, SPLIT_DIRS
from .form import Classes, Level, RawBox, RawImage

YAML_FILES = ("data.yaml", "data.yml", "dataset.yaml")


def looks_like(d: Path, root: Path) -> str | None:
    if (d / "images").is_dir() and (d / "labels").is_dir():
        where = os.path.relpath(d, root)
        prefix = "" if where == "." else where + "/"
        return f"{prefix}images/ and {prefix}labels/ are YOLO txt folders"
    return None


def _pairs(d: Path) -> dict[str, tuple[Path, Path]]:
    """split -> (images folder, labels folder): images/train + labels/train when present, else "" -> both."""
    pairs = {}
    for split, names in SPLIT_DIRS.items():
        name = next((n for n in names if (d / "images" / n).is_dir()), None)
        if name:
            pairs[split] = (d / "images" / name, d / "labels" / name)
    return pairs or {"": (d / "images", d / "labels")}


def _line(text: str, ref: str) -> RawBox | None:
    """One label line as a box or polygon in fractions of the image; None for a blank line."""
    parts = text.split()
    if not parts:
        return None
    try:
        nums = [float(v) for v in parts]
    except ValueError:
        return RawBox(ref, problem=f"not numbers: {text.strip()[:60]!r}")
    if not (nums[0].is_integer() and nums[0] >= 0):
        return RawBox(ref, problem=f"class id {parts[0]!r} is not a whole number >= 0")
    raw, xy = RawBox(ref, key=int(nums[0])), nums[1:]
    if not all(map(math.isfinite, xy)):
        raw.problem = "box coordinate is not a finite number (NaN or infinity)"
    elif len(xy) == 4:
        cx, cy, w, h = xy
        raw.box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        if w < 0 or h < 0:
            raw.problem = f"negative width or height: {text.strip()}"
    elif len(xy) >= 6 and len(xy) % 2 == 0:
        raw.box = (min(xy[0::2]), min(xy[1::2]), max(xy[0::2]), max(xy[1::2]))
        raw.mask = [xy]
    else:
        raw.problem = (f"{len(parts)} numbers: neither a box (class cx cy w h) "
                       "nor a polygon (class and at least 3 x y points)")
    return raw


def _read_labels(img: Path, txt: Path, root: Path) -> RawImage:
    rec = RawImage(str(img), os.path.relpath(txt, root), normalized=True)
    if not txt.is_file():
        rec.source = "no label file: a negative"
        return rec
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        rec.problem = f"its label file {rec.source} is not readable text ({e})"
        return rec
    rec.boxes = [b for n, line in enumerate(lines, 1) if (b := _line(line, f"{txt}#line {n}"))]
    return rec


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS
                  and not any(s.startswith(".") for s in p.relative_to(folder).parts) and p.is_file())


def _read_pair(images: Path, labels: Path, root: Path, level: Level) -> list[RawImage]:
    if not labels.is_dir():  # every image a negative is never what a missing folder meant
        raise DataError(f"{images} has no labels folder {labels}")
    by_label: dict[Path, list[Path]] = {}
    for img in _images(images):
        by_label.setdefault(labels / img.relative_to(images).with_suffix(".txt"), []).append(img)
    recs = []
    for txt, imgs in by_label.items():
        for img in imgs:
            rec = _read_labels(img, txt, root)
            if len(imgs) > 1:  # a.jpg and a.png: which one the boxes were drawn on cannot be told
                others = ", ".join(i.name for i in imgs if i != img)
                rec.problem = f"shares its label file {os.path.relpath(txt, root)} with {others}"
            recs.append(rec)
    level.skipped += [(str(t), "no image for this label file") for t in sorted(labels.rglob("*.txt"))
                      if t not in by_label and t.name != "classes.txt"]
    return recs


def read_level(d: Path, root: Path) -> Level:
    level = Level(splits={})
    pairs = _pairs(d)
    for split, (images, labels) in pairs.items():
        level.splits[split] = _read_pair(images, labels, root, level)
    if "" not in pairs:
        loose = [p for p in sorted((d / "images").iterdir()) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
        level.skipped += [(str(p), "not inside a split folder of images/ (train, val, test)") for p in loose]
    return level


def _yaml_names(p: Path) -> list[str] | None:
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"{p} is not readable YAML ({e})") from None
    names: Any = data.get("names") if isinstance(data, dict) else None
    if names is None:
        return None
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DataError(f"{p}: names must map class ids (0, 1, ...) to names, not {names!r}") from None
        if min(by_id, default=0) < 0:
            raise DataError(f"{p}: a class id below 0 in names")
        return [by_id.get(i, str(i)) for i in range(max(by_id, default=-1) + 1)]  # a gap is named by its id
    raise DataError(f"{p}: names must be a list or an {{id: name}} mapping, not {type(names).__name__}")


def _names(root: Path) -> tuple[list[str], str] | None:
    for name in YAML_FILES:
        if (root / name).is_file() and (names := _yaml_names(root / name)) is not None:
            return names, name
    for p in (root / "classes.txt", root / "labels" / "classes.txt"):
        if p.is_file():
            try:
                return [n.strip() for n in p.read_text(encoding="utf-8").splitlines() if n.strip()], p.name
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{p} is not a readable list of class names ({e})") from None
    return None


def resolve_classes(root: Path, levels: list[Level]) -> Classes:
    found = _names(root)
    if found is None:
        ids = [b.key for lv in levels for recs in lv.splits.values() for r in recs for b in r.boxes if not b.problem]
        names = [str(i) for i in range(max(ids, default=-1) + 1)]
        note = "classes named by their ids (no data.yaml or classes.txt)"
    else:
        names, source = found
        note = f"classes from {source}"
    return Classes(names, {i: i for i in range(len(names))},
                   lambda key: f"unknown class id {key} ({len(names)} classes: 0 to {len(names) - 1})", note)
