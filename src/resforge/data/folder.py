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

import errno
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError, ImageError
from ..io import write_csv

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# The only formats decoding tries (PIL's names), whatever a file's name or first bytes claim: PIL's
# other plugins include EPS, which hands the file to Ghostscript.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold
# Every open checks our own pixel limit before decoding; PIL's global one would stop a higher limit at
# 178,956,970 (twice its warning threshold) and warn below it. Set once for the process: decoding
# runs in thread pools, where a per-call setting would race.
Image.MAX_IMAGE_PIXELS = None

Sample = tuple[str, int]


RECORDED = "as recorded in split.csv"  # the val_source of a split read back from a run


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
    new_files: list[str] = field(default_factory=list)  # in the folder but not in the recorded split

    def counts(self, split: str) -> list[int]:
        per_class = np.bincount([label for _, label in getattr(self, split)], minlength=len(self.classes))
        return per_class.tolist()

    def write_split_csv(self, path: str | os.PathLike) -> None:
        """Record which file went where, so the split is reproducible and auditable."""
        write_csv(path, ["split", "class", "path"],
                  ((split, self.classes[label], os.path.relpath(p, self.root))
                   for split in ("train", "val", "test") for p, label in getattr(self, split)))

    @property
    def split_fixed(self) -> bool:
        """The validation images are given (a val folder, or a run's recorded split), not drawn here."""
        return self.val_source in ("folder", RECORDED)

    def resplit(self, val_split: float, seed: int) -> ImageFolderScan:
        """The same images with another validation share, chosen after the scan (a fixed split stays as it is)."""
        if self.split_fixed:
            return self
        train, val = _stratified_split(self.train + self.val, len(self.classes), val_split, seed)
        return replace(self, train=train, val=val, val_source=f"{val_split:g} of each class, seed {seed}")

    def write_skipped_csv(self, path: str | os.PathLike) -> None:
        write_csv(path, ["path", "reason"], ((os.path.relpath(p, self.root), r) for p, r in self.skipped))


def convert_mode(im: Image.Image, mode: str) -> Image.Image:
    """8-bit RGB or L from any PIL mode; 16-bit images are rescaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns when a palette image with transparency goes to RGB directly
    return im if im.mode == mode else im.convert(mode)


def check_size(width: int, height: int, label: str, max_pixels: int, max_aspect: float | None = None) -> None:
    """Refuse an image by its size alone, before it is decoded or resized: more pixels than `max_pixels`,
    or a long side more than `max_aspect` times the short one (resizing its short side to a model's input
    would make the long side that many times larger: a few bytes of PNG become gigabytes)."""
    if width * height > max_pixels:
        raise ImageError(f"{label}: {width}x{height} pixels is over the limit of {max_pixels:,} "
                         "(a decompression bomb?)", "too many pixels")
    if max_aspect is not None and max(width, height) > max_aspect * max(min(width, height), 1):
        raise ImageError(f"{label}: {width}x{height} pixels is over the aspect-ratio limit of {max_aspect:g} "
                         "(its long side is resized in proportion to its short side)", "too elongated")


def load_image(source: str | os.PathLike | bytes, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int | None = None, name: str | None = None, formats: Sequence[str] = IMAGE_FORMATS,
               max_aspect: float | None = None) -> Image.Image:
    """Decode one image fully, upright and in `mode`; raise DataError naming it if it can't be.

    `source` is a path or the bytes of an image file (what a server receives); errors name it by
    `name`, else the path, else "image". Only `formats` are tried, and `check_size` is applied to the
    size the header declares. With `min_size`, a large JPEG is decoded at a reduced DCT scale that keeps
    both sides at least `min_size` pixels: several times faster, and the image is resized to that size anyway.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "image"
        if not len(source):
            raise ImageError(f"{label}: empty file", "empty")
        fp: Path | io.BytesIO = io.BytesIO(source)
    else:
        fp = Path(source)
        label = name or str(fp)
        if fp.is_symlink() and (problem := _link_problem(fp)):
            raise ImageError(f"{label}: {problem}", "missing")
    try:
        if isinstance(fp, Path) and fp.stat().st_size == 0:
            raise ImageError(f"{label}: empty file", "empty")
        with Image.open(fp, formats=list(formats)) as im:
            check_size(im.width, im.height, label, max_pixels, max_aspect)
            if min_size and im.format == "JPEG":
                im.draft(mode, (min_size, min_size))
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy for the common upright image
            return convert_mode(im, mode)
    except DataError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{label}: no such file", "missing") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: a folder, not an image file", "missing") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{label}: not an image in a format accepted here ({', '.join(formats)})",
                         "not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{label}: corrupt or truncated ({e})", "corrupt") from None


def thumbnail(path: str | os.PathLike, mode: str, size: int = 112) -> np.ndarray:
    """A small copy of an image for figures (grids of samples, predictions, mistakes)."""
    im = load_image(path, mode, min_size=size)
    im.thumbnail((size, size))
    return np.asarray(im)


def _list_class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _link_problem(p: Path) -> str | None:
    """Why a symbolic link cannot be read as an image file, or None if it leads to one."""
    try:
        target = p.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "symbolic link loop"
    except OSError as e:
        return "symbolic link loop" if e.errno == errno.ELOOP else "broken symbolic link"
    return "symbolic link to a folder (not followed)" if target.is_dir() else None


def _list_files(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Visible files under `folder` (links to files included), and the links that lead nowhere usable."""
    files, skipped = [], []
    for p in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.is_symlink():
            problem = _link_problem(p)
            if problem:
                skipped.append((str(p), problem))
                continue
        if p.is_file():
            files.append(p)
    return files, skipped


def _find_split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_DIRS.items():
        for name in names:
            if (root / name).is_dir():
                found[split] = root / name
                break
    return found


def _check_layout(root: Path, split_dirs: dict[str, Path], need_train: bool) -> bool:
    """Refuse a folder that mixes split folders with class folders: one of them would be dropped unseen.
    True when the folder is a split layout (without train/ only where none is needed: evaluation)."""
    split_names = {n for names in SPLIT_DIRS.values() for n in names}
    splits = [p for p in split_dirs.values() if _list_class_dirs(p)]
    if "train" in split_dirs or (splits and not need_train):
        others = [d.name for d in _list_class_dirs(root) if d.name not in split_names]
        if others:
            raise DataError(f"{root} holds split folders ({', '.join(sorted(p.name for p in split_dirs.values()))}) "
                            f"and also {', '.join(others)}, which is not a split: move it into "
                            f"{(split_dirs.get('train') or splits[0]).name}/ as a class, or out of {root}")
        return True
    if splits:
        raise DataError(f"{root} has a {splits[0].name}/ folder of classes but no train/ folder: put the "
                        f"training classes in {root / 'train'}/ (or rename {splits[0].name}/ if it is a class)")
    return False


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


@dataclass
class _Listing:
    """What a folder holds before any file is decoded."""

    layout: str
    train_dir: Path
    classes: list[str]
    candidates: dict[str, list[Sample]]  # split -> files with an image extension, in class folders
    skipped: list[tuple[str, str]]


def _list_folder(root: Path, need_train: bool = True) -> _Listing:
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder of images (root/<class>/<image files>)")
    split_dirs = _find_split_dirs(root)
    layout = "splits" if _check_layout(root, split_dirs, need_train) else "classes"
    if layout == "splits" and "train" not in split_dirs:  # evaluation of a folder holding only test/ or val/
        train_dir = next(iter(split_dirs.values()))
        classes = sorted({d.name for p in split_dirs.values() for d in _list_class_dirs(p)})
    else:
        train_dir = split_dirs.get("train", root)
        classes = [d.name for d in _list_class_dirs(train_dir)]
    if not classes:
        raise DataError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<image files>")
    index = {c: i for i, c in enumerate(classes)}
    skipped: list[tuple[str, str]] = []
    candidates: dict[str, list[Sample]] = {}
    for split, folder in ({"train": train_dir} if layout == "classes" else split_dirs).items():
        stray = [p for p in folder.iterdir() if not p.is_dir() and not p.name.startswith(".")]
        skipped += [(str(p), "not inside a class folder") for p in stray]
        found = []
        for d in _list_class_dirs(folder):
            if d.name not in index:
                raise DataError(f"{d} is a class the training folder {train_dir} does not have")
            files, bad_links = _list_files(d)
            skipped += bad_links
            for p in files:
                if p.suffix.lower() in IMG_EXTENSIONS:
                    found.append((str(p), index[d.name]))
                else:
                    skipped.append((str(p), f"not an image extension ({p.suffix or 'none'})"))
        candidates[split] = found
    return _Listing(layout, train_dir, classes, candidates, skipped)


def _decode_all(samples: list[Sample], max_pixels: int, threads: int | None
                ) -> tuple[dict[str, tuple[int, int, str]], list[tuple[str, str]]]:
    """Decode every file once: (path -> (width, height, stored mode) of the good ones, [(path, reason)])."""
    def check(sample: Sample) -> tuple[Sample, str | None, tuple[int, int, str] | None]:
        try:
            im = load_image(sample[0], "RGB", max_pixels)
        except DataError as e:
            return sample, str(e).removeprefix(f"{sample[0]}: "), None
        with Image.open(sample[0], formats=IMAGE_FORMATS) as raw:  # the header: the stored mode, for `data inspect`
            return sample, None, (im.width, im.height, raw.mode)

    sizes, skipped = {}, []
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        for sample, reason, size in pool.map(check, samples):
            if reason is None:
                sizes[sample[0]] = size
            else:
                skipped.append((sample[0], reason))
    return sizes, skipped


def _check_classes(train: list[Sample], classes: list[str], train_dir: Path, skipped: int, strict: bool) -> None:
    counts = np.bincount([label for _, label in train], minlength=len(classes))
    if counts.sum() == 0:
        raise DataError(f"no readable images under {train_dir} ({skipped} files skipped)")
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if strict and empty:
        raise DataError(f"class folder(s) with no readable images in {train_dir}: {', '.join(empty)}")
    if strict and len(classes) < 2:
        raise DataError(f"{train_dir} has a single class ({classes[0]}); a classifier needs at least two")


def scan_folder(root: str | os.PathLike, *, val_split: float = 0.2, seed: int = 123,
                max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None, strict: bool = True
                ) -> ImageFolderScan:
    """Find the classes and images under `root`, decode each once, split off validation.

    `strict` (training): at least two classes, none of them empty. Inspection and evaluation
    report or use such folders as they are.
    """
    root = Path(root)
    listing = _list_folder(root, need_train=strict)
    every = [s for split in listing.candidates.values() for s in split]
    sizes, bad = _decode_all(every, max_pixels, threads)
    good = {split: [s for s in samples if s[0] in sizes] for split, samples in listing.candidates.items()}
    skipped = listing.skipped + bad
    _check_classes(good.get("train") or [s for g in good.values() for s in g], listing.classes, listing.train_dir,
                   len(skipped), strict)
    if "train" not in good:  # evaluation of a folder holding only test/ or val/
        train, val, val_source = [], good.get("val", []), "folder"
    elif "val" in good:
        train, val, val_source = good["train"], good["val"], "folder"
    else:
        train, val = _stratified_split(good["train"], len(listing.classes), val_split, seed)
        val_source = f"{val_split:g} of each class, seed {seed}"
    return ImageFolderScan(root=str(root), classes=listing.classes, layout=listing.layout, val_source=val_source,
                           train=train, val=val, test=good.get("test", []), skipped=sorted(skipped), sizes=sizes)


def recorded_split(model: str | os.PathLike, run: str | None) -> Path | None:
    """The split.csv of the run that trained the model file `model`, whose record names the run folder
    `run`; None when it is not found. Found from the model file, never the working directory: the
    recorded folder (an older record holds it relative to where training ran, so it is the folder above
    the model whose path ends with it), else the model's own folder."""
    here = Path(model).resolve().parent
    found = []
    if run:
        recorded = Path(run)
        found = [recorded] if recorded.is_absolute() else [
            a for a in (here, *here.parents) if a.parts[len(a.parts) - len(recorded.parts):] == recorded.parts]
    return next((f / "split.csv" for f in [*found, here] if (f / "split.csv").is_file()), None)


def recorded_samples(data: str | os.PathLike, split_csv: str | os.PathLike, split: str, classes: list[str]
                     ) -> list[Sample]:
    """(file, class index in `classes`) of one split as a run recorded it, the files still there; nothing
    is decoded (`scan_recorded_split` checks every file, for training)."""
    index = {c: i for i, c in enumerate(classes)}
    return [(str(Path(data) / rel), index[c]) for s, c, rel in read_split_csv(split_csv)
            if s == split and c in index and (Path(data) / rel).is_file()]


def read_split_csv(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """The (split, class, path relative to the data folder) rows a run recorded in its split.csv."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        out = [(r["split"], r["class"], r["path"]) for r in rows]
    except (OSError, KeyError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path} is not a readable split record ({type(e).__name__}: {e})") from None
    if not out or any(split not in SPLIT_DIRS for split, _, _ in out):
        raise DataError(f"{path} is not a split record (rows of split train/val/test, class, path)")
    return out


def scan_recorded_split(root: str | os.PathLike, split_csv: str | os.PathLike, *,
                        max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None) -> ImageFolderScan:
    """The folder as a run recorded it: the same files in the same splits, never drawn again.

    Files that are gone (or no longer readable) are left out and listed as skipped; files added
    since are left out too, listed as skipped and in `new_files`, so validation stays the images
    the model never trained on.
    """
    root = Path(root)
    listing = _list_folder(root)
    index = {c: i for i, c in enumerate(listing.classes)}
    rows = read_split_csv(split_csv)
    then = sorted({cls for _, cls, _ in rows})
    if then != sorted(listing.classes):
        raise DataError(f"the classes in {root} changed since the run started ({', '.join(then)} then, "
                        f"{', '.join(listing.classes)} now); start a new run")
    recorded: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for split, cls, rel in rows:
        recorded[split].append((str(root / rel), index[cls]))
    known = {p for samples in recorded.values() for p, _ in samples}
    gone = [(p, "in the recorded split but no longer in the folder")
            for p in sorted(known) if not Path(p).is_file()]
    present = [s for samples in recorded.values() for s in samples if Path(s[0]).is_file()]
    sizes, bad = _decode_all(present, max_pixels, threads)
    good = {split: [s for s in samples if s[0] in sizes] for split, samples in recorded.items()}
    new = sorted(p for samples in listing.candidates.values() for p, _ in samples if p not in known)
    added = [(p, "added since the run started: not in its recorded split") for p in new]
    skipped = listing.skipped + gone + bad + added
    _check_classes(good["train"], listing.classes, listing.train_dir, len(skipped), strict=True)
    return ImageFolderScan(root=str(root), classes=listing.classes, layout=listing.layout,
                           val_source=RECORDED, train=good["train"], val=good["val"],
                           test=good["test"], skipped=sorted(skipped), sizes=sizes, new_files=new)


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
                files, bad_links = _list_files(m)  # bad links stay in, to be reported as unreadable
                out += sorted([str(f) for f in files if f.suffix.lower() in IMG_EXTENSIONS] + [p for p, _ in bad_links])
            elif m.exists() or m.is_symlink():
                out.append(str(m))
            else:
                raise DataError(f"no such file or folder: {m}")
    if not out:
        raise DataError(f"no images found in {', '.join(map(str, paths))}")
    return out
