"""DeepForest's aerial tree crowns, written as the detection folders a user would have (Pascal VOC XML beside
each PNG, which resforge recognises).

The images come from the MIT-licensed PyPI wheel `deepforest` 2.1.0 (NEON airborne imagery, 10 cm a pixel):
`pip download deepforest==2.1.0 --no-deps` (works offline from the local package cache; none of its
dependencies is installed), then only `deepforest/data/*` is unzipped. One class, "Tree": SOAP_061's
Alive/Dead labels are both mapped to it.

  - train/: 2019_YELL_2_541000_4977000_image_crop (1249x1035, 279 trees), OSBS_029 (400x400, 61) and
    SOAP_061 (400x400, 37; 28 Dead + 9 Alive, as Tree);
  - train-val-soap/: the same three images in split folders, train/ (the Yellowstone scene and OSBS_029) and
    val/ (SOAP_061): a validation image the user chose, for the arm that compares it with the default's split;
  - test-tiles/: the other Yellowstone scene, 2019_YELL_2_528000_4978000_image_crop2 (2299x2472, 574 trees),
    cut into 400-px tiles (an evenly spread grid with no overlap asked: 6 x 7 tiles, neighbours sharing
    the few pixels that make the grid fit; a box kept, clipped, in the tile holding at least half of it):
    a scene no training image comes from;
  - test-scene/: that scene whole (sliced inference against one downscaled pass).

Everything is written under one folder (the benchmark's `--data`, default benchmarks/.data/deepforest),
which gets a `.gitignore` of `*` so none of it is ever committed; a second call reuses what is there.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from PIL import Image

from resforge.data.annotations import recognize, scan_detection
from resforge.data.tiles import tile_samples

WHEEL = "deepforest==2.1.0"
TRAIN = ("2019_YELL_2_541000_4977000_image_crop", "OSBS_029", "SOAP_061")
TEST = "2019_YELL_2_528000_4978000_image_crop2"
CLASS = "Tree"
TEST_TILE = 400


def fetch(root: Path) -> Path:
    """The wheel's data folder under `root/raw` (downloaded and unzipped once)."""
    raw = root / "raw"
    wanted = [f"{stem}.{ext}" for stem in (*TRAIN, TEST) for ext in ("png", "xml")]
    if all((raw / name).is_file() for name in wanted):
        return raw
    root.mkdir(parents=True, exist_ok=True)
    (root / ".gitignore").write_text("*\n")
    wheels = root / "wheel"
    if not list(wheels.glob("deepforest-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", str(wheels)],
                       check=True)
    wheel = next(wheels.glob("deepforest-*.whl"))
    raw.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in wanted:
            (raw / name).write_bytes(z.read(f"deepforest/data/{name}"))
    return raw


def _one_class(xml: Path, image_name: str, out: Path) -> int:
    """The VOC file with every object named CLASS and the image's own file name; returns the object count."""
    tree = ET.parse(xml)
    top = tree.getroot()
    top.find("filename").text = image_name
    objects = top.findall("object")
    for obj in objects:
        obj.find("name").text = CLASS
    tree.write(out, encoding="unicode")
    return len(objects)


def _voc(image_name: str, width: int, height: int, boxes: list[tuple[float, ...]]) -> str:
    objects = "".join(
        f"<object><name>{CLASS}</name><difficult>0</difficult><bndbox><xmin>{x1:g}</xmin><ymin>{y1:g}</ymin>"
        f"<xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object>" for x1, y1, x2, y2 in boxes)
    return (f"<annotation><filename>{image_name}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>\n")


def _copy_scenes(raw: Path, stems: tuple[str, ...], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stem in stems:
        image = out / f"{stem}.png"
        if not image.is_file():
            image.write_bytes((raw / f"{stem}.png").read_bytes())
        _one_class(raw / f"{stem}.xml", image.name, out / f"{stem}.xml")


def _write_tiles(scene: Path, out: Path, size: int) -> None:
    """The scene folder's image cut into `size`-px tiles, each a PNG with its VOC XML."""
    out.mkdir(parents=True, exist_ok=True)
    objects = scan_detection(scene, val_split=0.0).train
    for tile in tile_samples(objects, size, 0.0, keep_empty=1.0):
        x1, y1, x2, y2 = tile.window
        name = f"{Path(tile.source.path).stem}_x{x1:04d}_y{y1:04d}.png"
        if not (out / name).is_file():
            with Image.open(tile.source.path) as im:
                im.convert("RGB").crop(tile.window).save(out / name)
        (out / name).with_suffix(".xml").write_text(_voc(name, x2 - x1, y2 - y1, tile.objects.boxes))


def build(root: str | Path) -> dict[str, Path]:
    """{"train", "train_val_soap", "test_tiles", "test_scene"}: the folders under `root`, each read as VOC."""
    root = Path(root)
    raw = fetch(root)
    folders = {"train": root / "train", "train_val_soap": root / "train-val-soap", "test_tiles": root / "test-tiles",
               "test_scene": root / "test-scene"}
    _copy_scenes(raw, TRAIN, folders["train"])
    _copy_scenes(raw, TRAIN[:2], folders["train_val_soap"] / "train")
    _copy_scenes(raw, TRAIN[2:], folders["train_val_soap"] / "val")
    _copy_scenes(raw, (TEST,), folders["test_scene"])
    _write_tiles(folders["test_scene"], folders["test_tiles"], TEST_TILE)
    for name, folder in folders.items():
        fmt, why = recognize(folder)
        if fmt != "voc":
            raise RuntimeError(f"{name} folder {folder} is not read as Pascal VOC: {why}")
    return folders


if __name__ == "__main__":
    for key, folder in build(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / ".data" / "deepforest"
                             ).items():
        scan = scan_detection(folder, val_split=0.0)
        print(f"{key}: {folder} ({scan.reason}): {len(scan.train)} images, "
              f"{sum(len(o.boxes) for o in scan.train)} boxes, {scan.clipped} clipped, {len(scan.skipped)} skipped")
