"""Pascal VOC XML: `Annotations/*.xml` + `JPEGImages/` (split by `ImageSets/Main/{train,val,test}.txt` when
present), or an `.xml` beside each image (LabelImg, Roboflow). With Annotations/, the XML files are the
dataset (a JPEGImages file no XML names is not in it); beside the images, an image without an XML is a
negative, as an image without a label file is in YOLO.

One XML file holds one image, so a malformed one is skipped with its reason rather than stopping the scan
(the image it described is then left out: its name is in the unreadable file). Classes: `classes.txt` or
`labels.txt` at the root gives names and order; else the sorted names found. Coordinates are taken as
written (VOC's are 1-based; the one-pixel shift is below what the boxes' own accuracy is).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from ...errors import DataError
from ..folder import IMG_EXTENSIONS
from .form import Classes, Level, RawBox, RawImage, Skip, declared_size

SET_NAMES = ("train", "val", "test")
CLASS_FILES = ("classes.txt", "labels.txt")


def _is_voc(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return b"<annotation" in f.read(4096)
    except OSError:
        return False


def _visible(p: Path, top: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(top).parts)


def looks_like(d: Path, root: Path) -> str | None:
    """`Annotations/*.xml` in `d`."""
    ann = d / "Annotations"
    if ann.is_dir() and any(_is_voc(p) for p in ann.glob("*.xml")):
        return f"{os.path.relpath(ann, root)}/ holds Pascal VOC XML"
    return None


def looks_beside(d: Path, root: Path) -> str | None:
    """An image with a VOC `.xml` of the same name beside it, anywhere under `d`."""
    for p in d.rglob("*.xml"):
        if _visible(p, d) and any(p.with_suffix(e).is_file() for e in IMG_EXTENSIONS) and _is_voc(p):
            where = "the folder" if d == root else f"{os.path.relpath(d, root)}/"
            return f"{where} holds images with a Pascal VOC XML beside each"
    return None


def _parse(xml: Path) -> tuple[str | None, RawImage]:
    """(the image file name the XML states, its record with path unset); raises on an unreadable file."""
    top = ET.parse(xml).getroot()
    if top.tag != "annotation":
        raise ValueError(f"its root element is <{top.tag}>, not <annotation>")
    size = top.find("size")
    w, h = (size.findtext("width"), size.findtext("height")) if size is not None else (None, None)
    declared, problem = declared_size(w, h)
    rec = RawImage("", "", size=declared, problem=problem)
    for k, obj in enumerate(top.findall("object"), 1):
        raw = RawBox(f"{xml}#object {k}", key=(obj.findtext("name") or "").strip())
        raw.difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true")
        bb = obj.find("bndbox")
        try:
            raw.box = tuple(float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))  # type: ignore
        except (AttributeError, TypeError, ValueError):
            raw.problem = "no <bndbox> with numbers xmin, ymin, xmax, ymax"
        if not raw.key:
            raw.problem = "object without a <name>"
        rec.boxes.append(raw)
    return (top.findtext("filename") or "").strip() or None, rec


def _read_xml(xml: Path, image_dirs: list[Path], root: Path, skipped: list[Skip], note: str = "") -> RawImage | None:
    try:
        filename, rec = _parse(xml)
    except (OSError, ET.ParseError, ValueError) as e:
        skipped.append((str(xml), f"not readable Pascal VOC XML ({e})"))
        return None
    names = ([filename] if filename else []) + [xml.stem + e for e in IMG_EXTENSIONS]
    found = next((d / n for n in names for d in image_dirs if (d / n).is_file()), None)
    rec.path = str(found or image_dirs[0] / (filename or xml.stem + ".jpg"))
    rec.source = os.path.relpath(xml, root) + note
    return rec


def _image_sets(d: Path) -> dict[str, list[str]] | None:
    main = d / "ImageSets" / "Main"
    sets = {s: main / f"{s}.txt" for s in SET_NAMES if (main / f"{s}.txt").is_file()}
    if "train" not in sets and (main / "trainval.txt").is_file():
        sets["train"] = main / "trainval.txt"  # val is then carved out of it
    if not sets:
        return None
    out = {}
    for split, p in sets.items():
        try:
            out[split] = [line.split()[0] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{p} is not a readable image set ({e})") from None
    return out


def _read_annotations_dir(d: Path, root: Path) -> Level:
    ann = d / "Annotations"
    image_dirs = [p for p in (d / "JPEGImages", d / "images", d) if p.is_dir()]
    level = Level(splits={})
    xmls = sorted(p for p in ann.glob("*.xml") if not p.name.startswith("."))
    sets = _image_sets(d)
    if sets is None:
        recs = (_read_xml(p, image_dirs, root, level.skipped) for p in xmls)
        level.splits[""] = [r for r in recs if r]
        return level
    listed: set[Path] = set()
    for split, ids in sets.items():
        level.splits[split] = []
        for i in ids:
            xml = ann / f"{i}.xml"
            listed.add(xml)
            if not xml.is_file():
                level.skipped.append((str(xml), f"listed in ImageSets/Main/{split}.txt but there is no such file"))
            elif rec := _read_xml(xml, image_dirs, root, level.skipped, f" in {split}.txt"):
                level.splits[split].append(rec)
    level.skipped += [(str(p), "in no ImageSets/Main list (train, val, test)") for p in xmls if p not in listed]
    return level


def _read_beside(d: Path, root: Path) -> Level:
    level = Level(splits={"": []})
    images = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and _visible(p, d) and p.is_file())
    used = set()
    for img in images:
        xml = img.with_suffix(".xml")
        if xml.is_file():
            used.add(xml)
            rec = _read_xml(xml, [img.parent], root, level.skipped)
            if rec:
                rec.path = str(img)
                level.splits[""].append(rec)
        else:
            level.splits[""].append(RawImage(str(img), "no XML beside it: a negative"))
    level.skipped += [(str(p), "no image of the same name beside it")
                      for p in sorted(d.rglob("*.xml")) if p not in used and _visible(p, d)]
    return level


def read_level(d: Path, root: Path) -> Level:
    return _read_annotations_dir(d, root) if looks_like(d, root) else _read_beside(d, root)


def _class_file(root: Path) -> Path | None:
    return next((root / n for n in CLASS_FILES if (root / n).is_file()), None)


def resolve_classes(root: Path, levels: list[Level]) -> Classes:
    p = _class_file(root)
    if p is None:
        names = sorted({b.key for lv in levels for recs in lv.splits.values() for r in recs for b in r.boxes
                        if b.key and not b.problem})
        return Classes(names, {n: i for i, n in enumerate(names)}, lambda key: f"unknown class name {key!r}",
                       "classes: the names found, sorted")
    try:
        names = [n.strip() for n in p.read_text(encoding="utf-8").splitlines() if n.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p} is not a readable list of class names ({e})") from None
    if len(set(names)) != len(names):
        raise DataError(f"{p} names a class twice")
    return Classes(names, {n: i for i, n in enumerate(names)},
                   lambda key: f"unknown class name {key!r} (not in {p.name})", f"classes from {p.name}")
