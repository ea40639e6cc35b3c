"""StarDist's nuclei, written as the segmentation folders a user would have (images/ + masks/, classes.txt).

The image comes from the BSD-3-licensed PyPI wheel `stardist` 0.9.2: `pip download stardist==0.9.2 --no-deps`
(works offline from the local package cache; none of its dependencies is installed), then only
`stardist/data/images/img2d.tif` and `mask2d.tif` are unzipped. img2d is a 512x512 fluorescence image stored
as 16-bit integers holding 0-235: it is written as the 8-bit PNG those values are (a 16-bit file is read as
16-bit, scaled down 257 times). mask2d labels each nucleus by its own id: collapsed to two classes,
background (0) and nucleus (1).

The scene is cut into a 4 x 4 grid of 128-px tiles: the 4 tiles of the right-hand column are the test set
(test/), a part of the scene no training tile comes from; the other 12 are the training folder (train/), from
which resforge's default carves its own validation split. Everything is written under one folder (default
benchmarks/.data/stardist) with a `.gitignore` of `*`; a second call reuses what is there.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

WHEEL = "stardist==0.9.2"
FILES = ("img2d.tif", "mask2d.tif")
TILE, GRID = 128, 4
CLASSES = ("background", "nucleus")


def fetch(root: Path) -> Path:
    """The wheel's two images under `root/raw` (downloaded and unzipped once)."""
    raw = root / "raw"
    if all((raw / name).is_file() for name in FILES):
        return raw
    root.mkdir(parents=True, exist_ok=True)
    (root / ".gitignore").write_text("*\n")
    wheels = root / "wheel"
    if not list(wheels.glob("stardist-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", str(wheels)],
                       check=True)
    raw.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(next(wheels.glob("stardist-*.whl"))) as z:
        for name in FILES:
            (raw / name).write_bytes(z.read(f"stardist/data/images/{name}"))
    return raw


def prepare(root: str | Path = Path(__file__).parent / ".data" / "stardist") -> dict[str, Path]:
    """{"train", "test"}: the two folders, written once."""
    root = Path(root)
    folders = {"train": root / "train", "test": root / "test"}
    if all((f / "classes.txt").is_file() for f in folders.values()):
        return folders
    raw = fetch(root)
    image = np.asarray(Image.open(raw / "img2d.tif")).astype(np.int64)
    mask = (np.asarray(Image.open(raw / "mask2d.tif")) > 0).astype(np.uint8)
    if image.max() > 255:
        raise SystemExit(f"{raw / 'img2d.tif'} holds values above 255: not the image this benchmark expects")
    for f in folders.values():
        (f / "images").mkdir(parents=True, exist_ok=True)
        (f / "masks").mkdir(parents=True, exist_ok=True)
        (f / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for row in range(GRID):
        for col in range(GRID):
            split = "test" if col == GRID - 1 else "train"
            window = np.s_[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
            name = f"img2d_r{row}_c{col}.png"
            Image.fromarray(image[window].astype(np.uint8), "L").save(folders[split] / "images" / name)
            Image.fromarray(mask[window], "L").save(folders[split] / "masks" / name)
    return folders


if __name__ == "__main__":
    for split, folder in prepare().items():
        print(split, folder, len(list((folder / "images").glob("*.png"))), "tiles")
