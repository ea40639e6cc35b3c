"""Importers for real datasets we may use offline, written out as image folders.

Fashion-MNIST (Zalando SE, MIT licence) comes from the Debian package `dataset-fashion-mnist`
(idx files under /usr/share/datasets/fashion-mnist) or any folder holding the four idx files; a
stratified sample of it ships with resforge for the demo (`assets/fashion_mnist_sample.npz`).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SAMPLE_ASSET = "fashion_mnist_sample.npz"
DATASETS = ("fashion-mnist", "fashion-mnist-sample")  # what import_dataset writes

Split = tuple[np.ndarray, np.ndarray]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzipped) as a uint8 array."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, file has {len(raw) - offset} bytes of data")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root} has no {stem}[.gz]; install the Debian package dataset-fashion-mnist "
                    "or pass the folder holding the four Fashion-MNIST idx files")


def load_fashion_mnist(root: str | os.PathLike | None = None) -> dict[str, Split]:
    """{"train": (images N x 28 x 28, labels N), "test": ...} from the idx files in `root`."""
    root = Path(root) if root else FASHION_MNIST_DIR
    out = {}
    for split, (img_stem, lbl_stem) in _IDX_FILES.items():
        images, labels = read_idx(_find(root, img_stem)), read_idx(_find(root, lbl_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not pair up")
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{root}: {split} labels go beyond the 10 Fashion-MNIST classes")
        out[split] = (images, labels)
    return out


def load_fashion_mnist_sample() -> dict[str, Split]:
    """The stratified Fashion-MNIST sample that ships with resforge."""
    with resources.as_file(resources.files("resforge.assets") / SAMPLE_ASSET) as path, np.load(path) as z:
        return {split: (z[f"{split}_images"], z[f"{split}_labels"]) for split in ("train", "test")}


def write_image_folder(splits: dict[str, Split], classes: list[str], out: str | os.PathLike) -> Path:
    """Write `out/<split>/<class>/<index>.png`. The folder appears whole or not at all."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} already exists and is not empty; choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, (images, labels) in splits.items():
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
            for i, (img, label) in enumerate(zip(images, labels)):
                Image.fromarray(img).save(tmp / split / classes[label] / f"{i:05d}.png")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_dataset(name: str, out: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Write a known dataset as an image folder with its official train/test split.

    `fashion-mnist` reads the Debian package's idx files (or `source`); `fashion-mnist-sample` is
    the small stratified sample bundled with resforge.
    """
    if name == "fashion-mnist":
        splits = load_fashion_mnist(source)
    elif name == "fashion-mnist-sample":
        splits = load_fashion_mnist_sample()
    else:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return write_image_folder(splits, FASHION_MNIST_CLASSES, out)
