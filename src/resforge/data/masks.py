"""Semantic-segmentation folders: images beside class masks, read into one form (`MaskScan`).

Layouts, at the top of the folder or inside split folders (train/, val/ or valid/, test/): `images/` + `masks/`,
matched by file stem; Pascal VOC's `JPEGImages/` + `SegmentationClass/`. A mask is:
  - a class-index image (8- or 16-bit grey, or a palette PNG, whose palette index is the class: Pascal VOC's
    convention): the value is the class, `ignore_index` (255) marks pixels no loss or metric counts;
  - an RGB colour mask, each class's colour given in `classes.yaml`.
Class names come from `classes.yaml` (a list of names, a list of {name, color}, or name: [r, g, b]),
`classes.txt` or `class_names.txt` (a name a line), else the values found (0, 1, ...).

A COCO instances folder (`--task segment` on what would be a detection folder) is read by the detection scan and
each image's instance masks are painted into a class mask: background 0, class k + 1 where an object of class k
lies, crowd regions and objects without a mask ignored.

Every mask is decoded once at the scan and checked against its image: a missing mask, a mask without an image,
a mask of another size than its image, a class value beyond the class list, an RGB colour not in the table, a
corrupt file: each goes to `skipped` with its reason and the file named, never to a crash mid-epoch. The pixels
of each class are counted on the way (inspection, class weights).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config import AugmentConfig
from ..errors import DataError
from ..io import write_csv
from .annotations import DetectionScan, Objects, read_recorded_split, read_split_rows, recognize, scan_detection, \
    seeded_split
from .folder import DEFAULT_MAX_PIXELS, IMG_EXTENSIONS, RECORDED, SPLIT_DIRS, check_size, load_image
from .loader import pil_to_tensor, seeded_sample
from .objects import decode_masks
from .tiles import tile_grid

PAIRS = (("images", "masks"), ("JPEGImages", "SegmentationClass"))  # image dir, mask dir
CLASS_FILES = ("classes.yaml", "classes.yml", "classes.txt", "class_names.txt")
MASK_EXTS = (".png", ".tif", ".tiff", ".bmp")  # lossless: a JPEG's artefacts are classes that do not exist
LOSSY_EXTS = (".jpg", ".jpeg", ".webp")
Color = tuple[int, int, int]


@dataclass
class MaskSample:
    """One image and its class mask, both decoded at the scan, with its pixels per class."""

    path: str  # absolute image path
    mask: str  # absolute mask path ("" when the mask is painted from `objects`)
    width: int
    height: int
    pixels: list[int]  # pixels of each class (ignored pixels not counted)
    objects: Objects | None = None  # a COCO image's instances, painted into its class mask when read


@dataclass
class MaskScan:
    """What a segmentation folder holds: the classes (and their colours), each split's pairs, what was skipped."""

    root: str
    reason: str  # the layout found and where the class names came from
    classes: list[str]
    colors: list[Color] | None  # RGB masks: the colour of each class
    ignore_index: int
    train: list[MaskSample]
    val: list[MaskSample]
    test: list[MaskSample] = field(default_factory=list)
    val_source: str = "folder"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def split_fixed(self) -> bool:
        return self.val_source in ("folder", RECORDED)

    def resplit(self, val_split: float, seed: int) -> MaskScan:
        if self.split_fixed:
            return self
        train, val = _split(self.train + self.val, val_split, seed)
        return replace(self, train=train, val=val, val_source=f"{val_split:g} of the images, seed {seed}")

    def pixel_counts(self, split: str) -> list[int]:
        counts = np.zeros(len(self.classes), dtype=np.int64)
        for s in getattr(self, split):
            counts += np.asarray(s.pixels, dtype=np.int64)
        return counts.tolist()

    def write_skipped_csv(self, path: str | os.PathLike) -> None:
        write_csv(path, ["path", "reason"], ((os.path.relpath(p, self.root), r) for p, r in self.skipped))

    def write_split_csv(self, path: str | os.PathLike) -> None:
        write_csv(path, ["split", "path"], ((split, os.path.relpath(s.path, self.root))
                                            for split in ("train", "val", "test") for s in getattr(self, split)))


def _split(samples: list[MaskSample], val_split: float, seed: int) -> tuple[list[MaskSample], list[MaskSample]]:
    """Images drawn in a seeded order into val (detection's rule, every image weighing one)."""
    return seeded_split(samples, val_split, seed, weight=lambda s: 1)


def _pair_dirs(folder: Path) -> tuple[Path, Path] | None:
    for images, masks in PAIRS:
        if (folder / images).is_dir() and (folder / masks).is_dir():
            return folder / images, folder / masks
    return None


def _levels(root: Path) -> dict[str, tuple[Path, Path]] | None:
    """split ("" for none) -> (image dir, mask dir), or None when the folder is no mask folder."""
    if pair := _pair_dirs(root):
        return {"": pair}
    splits = {s: root / n for s, names in SPLIT_DIRS.items() for n in names if (root / n).is_dir()}
    if "train" not in splits or not _pair_dirs(splits["train"]):
        return None
    found = {}
    for split, folder in splits.items():
        pair = _pair_dirs(folder)
        if pair is None:
            raise DataError(f"{folder} has no images/ + masks/ folders as {splits['train']} has")
        found[split] = pair
    return found


def recognize_masks(root: str | os.PathLike) -> str | None:
    """Why `root` is a segmentation folder (image and mask folders side by side), or None; reads names only."""
    root = Path(root)
    levels = _levels(root) if root.is_dir() else None
    if not levels:
        return None
    images, masks = next(iter(levels.values()))
    where = f" in {', '.join(s for s in levels)}" if "" not in levels else ""
    return f"{images.name}/ beside {masks.name}/{where}: images with class masks"


def _files(folder: Path, exts: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file, for the visible files of `exts` under `folder` (the relative path without suffix)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and p.suffix.lower() in exts and not any(part.startswith(".") for part in rel.parts):
            out[str(rel.with_suffix(""))] = p
    return out


def _read_classes(root: Path) -> tuple[list[str] | None, list[Color] | None, str]:
    """(names, colours, where they came from) from the folder's class file, or (None, None, why not)."""
    for name in CLASS_FILES:
        path = root / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else \
                [line.strip() for line in text.splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(f"{path}: not readable ({type(e).__name__}: {e})") from None
        if isinstance(data, dict) and "names" in data:  # a YOLO-style data.yaml-like file
            data = data["names"]
        return (*_parse_classes(data, path), f"class names from {name}")
    return None, None, "no class file (classes.yaml, classes.txt): classes named by their values"


def _parse_classes(data: Any, path: Path) -> tuple[list[str], list[Color] | None]:
    def color(value: Any, what: str) -> Color:
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
            raise DataError(f"{path}: the colour of {what} must be three whole numbers 0-255, not {value!r}")
        return (int(value[0]), int(value[1]), int(value[2]))

    if isinstance(data, dict):
        items = list(data.items())
        if all(isinstance(k, int) for k, _ in items):  # index: name
            return [str(v) for _, v in sorted(items)], None
        return [str(k) for k, _ in items], [color(v, repr(k)) for k, v in items]
    if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        names = [str(d.get("name", "")) for d in data]
        if not all(names):
            raise DataError(f"{path}: every class needs a name")
        colors = [color(d["color"], n) for d, n in zip(data, names)] if all("color" in d for d in data) else None
        return names, colors
    if isinstance(data, list) and data:
        return [str(d) for d in data], None
    raise DataError(f"{path}: expected a list of class names, a list of {{name, color}}, or name: [r, g, b]")


def read_mask(path: str | os.PathLike, colors: list[Color] | None = None,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A mask file as an H x W int64 array of class values: palette and grey images by value, RGB images through
    `colors` (an RGB mask of greys, by value, when there are none). DataError names the file and the problem."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            check_size(im.width, im.height, str(path), max_pixels)
            im.load()
            if im.mode in ("RGB", "RGBA"):
                rgb = np.asarray(im.convert("RGB"))
                if colors is None:
                    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                        raise DataError(f"{path}: an RGB colour mask, but no class file gives the colours "
                                        "(classes.yaml: name: [r, g, b])")
                    return rgb[..., 0].astype(np.int64)
                return _by_color(rgb, colors, path)
            if im.mode == "LA":
                im = im.getchannel(0)
            return np.asarray(im).astype(np.int64)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable mask ({e})") from None


def paint(obj: Objects, ignore_index: int) -> np.ndarray:
    """A COCO image's instances as one H x W class mask: 0 the background, k + 1 where an object of class k lies
    (larger objects first, so a small one is never hidden under a large one); crowd regions, and the boxes of
    objects annotated without a mask, `ignore_index`."""
    out = np.zeros((obj.height, obj.width), dtype=np.int64)
    for box, seg in zip(obj.boxes, obj.masks or [None] * len(obj.boxes)):
        if not seg:  # where such an object lies is known only to its box
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            out[y1:y2, x1:x2] = ignore_index
    if obj.masks:
        decoded = decode_masks(obj).numpy().astype(bool)
        for k in np.argsort([-int(m.sum()) for m in decoded], kind="stable"):
            if obj.masks[k]:
                crowd = obj.iscrowd is not None and obj.iscrowd[k]
                out[decoded[k]] = ignore_index if crowd else obj.labels[k] + 1
    return out


def sample_mask(sample: MaskSample, colors: list[Color] | None, ignore_index: int,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A sample's H x W class values: its mask file read, or its instances painted."""
    if sample.objects is not None:
        return paint(sample.objects, ignore_index)
    return read_mask(sample.mask, colors, max_pixels)


def _by_color(rgb: np.ndarray, colors: list[Color], path: Path) -> np.ndarray:
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(colors)}
    values, inverse = np.unique(code, return_inverse=True)
    unknown = [int(v) for v in values if int(v) not in table]
    if unknown:
        v = unknown[0]
        raise DataError(f"{path}: colour ({v >> 16}, {(v >> 8) & 255}, {v & 255}) is not in the class table"
                        f"{f' ({len(unknown)} colours are not)' if len(unknown) > 1 else ''}")
    return np.asarray([table[int(v)] for v in values], dtype=np.int64)[inverse].reshape(code.shape)


def _check(image: Path, mask: Path, colors: list[Color] | None, num_classes: int | None, ignore_index: int,
           max_pixels: int) -> tuple[str, Any]:
    """("ok", (width, height, values, counts)) or ("skip", reason) for one pair."""
    try:
        size = load_image(image, "RGB", max_pixels).size
    except DataError as e:
        return "skip", str(e).removeprefix(f"{image}: ")
    try:
        values = read_mask(mask, colors, max_pixels)
    except DataError as e:
        return "skip", f"its mask {mask.name}: {str(e).removeprefix(f'{mask}: ')}"
    if values.shape != (size[1], size[0]):
        return "skip", (f"its mask {mask.name} is {values.shape[1]}x{values.shape[0]} but the image is "
                        f"{size[0]}x{size[1]}")
    kept = values[values != ignore_index]
    found, counts = np.unique(kept, return_counts=True)
    if len(found) and found[0] < 0:
        return "skip", f"its mask {mask.name} holds the negative value {int(found[0])}"
    if num_classes is not None and len(found) and found[-1] >= num_classes:
        return "skip", (f"its mask {mask.name} holds class value {int(found[-1])}, beyond the {num_classes} "
                        f"classes (0-{num_classes - 1}; {ignore_index} is ignored)")
    return "ok", (size[0], size[1], found.tolist(), counts.tolist())


def scan_masks(root: str | os.PathLike, *, ignore_index: int = 255, val_split: float = 0.2, seed: int = 0,
               max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None,
               recorded: list[tuple[str, str]] | None = None) -> MaskScan:
    """Pair every image with its mask, decode both once, check them, count the pixels of each class, and split
    (split folders as given; else a seeded `val_split` share of the images; `recorded`: a run's split.csv rows)."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    levels = _levels(root)
    if levels is None and recognize(root)[0] == "coco":
        if recorded is not None:
            raise ValueError("a COCO folder's recorded split is read by read_recorded_masks")
        return _painted(scan_detection(root, val_split=val_split, seed=seed, max_pixels=max_pixels, threads=threads),
                        ignore_index)
    if levels is None:
        raise DataError(f"no segmentation folder in {root}: looked for images/ beside masks/, JPEGImages/ beside "
                        "SegmentationClass/ (at the top or in train/, val/, test/), or a COCO instances JSON")
    names, colors, note = _read_classes(root)
    skipped: list[tuple[str, str]] = []
    pairs: list[tuple[str, Path, Path]] = []
    for split, (image_dir, mask_dir) in levels.items():
        images, masks = _files(image_dir, IMG_EXTENSIONS), _files(mask_dir, MASK_EXTS)
        lossy = _files(mask_dir, LOSSY_EXTS)
        for stem, image in images.items():
            if stem in masks:
                pairs.append((split, image, masks[stem]))
            elif stem in lossy:
                skipped.append((str(image), f"its mask {lossy[stem].name} is lossy ({lossy[stem].suffix}): compression "
                                            "invents class values along every edge; save masks as PNG"))
            else:
                skipped.append((str(image), f"no mask for it in {os.path.relpath(mask_dir, root)}/"))
        skipped += [(str(m), f"a mask without an image in {os.path.relpath(image_dir, root)}/")
                    for stem, m in {**lossy, **masks}.items() if stem not in images]
    n = len(names) if names is not None else None
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        checked = list(pool.map(lambda p: _check(p[1], p[2], colors, n, ignore_index, max_pixels), pairs))
    good = []
    for (split, image, mask), (status, result) in zip(pairs, checked):
        if status == "skip":
            skipped.append((str(image), result))
        else:
            good.append((split, image, mask, result))
    if names is None:
        top = max((max(r[2]) for *_, r in good if r[2]), default=0)
        names = [str(i) for i in range(top + 1)]
    if len(names) < 2:
        raise DataError(f"the masks in {root} hold one class only ({names[0] if names else 'none'}; "
                        f"{ignore_index} is ignored: --ignore-index): segmentation tells two or more apart")

    def sample(image: Path, mask: Path, r: Any) -> MaskSample:
        counts = np.zeros(len(names), dtype=np.int64)
        counts[np.asarray(r[2], dtype=np.int64)] = r[3]
        return MaskSample(str(image), str(mask), r[0], r[1], counts.tolist())

    by_split: dict[str, list[MaskSample]] = {}
    for split, image, mask, r in good:
        by_split.setdefault(split, []).append(sample(image, mask, r))
    reason = f"{recognize_masks(root)}; {note}"
    if recorded is not None:
        return _recorded(root, reason, names, colors, ignore_index, by_split, skipped, recorded)
    train = sorted(by_split.get("train", []) + by_split.get("", []), key=lambda s: s.path)
    if not train:
        first = "; ".join(f"{os.path.relpath(p, root)}: {r}" for p, r in sorted(skipped)[:3])
        raise DataError(f"no usable image with its mask in {root} ({len(skipped)} skipped{': ' + first if first else ''})")
    if "val" in by_split:
        val, source = sorted(by_split["val"], key=lambda s: s.path), "folder"
    else:
        train, val = _split(train, val_split, seed)
        source = f"{val_split:g} of the images, seed {seed}"
    return MaskScan(str(root), reason, names, colors, ignore_index, train, val,
                    sorted(by_split.get("test", []), key=lambda s: s.path), source, sorted(skipped))


def _recorded(root: Path, reason: str, names: list[str], colors: list[Color] | None, ignore_index: int,
              by_split: dict[str, list[MaskSample]], skipped: list[tuple[str, str]],
              rows: list[tuple[str, str]]) -> MaskScan:
    """The folder as a run recorded it: the same images in the same splits, new ones skipped with the reason."""
    usable = {s.path: s for samples in by_split.values() for s in samples}
    known = {p for p, _ in skipped}
    split: dict[str, list[MaskSample]] = {"train": [], "val": [], "test": []}
    recorded = set()
    for s, rel in rows:
        p = os.path.normpath(os.path.join(root, rel))
        recorded.add(p)
        if p in usable:
            split[s].append(usable[p])
        elif p not in known:
            skipped.append((p, "in the recorded split but no longer in the folder"))
    skipped += [(p, "added since the run started: not in its recorded split") for p in usable if p not in recorded]
    if not split["train"]:
        raise DataError(f"none of the images the run recorded for training is usable in {root}")
    return MaskScan(str(root), reason, names, colors, ignore_index, split["train"], split["val"], split["test"],
                    RECORDED, sorted(skipped))


def read_recorded_masks(root: str | os.PathLike, split_csv: str | os.PathLike, *, ignore_index: int = 255,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> MaskScan:
    """The folder as a run recorded it in its split.csv (resume, evaluation of its splits)."""
    if _levels(Path(root)) is None and recognize(root)[0] == "coco":
        return _painted(read_recorded_split(root, split_csv, max_pixels=max_pixels), ignore_index)
    return scan_masks(root, ignore_index=ignore_index, max_pixels=max_pixels, recorded=read_split_rows(split_csv))


def _painted(det: DetectionScan, ignore_index: int) -> MaskScan:
    """A COCO detection scan as a segmentation scan: each image's instances painted into its class mask."""
    images = det.train + det.val + det.test
    if not any(m for o in images for m in (o.masks or [])):
        raise DataError(f"{det.root} holds boxes without instance masks (COCO polygons or RLE): segmentation "
                        "needs masks")
    names = ["background", *det.classes]

    def sample(o: Objects) -> MaskSample:
        values = paint(o, ignore_index)
        counts = np.bincount(values[values != ignore_index], minlength=len(names))
        return MaskSample(o.path, "", o.width, o.height, counts.tolist(), o)

    return MaskScan(det.root, f"{det.reason}; instances painted into class masks", names, None, ignore_index,
                    [sample(o) for o in det.train], [sample(o) for o in det.val], [sample(o) for o in det.test],
                    det.val_source, det.skipped)


# ---- drawing ----

def palette(num_classes: int, colors: list[Color] | None = None) -> np.ndarray:
    """K x 3 uint8 colours: the class table's, else Pascal VOC's bit-interleaved palette (black background)."""
    if colors:
        return np.asarray(colors, dtype=np.uint8)
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        v, r, g, b = c, 0, 0, 0
        for bit in range(8):
            r |= ((v >> 0) & 1) << (7 - bit)
            g |= ((v >> 1) & 1) << (7 - bit)
            b |= ((v >> 2) & 1) << (7 - bit)
            v >>= 3
        out[c] = (r, g, b)
    return out


def overlay(image: np.ndarray, mask: np.ndarray, colors: np.ndarray, ignore: int, alpha: float = 0.5) -> np.ndarray:
    """The image (H x W x C uint8) with each pixel's class colour laid over it; ignored pixels left as they are."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    known = (mask != ignore) & (mask < len(colors)) & (mask >= 0)
    out = rgb.astype(np.float32)
    out[known] = (1 - alpha) * out[known] + alpha * colors[mask[known]]
    return out.round().astype(np.uint8)



# ---- datasets ----

SCALE_RANGE = (0.5, 2.0)  # training's scale jitter around the base size (torchvision's reference, mmseg's)


def _rescale(image: tv_tensors.Image, mask: tv_tensors.Mask, factor: float) -> tuple[Any, Any]:
    h, w = image.shape[-2:]
    size = [max(1, round(h * factor)), max(1, round(w * factor))]
    return TF.resize(image, size, antialias=True), TF.resize(mask, size)  # a Mask is resized by its nearest value


class MaskDataset(Dataset):
    """(image, mask) pairs: a normalised float C x H x W image and an H x W int64 mask of class values.

    Training (`augment` given) draws every sample at a random scale of its base size (`SCALE_RANGE`), crops
    `size` px at a random place (padding with the ignored value where the image is smaller), flips, turns and
    jitters colour as `augment` says. The base size is the image's own with `tile` (large images, small
    structures: one window of the grid a sample, so an epoch covers every part of every image), else the image
    scaled to a shorter side of `size`. Evaluation gives each window of the grid (`tile`), or the whole image at
    the base size; `collate_masks` pads a batch to its largest image."""

    def __init__(self, samples: Sequence[MaskSample], size: int, mean: Sequence[float], std: Sequence[float], *,
                 augment: AugmentConfig | None = None, tile: int | None = None, overlap: float = 0.0,
                 colors: list[Color] | None = None, ignore_index: int = 255, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, mode: str = "RGB"):
        self.samples, self.size, self.tile = list(samples), size, tile
        self.colors, self.ignore_index, self.seed = colors, ignore_index, seed
        self.max_pixels, self.mode = max_pixels, mode
        self.windows = [(i, w) for i, s in enumerate(self.samples)
                        for w in (tile_grid(s.width, s.height, tile, overlap) if tile else [None])]
        self.augment = augment
        steps: list[Any] = []
        if augment is not None:
            steps.append(v2.RandomCrop(size, pad_if_needed=True,
                                       fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}))
            if augment.hflip:
                steps.append(v2.RandomHorizontalFlip(augment.hflip))
            if augment.vflip:
                steps.append(v2.RandomVerticalFlip(augment.vflip))
            if augment.rotation >= 90:  # right angles: a mask turned by another angle needs a fill
                steps.append(v2.RandomChoice([v2.Identity()] + [v2.RandomRotation((a, a), expand=True)
                                                                for a in (90, 180, 270)]))
            if augment.color_jitter:
                steps.append(v2.RandomPhotometricDistort(p=augment.color_jitter))
        steps += [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
                  v2.Normalize(list(mean), list(std))]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.windows)

    def raw(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Sample `i`'s image (uint8) and mask as decoded, whole."""
        s = self.samples[i]
        image = tv_tensors.Image(pil_to_tensor(load_image(s.path, self.mode, self.max_pixels)))
        mask = tv_tensors.Mask(torch.from_numpy(sample_mask(s, self.colors, self.ignore_index, self.max_pixels)))
        return image, mask

    def _get(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, window = self.windows[k]
        image, mask = self.raw(i)
        if window is not None:
            x1, y1, x2, y2 = window
            if self.augment is not None:  # room around the window for the zoomed-out crop
                m = self.size // 2
                h, w = image.shape[-2:]
                x1, y1, x2, y2 = max(0, x1 - m), max(0, y1 - m), min(w, x2 + m), min(h, y2 + m)
            image, mask = tv_tensors.Image(image[..., y1:y2, x1:x2]), tv_tensors.Mask(mask[..., y1:y2, x1:x2])
            base = 1.0
        else:
            base = self.size / min(image.shape[-2:])
        if self.augment is not None:
            base *= float(torch.empty(()).uniform_(*SCALE_RANGE))
        if base != 1.0:
            image, mask = _rescale(image, mask, base)
        image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return seeded_sample(key, self.seed, self._get)


def collate_masks(batch: list[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = 255
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded to its largest image (images with 0, masks with the ignored value), bottom and right."""
    h = max(image.shape[-2] for image, _ in batch)
    w = max(image.shape[-1] for image, _ in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], h, w, dtype=batch[0][0].dtype)
    masks = torch.full((len(batch), h, w), ignore_index, dtype=torch.int64)
    for k, (image, mask) in enumerate(batch):
        images[k, :, :image.shape[-2], :image.shape[-1]] = image
        masks[k, :mask.shape[-2], :mask.shape[-1]] = mask
    return images, masks
