"""`inspect_objects` on small COCO and YOLO folders: exact counts, box sizes, skip tallies, and real figures."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from resforge.data.annotations import scan_detection
from resforge.data.inspect_objects import _drawn, class_colors, inspect_objects, pick_samples, reason_kind
from resforge.errors import ConfigError

CLASSES = ["cat", "dog"]
# name: (width, height, [(class, x, y, w, h) in pixels]); c's cat runs past its 48x48 image (clipped to 18x18)
IMAGES = {"a.png": (64, 48, [(0, 4, 4, 16, 16), (1, 0, 0, 40, 40)]),
          "b.png": (96, 96, [(1, 0, 0, 96, 96), (0, 60, 60, 20, 20)]),
          "c.png": (48, 48, [(0, 30, 30, 30, 30)]),
          "d.png": (80, 60, [])}
SIDES = [16, 40, 96, 20, 18]  # sqrt of each kept box's area in pixels
RELATIVE = [16 / math.sqrt(64 * 48), 40 / math.sqrt(64 * 48), 1.0, 20 / 96, 18 / 48]
FIGURES = ("box_sizes.png", "objects_per_class.png", "samples.png")


def image(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 140, 60)).save(path)


def coco_folder(root):
    """IMAGES as one COCO JSON, with two zero-area annotations the scan must skip."""
    images, anns = [], []
    for i, (name, (w, h, boxes)) in enumerate(IMAGES.items(), 1):
        image(root / "images" / name, w, h)
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        anns += [{"image_id": i, "category_id": c + 1, "bbox": [x, y, bw, bh]} for c, x, y, bw, bh in boxes]
    anns += [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},
             {"image_id": 2, "category_id": 2, "bbox": [1, 1, 10, 0]}]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances.json").write_text(json.dumps({
        "images": images, "annotations": [{"id": k, "iscrowd": 0, **a} for k, a in enumerate(anns, 1)],
        "categories": [{"id": c + 1, "name": n} for c, n in enumerate(CLASSES)]}))
    return root


def yolo_folder(root):
    """IMAGES as YOLO txt, a and b in train, c and d in val (d without a label file), plus a zero-area
    line and an unknown class id."""
    for name, (w, h, boxes) in IMAGES.items():
        split = "train" if name in ("a.png", "b.png") else "val"
        image(root / "images" / split / name, w, h)
        lines = [f"{c} {(x + bw / 2) / w} {(y + bh / 2) / h} {bw / w} {bh / h}" for c, x, y, bw, bh in boxes]
        if name == "a.png":
            lines += ["0 0.5 0.5 0 0.1", "5 0.5 0.5 0.1 0.1"]
        if lines:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / name.replace(".png", ".txt")).write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def spread(x):
    return pytest.approx(dict(zip(("p10", "median", "p90"), np.percentile(x, [10, 50, 90]))))


def assert_figures(out):
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 200, name
    assert not list(out.glob(".*.tmp"))


def test_coco_folder_counts_sizes_skips_and_figures(tmp_path):
    out = tmp_path / "out"
    r = inspect_objects(coco_folder(tmp_path / "data"), out, images=3)
    assert (r.format, r.classes) == ("coco", CLASSES)
    assert r.images == {"train": 4} and r.negatives == {"train": 1} and r.objects == {"train": [3, 2]}
    assert r.box_size == {"relative": spread(RELATIVE), "pixels": spread(SIDES)}
    assert r.box_size["pixels"]["median"] == pytest.approx(20)
    assert r.size_buckets == {"small": 3, "medium": 1, "large": 1}
    assert r.boxes_per_image == {"mean": 1.25, "max": 2}
    assert (r.clipped, r.difficult) == (1, 0)
    assert r.skipped == 2 and r.skip_reasons == {"zero-area box": 2}

    assert json.loads((out / "inspect.json").read_text()) == r.to_dict()
    rows = (out / "skipped.csv").read_text().splitlines()
    assert rows[0] == "path,reason" and len(rows) == 3 and all("zero-area box" in row for row in rows[1:])
    assert_figures(out)

    text = r.to_text()
    assert "coco folder, 2 classes, 4 images (1 without objects), 5 objects" in text
    assert any(line.split() == ["cat", "3"] for line in text.splitlines())
    assert any(line.split() == ["dog", "2"] for line in text.splitlines())
    assert "skipped 2: zero-area box (2)" in text and "small 3, medium 1, large 1" in text


def test_yolo_folder_gives_the_same_report_by_split(tmp_path):
    out = tmp_path / "out"
    r = inspect_objects(yolo_folder(tmp_path / "data"), out, images=4)
    assert (r.format, r.classes) == ("yolo", CLASSES) and "classes.txt" in r.reason
    assert r.images == {"train": 2, "val": 2} and r.negatives == {"train": 0, "val": 1}
    assert r.objects == {"train": [2, 2], "val": [1, 0]}
    assert r.box_size == {"relative": spread(RELATIVE), "pixels": spread(SIDES)}
    assert r.size_buckets == {"small": 3, "medium": 1, "large": 1} and r.clipped == 1
    assert r.skip_reasons == {"zero-area box": 1, "unknown class id N": 1} and r.skipped == 2
    assert json.loads((out / "inspect.json").read_text()) == r.to_dict()
    assert_figures(out)
    header = next(line for line in r.to_text().splitlines() if "train" in line)
    assert header.split() == ["train", "val"]


def test_rerun_without_skips_removes_the_old_skipped_csv(tmp_path):
    data, out = coco_folder(tmp_path / "data"), tmp_path / "out"
    inspect_objects(data, out, images=2)
    ann = data / "annotations" / "instances.json"
    coco = json.loads(ann.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["bbox"][2] and a["bbox"][3]]
    ann.write_text(json.dumps(coco))
    r = inspect_objects(data, out, images=2)
    assert r.skipped == 0 and r.skip_reasons == {} and not (out / "skipped.csv").exists()
    assert r.to_text().splitlines()[-1] == "skipped 0"


def test_samples_prefer_objects_and_include_one_negative(tmp_path):
    items = scan_detection(coco_folder(tmp_path), val_split=0.0).train
    names = lambda picks: sorted(o.path.rsplit("/", 1)[1] for o in picks)  # noqa: E731
    assert names(pick_samples(items, 3, seed=0)).count("d.png") == 1
    assert "d.png" not in names(pick_samples(items, 1, seed=0))
    assert names(pick_samples(items, 12, seed=0)) == ["a.png", "b.png", "c.png", "d.png"]
    draws = {tuple(names(pick_samples(items, 2, seed=s))) for s in range(8)}
    assert all("d.png" in d for d in draws) and len(draws) > 1
    assert pick_samples(items, 2, seed=5) == pick_samples(items, 2, seed=5)
    with pytest.raises(ConfigError, match="images must be at least 1"):
        inspect_objects(tmp_path, tmp_path / "out", images=0)


def test_boxes_are_drawn_in_their_class_colour(tmp_path):
    scan = scan_detection(coco_folder(tmp_path), val_split=0.0)
    a = next(o for o in scan.train if o.path.endswith("a.png"))
    colors = class_colors(2)
    drawn = _drawn(a, scan.classes, colors, max_pixels=10**6)
    assert drawn.shape == (48, 64, 3) and drawn.dtype == np.uint8
    cat, dog = (tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in colors)
    assert tuple(drawn[18, 4]) == cat  # the cat box's left edge (x1 = 4), below its label
    assert tuple(drawn[30, 0]) == dog  # the dog box's left edge (x1 = 0)
    assert tuple(drawn[47, 63]) == (90, 140, 60)  # outside every box: the image as it was


def test_reason_kind_drops_particulars():
    assert reason_kind("zero-area box: [1, 2, 1, 9]") == "zero-area box"
    assert reason_kind("inverted box (x2 < x1 or y2 < y1): [5, 1, 2, 9]") == "inverted box"
    assert reason_kind("box wholly outside the 48x32 image: [50, 1, 60, 9]") == "box wholly outside the NxN image"
    assert reason_kind("unknown class name 'cow'") == "unknown class name 'cow'"
    assert reason_kind("corrupt or truncated (broken data stream) (2 annotated objects skipped with it)") == \
        "corrupt or truncated"
