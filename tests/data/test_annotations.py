"""Detection folders (COCO, VOC, YOLO) read into one form: layouts, splits, and every kind of bad annotation."""

import csv
import json
import math
import os

import pytest
import yaml
from PIL import Image

from resforge.data.annotations import DetectionScan, Objects, read_recorded_split, recognize, scan_detection
from resforge.data.folder import RECORDED
from resforge.errors import DataError

W, H = 48, 32
CATS = [(1, "cat"), (3, "dog"), (90, "bird")]


def img(path, w=W, h=H):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (120, 30, 200)).save(path)
    return path


def coco(path, images, anns, cats=CATS):
    """images: (id, file_name[, w, h]); anns: dicts with image_id, category_id, bbox (id added)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"info": {}, "images": [{"id": i[0], "file_name": i[1], "width": i[2] if len(i) > 2 else W,
                                    "height": i[3] if len(i) > 3 else H} for i in images],
            "annotations": [{"id": k, "iscrowd": 0, **a} for k, a in enumerate(anns, 1)],
            "categories": [{"id": c, "name": n} for c, n in cats]}
    path.write_text(json.dumps(data))
    return data


def voc(path, filename, objects=(), size=(W, H)):
    """objects: (name, (xmin, ymin, xmax, ymax)[, difficult])."""
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(f"<object><name>{o[0]}</name><difficult>{int(len(o) > 2 and o[2])}</difficult><bndbox>"
                   + "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), o[1]))
                   + "</bndbox></object>" for o in objects)
    path.write_text(f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")


def yolo(root, name, lines, images="images", labels="labels", ext=".png"):
    img(root / images / f"{name}{ext}")
    if lines is not None:
        (root / labels).mkdir(parents=True, exist_ok=True)
        (root / labels / f"{name}.txt").write_text("".join(line + "\n" for line in lines))


def by_name(scan: DetectionScan) -> dict[str, Objects]:
    return {os.path.basename(o.path): o for split in ("train", "val", "test") for o in getattr(scan, split)}


def reasons(scan: DetectionScan) -> str:
    return "\n".join(f"{p} -> {r}" for p, r in scan.skipped)


# --- COCO


def test_coco_one_json_sparse_ids_negatives_masks_crowd(tmp_path):
    for n in "abcde":
        img(tmp_path / "images" / f"{n}.png")
    poly = [[1.0, 1.0, 5.0, 1.0, 5.0, 5.0]]
    rle = {"size": [H, W], "counts": "abc"}
    coco(tmp_path / "annotations" / "instances.json", [(i, f"{n}.png") for i, n in enumerate("abcde", 1)], [
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},
        {"image_id": 2, "category_id": 90, "bbox": [0, 0, 5, 5], "segmentation": poly},
        {"image_id": 3, "category_id": 3, "bbox": [2, 2, 20, 20], "segmentation": rle, "iscrowd": 1}])
    s = scan_detection(tmp_path)
    assert s.format == "coco" and "annotations/instances.json is COCO JSON" in s.reason
    assert s.classes == ["cat", "dog", "bird"] and s.skipped == [] and s.clipped == 0
    assert s.val_source == "0.2 of the images, seed 0" and len(s.val) == 1 and len(s.train) == 4 and s.test == []
    o = by_name(s)
    assert o["a.png"].labels == [0] and o["b.png"].labels == [2] and o["c.png"].labels == [1]
    assert o["a.png"].boxes == [(1.0, 2.0, 11.0, 12.0)] and all(isinstance(v, float) for v in o["a.png"].boxes[0])
    assert o["a.png"].path == str(tmp_path / "images" / "a.png") and (o["a.png"].width, o["a.png"].height) == (W, H)
    assert o["b.png"].masks == [poly] and o["c.png"].masks == [rle] and o["a.png"].masks == [None]
    assert o["c.png"].iscrowd == [1] and o["a.png"].iscrowd == [0]
    assert o["d.png"].boxes == [] and o["d.png"].labels == [] and o["e.png"].boxes == []  # negatives kept
    assert [t + v for t, v in zip(s.box_counts("train"), s.box_counts("val"))] == [1, 1, 1]


def test_coco_json_per_split_in_the_2017_layout(tmp_path):
    for split, names in (("train", "abcd"), ("val", "ef"), ("test", "g")):
        for n in names:
            img(tmp_path / f"{split}2017" / f"{n}.png")
        coco(tmp_path / "annotations" / f"instances_{split}2017.json", [(i, f"{n}.png") for i, n in enumerate(names)],
             [{"image_id": 0, "category_id": 3, "bbox": [1, 1, 4, 4]}])
    (tmp_path / "annotations" / "captions_train2017.json").write_text('{"images": [], "annotations": []}')
    s = scan_detection(tmp_path)
    assert "instances_train2017.json" in s.reason and "captions" not in s.reason
    assert s.val_source == "folder" and [len(s.train), len(s.val), len(s.test)] == [4, 2, 1]
    assert s.box_counts("train") == [0, 1, 0] and s.box_counts("val") == [0, 1, 0] and s.skipped == []
    assert s.val[0].path == str(tmp_path / "val2017" / "e.png")


def test_coco_roboflow_split_folders(tmp_path):
    for split, names in (("train", "abcd"), ("valid", "e"), ("test", "f")):
        for n in names:
            img(tmp_path / split / f"{n}.jpg")
        coco(tmp_path / split / "_annotations.coco.json", [(i, f"{n}.jpg") for i, n in enumerate(names)],
             [{"image_id": 0, "category_id": 1, "bbox": [0, 0, 8, 8]}])
    assert recognize(tmp_path) == ("coco", "train/_annotations.coco.json is COCO JSON "
                                           "(split folders train, valid, test)")
    s = scan_detection(tmp_path)
    assert [len(s.train), len(s.val), len(s.test)] == [4, 1, 1] and s.val_source == "folder"


def test_coco_categories_must_agree_between_splits(tmp_path):
    for split, cats in (("train", CATS), ("valid", [(1, "horse")])):
        img(tmp_path / split / "a.jpg")
        coco(tmp_path / split / "_annotations.coco.json", [(0, "a.jpg")], [], cats=cats)
    with pytest.raises(DataError, match="category id 1 is 'horse'"):
        scan_detection(tmp_path)


def _coco_case(tmp_path, change):
    """Images a (one good box) and b (the box `change` edits); returns the scan."""
    img(tmp_path / "images" / "a.png")
    img(tmp_path / "images" / "b.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": W, "height": H},
                       {"id": 2, "file_name": "b.png", "width": W, "height": H}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 6, 6]}],
            "categories": [{"id": 1, "name": "cat"}]}
    change(data, tmp_path)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances.json").write_text(json.dumps(data))
    return scan_detection(tmp_path, val_split=0)


def _bbox(box):
    def change(data, root):
        data["annotations"][1]["bbox"] = box
    return change


def _truncate(data, root):
    big = root / "images" / "b.png"
    Image.effect_noise((W, H), 50).convert("RGB").save(big)
    raw = big.read_bytes()
    big.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("change, where, fragment", [
    (_bbox([2, 2, 0, 6]), "instances.json#annotation 2", "zero-area box"),
    (_bbox([2, 2, -3, 6]), "instances.json#annotation 2", "negative width or height"),
    (_bbox([math.nan, 2, 3, 6]), "instances.json#annotation 2", "not a finite number"),
    (_bbox([60, 2, 3, 6]), "instances.json#annotation 2", f"box wholly outside the {W}x{H} image"),
    (_bbox([1, 2, 3]), "instances.json#annotation 2", "no bbox [x, y, width, height] of 4 numbers"),
    (lambda d, r: d["annotations"][1].update(category_id=7), "instances.json#annotation 2", "unknown category id 7"),
    (lambda d, r: d["annotations"][1].update(image_id=99), "instances.json#annotation 2",
     "image id 99 is not among the images of annotations/instances.json"),
    (lambda d, r: (r / "images" / "b.png").unlink(), "images/b.png",
     "no such file (1 annotated object skipped with it)"),
    (lambda d, r: (r / "images" / "b.png").write_bytes(b"not an image"), "images/b.png", "not an image"),
    (_truncate, "images/b.png", "corrupt or truncated"),
    (lambda d, r: d["images"].append({"id": 2, "file_name": "c.png"}), "images/b.png", "duplicate image id 2"),
    (lambda d, r: d["images"].append({"id": 3, "file_name": "b.png"}), "images/b.png", "annotated more than once"),
    (lambda d, r: d["images"][1].update(width=40, height=30), "images/b.png",
     f"image is {W}x{H} but annotations/instances.json says 40x30"),
    (lambda d, r: d["images"][1].update(width=-4), "images/b.png", f"image size -4x{H} in the annotation is not a "
                                                                  "positive size"),
    (lambda d, r: d["images"][1].update(height=math.nan), "images/b.png", "is not a positive size"),
])
def test_coco_bad_annotations_are_skipped_with_their_reason(tmp_path, change, where, fragment):
    s = _coco_case(tmp_path, change)
    [(path, reason)] = [x for x in s.skipped if "b.png" in x[0] or "#annotation 2" in x[0]]
    assert path.endswith(where) and fragment in reason, reasons(s)
    a = by_name(s)["a.png"]
    assert a.boxes == [(1.0, 1.0, 6.0, 6.0)] and a.labels == [0]  # the rest of the folder is untouched
    if "b.png" in by_name(s):  # a box skipped: the image stays, without it
        assert by_name(s)["b.png"].boxes == []


def test_coco_box_partly_outside_is_clipped_and_counted(tmp_path):
    s = _coco_case(tmp_path, _bbox([40, -2, 20, 10]))
    assert s.clipped == 1 and s.skipped == []
    assert by_name(s)["b.png"].boxes == [(40.0, 0.0, float(W), 8.0)]


def test_coco_image_over_max_pixels_is_skipped(tmp_path):
    def larger(data, root):
        img(root / "images" / "b.png", 64, 64)
        data["images"][1].update(width=64, height=64)
    assert len(by_name(_coco_case(tmp_path, larger))) == 2
    s2 = scan_detection(tmp_path, val_split=0, max_pixels=60 * 60)
    [(path, reason)] = [x for x in s2.skipped if "b.png" in x[0]]
    assert "over the limit of 3,600" in reason and "(1 annotated object skipped with it)" in reason


def test_coco_size_turned_by_exif_is_named(tmp_path):
    def turned(data, root):
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees: decoded upright as 32x48
        Image.new("RGB", (W, H)).save(root / "images" / "b.jpg", exif=exif)
        data["images"][1]["file_name"] = "b.jpg"
    s = _coco_case(tmp_path, turned)
    [(path, reason)] = [x for x in s.skipped if "b.jpg" in x[0]]
    assert f"image is {H}x{W} but annotations/instances.json says {W}x{H} (turned by its EXIF orientation?)" in reason


def test_coco_malformed_json_is_one_error_naming_the_file(tmp_path):
    img(tmp_path / "images" / "a.png")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances.json").write_text(
        '{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1,')
    assert recognize(tmp_path)[0] == "coco"
    with pytest.raises(DataError, match=r"instances\.json is not readable COCO JSON"):
        scan_detection(tmp_path)


# --- Pascal VOC


def _voc_folder(root, names="abcde"):
    for n in names:
        img(root / "JPEGImages" / f"{n}.jpg")
        voc(root / "Annotations" / f"{n}.xml", f"{n}.jpg", [("dog", (1, 1, 10, 10)), ("cat", (5, 5, 20, 20), n == "a")])


def test_voc_image_sets_give_the_split_and_difficult_is_counted(tmp_path):
    _voc_folder(tmp_path)
    main = tmp_path / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("a\nb\nc\n")
    (main / "val.txt").write_text("d\n")
    (main / "test.txt").write_text("e\n")
    (main / "cat_train.txt").write_text("a  1\n")  # per-class lists are not splits
    s = scan_detection(tmp_path)
    assert s.format == "voc" and s.reason.startswith("Annotations/ holds Pascal VOC XML")
    assert s.classes == ["cat", "dog"] and s.val_source == "folder" and s.skipped == []
    assert [o.path.rsplit("/", 1)[1] for o in s.train] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [len(s.val), len(s.test)] == [1, 1] and s.box_counts("train") == [3, 3] and s.difficult == 1
    assert by_name(s)["a.jpg"].boxes == [(1.0, 1.0, 10.0, 10.0), (5.0, 5.0, 20.0, 20.0)]
    assert by_name(s)["a.jpg"].labels == [1, 0] and by_name(s)["a.jpg"].masks is None


def test_voc_trainval_is_carved_and_unlisted_files_are_named(tmp_path):
    _voc_folder(tmp_path, "abcdefg")
    main = tmp_path / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "trainval.txt").write_text("a\nb\nc\nd\ne\nzz\n")
    (main / "test.txt").write_text("f\n")
    s = scan_detection(tmp_path, val_split=0.4, seed=3)
    assert [len(s.train), len(s.val), len(s.test)] == [3, 2, 1] and s.val_source == "0.4 of the images, seed 3"
    assert s.skipped == [(str(tmp_path / "Annotations" / "g.xml"), "in no ImageSets/Main list (train, val, test)"),
                         (str(tmp_path / "Annotations" / "zz.xml"),
                          "listed in ImageSets/Main/train.txt but there is no such file")]


def test_voc_beside_images_classes_txt_and_bad_files(tmp_path):
    d = tmp_path / "photos"
    for n in "abcdef":
        img(d / f"{n}.png")
    voc(d / "a.xml", "a.png", [("dog", (1, 1, 10, 10)), ("zebra", (1, 1, 5, 5)), ("cat", (30, 20, 10, 25))])
    voc(d / "c.xml", "c.png", [])  # an XML without objects: a negative
    (d / "d.xml").write_text("<annotation><filename>d.png</filename><object>")  # malformed: skipped
    voc(d / "e.xml", "e.png", [("cat", (40, 1, 60, 10))])  # partly outside: clipped
    voc(d / "f.xml", "f.png", [("cat", (1, 1, 10, 10))], size=(100, 100))
    voc(d / "orphan.xml", "orphan.png", [("cat", (1, 1, 2, 2))])
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    assert recognize(tmp_path) == ("voc", "the folder holds images with a Pascal VOC XML beside each")
    s = scan_detection(tmp_path)
    assert s.classes == ["dog", "cat"] and "classes from classes.txt" in s.reason
    o = by_name(s)
    assert o["a.png"].labels == [0] and o["b.png"].boxes == [] and o["c.png"].boxes == []  # b: no XML, a negative
    assert o["e.png"].boxes == [(40.0, 1.0, float(W), 10.0)] and s.clipped == 1
    assert "d.png" not in o and "f.png" not in o
    got = {p.rsplit("/", 1)[1]: r for p, r in s.skipped}
    assert got["a.xml#object 2"] == "unknown class name 'zebra' (not in classes.txt)"
    assert got["a.xml#object 3"].startswith("inverted box (x2 < x1 or y2 < y1)")
    assert got["d.xml"].startswith("not readable Pascal VOC XML")
    assert got["f.png"] == f"image is {W}x{H} but photos/f.xml says 100x100 (1 annotated object skipped with it)"
    assert got["orphan.xml"] == "no image of the same name beside it"


def test_voc_two_annotation_files_for_one_image(tmp_path):
    _voc_folder(tmp_path, "ab")
    voc(tmp_path / "Annotations" / "a_copy.xml", "a.jpg", [("cat", (1, 1, 4, 4))])
    s = scan_detection(tmp_path)
    assert s.skipped == [(str(tmp_path / "JPEGImages" / "a.jpg"), "annotated more than once (Annotations/a.xml, "
                          "Annotations/a_copy.xml) (3 annotated objects skipped with it)")]
    assert list(by_name(s)) == ["b.jpg"]


def test_voc_all_files_bad_is_an_error_that_says_why(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / "a.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match="no usable images .* not readable Pascal VOC XML"):
        scan_detection(tmp_path)


def test_voc_split_folders_beside(tmp_path):
    for split, names in (("train", "abc"), ("val", "d")):
        for n in names:
            img(tmp_path / split / f"{n}.png")
            voc(tmp_path / split / f"{n}.xml", f"{n}.png", [("cat", (1, 1, 9, 9))])
    s = scan_detection(tmp_path)
    assert s.format == "voc" and s.val_source == "folder" and [len(s.train), len(s.val)] == [3, 1]


# --- YOLO


def test_yolo_flat_with_names_list_and_negatives(tmp_path):
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"names": ["person", "car"]}))
    yolo(tmp_path, "a", ["1 0.5 0.5 0.5 0.25", "0 0.25 0.25 0.5 0.5"])
    yolo(tmp_path, "b", [])  # an empty label file
    yolo(tmp_path, "c", None)  # no label file
    yolo(tmp_path, "d", ["", "0 0.5 0.5 0.1 0.1", ""])
    s = scan_detection(tmp_path, val_split=0.25)
    assert s.format == "yolo" and s.reason == "images/ and labels/ are YOLO txt folders; classes from data.yaml"
    assert s.classes == ["person", "car"] and s.skipped == [] and [len(s.train), len(s.val)] == [3, 1]
    o = by_name(s)
    assert o["a.png"].boxes == [(12.0, 12.0, 36.0, 20.0), (0.0, 0.0, 24.0, 16.0)] and o["a.png"].labels == [1, 0]
    assert o["b.png"].boxes == [] and o["c.png"].boxes == [] and o["c.png"].labels == []
    assert o["a.png"].masks is None and o["a.png"].iscrowd is None


def test_yolo_images_train_labels_train_with_names_dict(tmp_path):
    (tmp_path / "data.yaml").write_text("names:\n  0: person\n  2: bike\n")
    for split, names in (("train", "abc"), ("val", "d"), ("test", "e")):
        for n in names:
            yolo(tmp_path, n, ["2 0.5 0.5 0.2 0.2"], images=f"images/{split}", labels=f"labels/{split}")
    s = scan_detection(tmp_path)
    assert s.classes == ["person", "1", "bike"] and s.val_source == "folder"
    assert [len(s.train), len(s.val), len(s.test)] == [3, 1, 1] and s.box_counts("train") == [0, 0, 3]


def test_yolo_split_without_its_labels_folder_is_an_error_and_loose_images_are_named(tmp_path):
    yolo(tmp_path, "a", ["0 0.5 0.5 0.2 0.2"], images="images/train", labels="labels/train")
    img(tmp_path / "images" / "loose.png")
    s = scan_detection(tmp_path)
    assert s.skipped == [(str(tmp_path / "images" / "loose.png"), "not inside a split folder of images/ "
                                                                   "(train, val, test)")]
    img(tmp_path / "images" / "val" / "b.png")
    with pytest.raises(DataError, match="images/val has no labels folder .*labels/val"):
        scan_detection(tmp_path)


def test_a_stray_json_is_not_taken_for_coco(tmp_path):
    yolo(tmp_path, "a", [])
    (tmp_path / "meta.json").write_text('{"images": 3}')
    assert recognize(tmp_path)[0] == "yolo"


def test_yolo_split_folders_with_classes_txt_and_val_carved_test_kept(tmp_path):
    (tmp_path / "classes.txt").write_text("a\nb\n")
    for split, names in (("train", "abcdefghij"), ("test", "kl")):
        for n in names:
            yolo(tmp_path / split, n, ["1 0.5 0.5 0.2 0.2"])
    assert recognize(tmp_path) == ("yolo", "train/images/ and train/labels/ are YOLO txt folders "
                                           "(split folders train, test)")
    s = scan_detection(tmp_path, val_split=0.2, seed=1)
    assert s.classes == ["a", "b"] and [len(s.train), len(s.val), len(s.test)] == [8, 2, 2]
    assert s.val_source == "0.2 of the images, seed 1" and {o.path[-5] for o in s.test} == {"k", "l"}


def test_yolo_without_names_uses_ids(tmp_path):
    yolo(tmp_path, "a", ["2 0.5 0.5 0.2 0.2"])
    yolo(tmp_path, "b", ["0 0.5 0.5 0.2 0.2"])
    s = scan_detection(tmp_path)
    assert s.classes == ["0", "1", "2"] and "classes named by their ids" in s.reason


def test_yolo_polygons_become_coco_polygons_in_pixels(tmp_path):
    (tmp_path / "data.yaml").write_text("names: [blob]\n")
    yolo(tmp_path, "a", ["0 0.1 0.1 0.5 0.1 0.5 0.6", "0 0.5 0.5 0.25 0.25", "0 0.5 0.5 1.5 0.5 1.5 0.75"])
    yolo(tmp_path, "b", None)
    o = by_name(scan_detection(tmp_path))
    a = o["a.png"]
    assert a.boxes[0] == pytest.approx((4.8, 3.2, 24.0, 19.2)) and a.masks[0] == [pytest.approx(
        [4.8, 3.2, 24.0, 3.2, 24.0, 19.2])]
    assert a.masks[1] is None and a.masks[2] == [[24.0, 16.0, 48.0, 16.0, 48.0, 24.0]]  # clipped to the image
    assert a.boxes[2] == (24.0, 16.0, 48.0, 24.0) and o["b.png"].masks == []


@pytest.mark.parametrize("line, fragment", [
    ("5 0.5 0.5 0.1 0.1", "unknown class id 5 (2 classes: 0 to 1)"),
    ("0 0.5 0.5 -0.1 0.1", "negative width or height"),
    ("0 nan 0.5 0.1 0.1", "not a finite number"),
    ("0 0.5 0.5 0 0.1", "zero-area box"),
    ("0 1.5 0.5 0.1 0.1", f"box wholly outside the {W}x{H} image"),
    ("x 0.5 0.5 0.1 0.1", "not numbers"),
    ("1.5 0.5 0.5 0.1 0.1", "class id '1.5' is not a whole number >= 0"),
    ("0 0.5 0.5 0.1 0.1 0.9", "6 numbers: neither a box"),
])
def test_yolo_bad_lines_are_skipped_with_their_reason(tmp_path, line, fragment):
    (tmp_path / "data.yaml").write_text("names: {0: a, 1: b}\n")
    yolo(tmp_path, "a", ["0 0.5 0.5 0.2 0.2", line])
    s = scan_detection(tmp_path, val_split=0)
    [(path, reason)] = s.skipped
    assert path == str(tmp_path / "labels" / "a.txt") + "#line 2" and fragment in reason, reasons(s)
    assert by_name(s)["a.png"].labels == [0]


def test_yolo_box_partly_outside_is_clipped_orphans_and_shared_labels_named(tmp_path):
    yolo(tmp_path, "a", ["0 0.95 0.5 0.2 0.2"])
    yolo(tmp_path, "b", ["0 0.5 0.5 0.2 0.2"])
    img(tmp_path / "images" / "b.jpg")
    (tmp_path / "labels" / "gone.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "labels" / "bad.txt").write_bytes(b"\xff\xfe\x00")
    img(tmp_path / "images" / "bad.png")
    s = scan_detection(tmp_path)
    assert s.clipped == 1 and by_name(s)["a.png"].boxes == [pytest.approx((40.8, 12.8, 48.0, 19.2))]
    got = {p.rsplit("/", 1)[1]: r for p, r in s.skipped}
    assert got["gone.txt"] == "no image for this label file"
    assert got["b.png"] == "shares its label file labels/b.txt with b.jpg (1 annotated object skipped with it)"
    assert got["b.jpg"] == "shares its label file labels/b.txt with b.png (1 annotated object skipped with it)"
    assert got["bad.png"].startswith("its label file labels/bad.txt is not readable text")


# --- recognise, split, records


def test_recognize_each_format_and_not_a_classification_folder(tmp_path):
    img(tmp_path / "coco" / "images" / "a.png")
    coco(tmp_path / "coco" / "annotations" / "instances.json", [(1, "a.png")], [])
    _voc_folder(tmp_path / "voc", "a")
    yolo(tmp_path / "yolo", "a", [])
    for c in ("cat", "dog"):
        img(tmp_path / "classes" / "train" / c / "a.png")
        img(tmp_path / "classes" / "val" / c / "a.png")
    assert recognize(tmp_path / "coco") == ("coco", "annotations/instances.json is COCO JSON")
    assert recognize(tmp_path / "voc") == ("voc", "Annotations/ holds Pascal VOC XML")
    assert recognize(tmp_path / "yolo") == ("yolo", "images/ and labels/ are YOLO txt folders")
    fmt, why = recognize(tmp_path / "classes")
    assert fmt is None and "COCO JSON" in why and "images/ + labels/" in why
    with pytest.raises(DataError, match="no detection annotations found: looked for COCO JSON"):
        scan_detection(tmp_path / "classes")
    assert recognize(tmp_path / "nowhere") == (None, f"{tmp_path / 'nowhere'} is not a folder")


def test_seeded_split_is_reproducible_and_differs_by_seed(tmp_path):
    for i in range(12):
        yolo(tmp_path, f"{i:02d}", ["0 0.5 0.5 0.2 0.2"])
    val = [[o.path for o in scan_detection(tmp_path, seed=s).val] for s in (0, 0, 1)]
    assert val[0] == val[1] and val[0] != val[2] and len(val[0]) == 2


def test_write_skipped_and_split_csv_round_trip(tmp_path):
    d = tmp_path / "data"
    for i in range(6):
        yolo(d, f"{i}", ["0 0.5 0.5 0.2 0.2"])
    (d / "labels" / "9.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    s = scan_detection(d)
    s.write_split_csv(tmp_path / "split.csv")
    s.write_skipped_csv(tmp_path / "skipped.csv")
    with open(tmp_path / "skipped.csv", newline="") as f:
        assert list(csv.reader(f)) == [["path", "reason"], ["labels/9.txt", "no image for this label file"]]
    with open(tmp_path / "split.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["split", "path"] and {r[1] for r in rows[1:]} == {f"images/{i}.png" for i in range(6)}
    again = read_recorded_split(d, tmp_path / "split.csv")
    assert again.val_source == RECORDED and again.train == s.train and again.val == s.val
    gone = s.train[0].path
    (d / "images" / gone.rsplit("/", 1)[1]).unlink()
    yolo(d, "new", [])
    later = read_recorded_split(d, tmp_path / "split.csv")
    assert later.val == s.val and later.train == s.train[1:]
    got = dict(later.skipped)
    assert got[gone] == "in the recorded split but no longer in the folder's annotations"
    assert got[str(d / "images" / "new.png")] == "added since the run started: not in its recorded split"
    (tmp_path / "bad.csv").write_text("split,path\nholdout,a.png\n")
    with pytest.raises(DataError, match="not a split record"):
        read_recorded_split(d, tmp_path / "bad.csv")


def test_splits_inside_a_split_folder_are_refused(tmp_path):
    for split in ("train", "val"):
        img(tmp_path / "train" / "images" / f"{split}.png")
        coco(tmp_path / "train" / "annotations" / f"instances_{split}.json", [(1, f"{split}.png")], [])
    with pytest.raises(DataError, match="splits again inside"):
        scan_detection(tmp_path)


def test_the_seeded_split_holds_out_a_share_of_the_objects_not_of_the_images(tmp_path):
    yolo(tmp_path, "scene", ["0 0.5 0.5 0.01 0.01"] * 40)  # one large scene with most objects
    for name in ("a", "b", "c"):
        yolo(tmp_path, name, ["0 0.5 0.5 0.2 0.2"] * 3)
    for seed in range(6):
        s = scan_detection(tmp_path, val_split=0.2, seed=seed)
        held = sum(len(o.labels) for o in s.val)
        assert s.val and held <= 0.2 * 49 and "scene" not in {os.path.basename(o.path)[:-4] for o in s.val}
