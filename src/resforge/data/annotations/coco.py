"""COCO JSON: read directly, so nobody converts it to another format first (ultralytics #9161, #16363).

A folder holds `annotations/*.json` (instances_train*.json, *val*, *test*: one per split; a single file is
split here) or one `.json` of its own (Roboflow's `train/_annotations.coco.json`, one per split folder).
Images are found by `file_name` beside the JSON, under images/<split name>, <split name>/, images/, the JSON's
folder's parent, or the root; an image file no JSON names is not part of the dataset. A malformed JSON
file is one DataError naming it: it holds a whole split, so skipping it would quietly drop that split.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ...errors import DataError
from .form import Classes, Level, RawBox, RawImage, Skip, declared_size

SPLIT_WORDS = ("train", "val", "test")  # found in a file's name, in this order ("trainval" is train)


def _is_coco(p: Path) -> bool:
    """A JSON object with "images" near its start (and "annotations" too in a small file, read whole): cheap on a
    450 MB instances_train2017.json, whose annotations come after its images."""
    size = 1 << 20
    try:
        with open(p, "rb") as f:
            head = f.read(size)
    except OSError:
        return False
    whole = len(head) < size
    return head.lstrip()[:1] == b"{" and b'"images"' in head and (not whole or b'"annotations"' in head)


def _files(d: Path) -> list[Path]:
    """The COCO JSON files of a folder; instances_* ones only when present (COCO ships captions_* beside them)."""
    found = [p for p in sorted((d / "annotations").glob("*.json")) if _is_coco(p)]
    found = found or [p for p in sorted(d.glob("*.json")) if _is_coco(p)]
    return [p for p in found if p.name.startswith("instances")] or found


def looks_like(d: Path, root: Path) -> str | None:
    files = _files(d)
    if not files:
        return None
    names = ", ".join(os.path.relpath(p, root) for p in files)
    return f"{names} {'is' if len(files) == 1 else 'are'} COCO JSON"


def _split_of(p: Path) -> str | None:
    stem = p.stem.lower()
    return next((w for w in SPLIT_WORDS if w in stem), None)


def _by_split(d: Path, files: list[Path]) -> dict[str, Path]:
    if len(files) == 1:
        return {"": files[0]}
    splits: dict[str, Path] = {}
    for p in files:
        split = _split_of(p)
        if split is None or split in splits:
            raise DataError(f"{d} holds several COCO JSON files ({', '.join(f.name for f in files)}), not one per "
                            "split (train, val, test in their names): keep the one to use, or name them by split")
        splits[split] = p
    return splits


def _load(p: Path) -> dict[str, Any]:
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p} is not readable COCO JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{p} is not COCO JSON (an object with images, annotations, categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{p} is not COCO detection JSON: no {key} list")
    return data


def _bases(p: Path, root: Path) -> list[Path]:
    """Where `file_name` may be relative to, most specific first."""
    tag = p.stem.removeprefix("instances_")
    parent = p.parent.parent if p.parent.name == "annotations" else p.parent
    out = [p.parent, parent / "images" / tag, parent / tag, parent / "images", parent, root]
    return list(dict.fromkeys(out))


def _image_paths(names: list[str], bases: list[Path]) -> list[str]:
    """Each `file_name` under the first base that has it; a missing one where most of the others are."""
    found = [next((b for b in bases if (b / n).is_file()), None) for n in names]
    usual = Counter(b for b in found if b is not None).most_common(1)
    fallback = usual[0][0] if usual else next((b for b in bases if b.is_dir() and b.name != "annotations"), bases[0])
    return [str((b or fallback) / n) for b, n in zip(found, names)]


def _categories(data: dict[str, Any], p: Path, cats: dict[Any, str], seen_in: dict[Any, Path]) -> None:
    for c in data["categories"]:
        cid = c.get("id") if isinstance(c, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise DataError(f"{p}: category {c!r} has no integer id")
        name = str(c.get("name", cid))
        if cats.get(cid, name) != name:
            raise DataError(f"{p}: category id {cid} is {name!r} here and {cats[cid]!r} in {seen_in[cid]}")
        cats[cid] = name
        seen_in.setdefault(cid, p)


def _raw_box(a: dict[str, Any], ref: str) -> RawBox:
    seg = a.get("segmentation")
    raw = RawBox(ref, key=a.get("category_id"), mask=seg if seg else None, crowd=int(bool(a.get("iscrowd", 0))))
    bbox = a.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raw.problem = f"no bbox [x, y, width, height] of 4 numbers: {bbox!r}"
        return raw
    if w < 0 or h < 0:
        raw.problem = f"negative width or height: bbox {bbox!r}"
    elif not all(map(math.isfinite, (x, y, w, h))):
        raw.problem = f"box coordinate is not a finite number (NaN or infinity): bbox {bbox!r}"
    raw.box = (x, y, x + w, y + h)
    return raw


def _read_file(p: Path, data: dict[str, Any], root: Path) -> tuple[list[RawImage], list[Skip]]:
    source, bases = os.path.relpath(p, root), _bases(p, root)
    skipped: list[Skip] = []
    entries = []
    for i, im in enumerate(data["images"]):
        if isinstance(im, dict) and isinstance(im.get("id"), (int, str)) and isinstance(im.get("file_name"), str):
            entries.append(im)
        else:
            skipped.append((f"{p}#image {i}", "image entry without an id or file_name"))
    by_id: dict[Any, list[RawImage]] = {}
    for im, path in zip(entries, _image_paths([im["file_name"] for im in entries], bases)):
        size, problem = declared_size(im.get("width"), im.get("height"))
        by_id.setdefault(im["id"], []).append(RawImage(path, source, size=size, problem=problem))
    for iid, recs in by_id.items():
        if len(recs) > 1:  # which image the annotations belong to cannot be told: none of them is used
            for r in recs:
                r.problem = f"duplicate image id {iid!r}: {len(recs)} images in {source} have it"
    for j, a in enumerate(data["annotations"]):
        ref = f"{p}#annotation {a.get('id', j) if isinstance(a, dict) else j}"
        iid = a.get("image_id") if isinstance(a, dict) else None
        recs = by_id.get(iid) if isinstance(iid, (int, str)) else None
        if not recs:
            skipped.append((ref, f"image id {iid!r} is not among the images of {source}"))
        else:
            recs[0].boxes.append(_raw_box(a, ref))
    return [r for recs in by_id.values() for r in recs], skipped


def read_level(d: Path, root: Path) -> Level:
    files = _files(d)
    level = Level(splits={})
    seen_in: dict[Any, Path] = {}
    for split, p in _by_split(d, files).items():
        data = _load(p)
        _categories(data, p, level.categories, seen_in)
        images, skipped = _read_file(p, data, root)
        level.splits[split] = images
        level.skipped += skipped
    return level


def resolve_classes(root: Path, levels: list[Level]) -> Classes:
    """Category ids in id order, made contiguous (1, 3, 90 -> 0, 1, 2); names must agree between files."""
    cats: dict[int, str] = {}
    for lv in levels:
        for cid, name in lv.categories.items():
            if cats.get(cid, name) != name:
                raise DataError(f"category id {cid} is {name!r} in one split's JSON and {cats[cid]!r} in another")
            cats[cid] = name
    ids = sorted(cats)
    return Classes([cats[i] for i in ids], {i: n for n, i in enumerate(ids)},
                   lambda key: f"unknown category id {key!r}", "classes from the JSON's categories in id order")
