"""A folder of images as a dataset: scan, validate, split, decode.

Layouts: `root/<class>/...` (split here, stratified and seeded, as Keras'
`image_dataset_from_directory(validation_split=, seed=)` does) or `root/{train,val[,test]}/<class>/...`
(a missing val folder is carved out of train, so a test folder stays untouched).

Every file is decoded once before training. Empty, corrupt, truncated and non-image files, and
images over a pixel limit (decompression bombs), are skipped and listed with the reason, so an
epoch never stops on a bad file. Decoding applies the EXIF orientation and brings grayscale,
palette, RGBA, CMYK and 16-bit images to 8-bit RGB (or L).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError
from ..io import write_csv

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold

Sample = tuple[str, int]


@dataclass
class ImageFolderScan:
    """What a folder holds: classes, the usable samples of each split, and what was skipped."""

    root: str
    classes: list[str]
    layout: str  # "classes" or "splits"
    val_source: str  # "folder", or how it was split off
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    sizes: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # path -> (width, height, mode)

    def counts(self, split: str) -> list[int]:
        per_class = np.bincount([label for _, label in getattr(self, split)], minlength=len(self.classes))
        return per_class.tolist()

    def write_split_csv(self, path: str | os.PathLike) -> None:
        """Record which file went where, so the split is reproducible and auditable."""
        write_csv(path, ["split", "class", "path"],
                  ((split, self.classes[label], os.path.relpath(p, self.root))
                   for split in ("train", "val", "test") for p, label in getattr(self, split)))

    def write_skipped_csv(self, path: str | os.PathLike) -> None:
        write_csv(path, ["path", "reason"], ((os.path.relpath(p, self.root), r) for p, r in self.skipped))


def _convert(im: Image.Image, mode: str) -> Image.Image:
    """8-bit RGB or L from any PIL mode; 16-bit images are rescaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when a palette image with transparency goes to RGB directly
    return im if im.mode == mode else im.convert(mode)


def load_image(path: str | os.PathLike, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int | None = None) -> Image.Image:
    """Decode one image fully, upright and in `mode`; raise DataError naming the file if it can't be.

    With `min_size`, a large JPEG is decoded at a reduced DCT scale that keeps both sides at least
    `min_size` pixels: several times faster, and the image is resized to that size anyway.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise DataError(f"{path}: {im.width}x{im.height} pixels is over the limit of {max_pixels:,} "
                                "(a decompression bomb?)")
            if min_size and im.format == "JPEG":
                im.draft(mode, (min_size, min_size))
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy for the common upright image
            return _convert(im, mode)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: {e}") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{path}: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: corrupt or truncated ({e})") from None


def _list_class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _find_split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_DIRS.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found


def _stratified_split(samples: list[Sample], num_classes: int, val_split: float, seed: int
                      ) -> tuple[list[Sample], list[Sample]]:
    """Per class, a seeded `val_split` share goes to val: at least one image, and never the last one."""
    rng = np.random.default_rng(seed)
    by_class: list[list[Sample]] = [[] for _ in range(num_classes)]
    for s in sorted(samples):
        by_class[s[1]].append(s)
    train, val = [], []
    for items in by_class:
        order = rng.permutation(len(items))
        n_val = round(len(items) * val_split)
        if val_split > 0:
            n_val = max(n_val, 1)
        n_val = max(0, min(n_val, len(items) - 1))  # a class with no training image could not be learnt
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    return train, val


def scan_folder(root: str | os.PathLike, *, val_split: float = 0.2, seed: int = 123,
                max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None, strict: bool = True
                ) -> ImageFolderScan:
    """Find the classes and images under `root`, decode each once, split off validation.

    `strict` (training): at least two classes, none of them empty. Inspection and evaluation
    report or use such folders as they are.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    split_dirs = _find_split_dirs(root)
    layout = "splits" if "train" in split_dirs else "classes"
    train_dir = split_dirs.get("train", root)
    class_dirs = _list_class_dirs(train_dir)
    classes = [d.name for d in class_dirs]
    if not classes:
        raise DataError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<image files>")
    index = {c: i for i, c in enumerate(classes)}

    skipped: list[tuple[str, str]] = []
    candidates: dict[str, list[Sample]] = {}
    for split, folder in ({"train": train_dir} if layout == "classes" else split_dirs).items():
        stray = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        skipped += [(str(p), "not inside a class folder") for p in stray]
        found = []
        for d in _list_class_dirs(folder):
            if d.name not in index:
                raise DataError(f"{d} is a class the training folder {train_dir} does not have")
            for p in _list_files(d):
                if p.suffix.lower() in IMG_EXTENSIONS:
                    found.append((str(p), index[d.name]))
                else:
                    skipped.append((str(p), f"not an image extension ({p.suffix or 'none'})"))
        candidates[split] = found

    every = [s for split in candidates.values() for s in split]
    sizes: dict[str, tuple[int, int, str]] = {}

    def check(sample: Sample) -> tuple[Sample, str | None, tuple[int, int, str] | None]:
        try:
            im = load_image(sample[0], "RGB", max_pixels)
        except DataError as e:
            return sample, str(e).removeprefix(f"{sample[0]}: "), None
        with Image.open(sample[0]) as raw:  # the header only: the stored mode, for `data inspect`
            return sample, None, (im.width, im.height, raw.mode)

    bad = set()
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        for sample, reason, size in pool.map(check, every):
            if reason is None:
                sizes[sample[0]] = size
            else:
                skipped.append((sample[0], reason))
                bad.add(sample[0])
    good = {split: [s for s in samples if s[0] not in bad] for split, samples in candidates.items()}

    counts = np.bincount([label for _, label in good["train"]], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if counts.sum() == 0:
        raise DataError(f"no readable images under {train_dir} ({len(skipped)} files skipped)")
    if strict and empty:
        raise DataError(f"class folder(s) with no readable images in {train_dir}: {', '.join(empty)}")
    if strict and len(classes) < 2:
        raise DataError(f"{train_dir} has a single class ({classes[0]}); a classifier needs at least two")

    if "val" in good:
        train, val, val_source = good["train"], good["val"], "folder"
    else:
        train, val = _stratified_split(good["train"], len(classes), val_split, seed)
        val_source = f"{val_split:g} of each class, seed {seed}"
    return ImageFolderScan(root=str(root), classes=classes, layout=layout, val_source=val_source,
                           train=train, val=val, test=good.get("test", []), skipped=sorted(skipped),
                           sizes=sizes)


def scan_images(paths: list[str | os.PathLike]) -> list[str]:
    """Files, folders (searched recursively) and glob patterns, as a sorted list of image paths."""
    import glob

    out: list[str] = []
    for p in map(str, paths):
        is_pattern = any(c in p for c in "*?[") and not Path(p).exists()  # photo[1].jpg is a file name
        matches = sorted(glob.glob(p, recursive=True)) if is_pattern else [p]
        if not matches:
            raise DataError(f"no files match {p}")
        for m in map(Path, matches):
            if m.is_dir():
                out += [str(f) for f in _list_files(m) if f.suffix.lower() in IMG_EXTENSIONS]
            elif m.exists():
                out.append(str(m))
            else:
                raise DataError(f"no such file or folder: {m}")
    if not out:
        raise DataError(f"no images found in {', '.join(map(str, paths))}")
    return out
