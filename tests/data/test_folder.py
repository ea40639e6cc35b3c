"""Scanning a folder: layouts, the split, and every kind of bad file."""

import csv
import os
import struct
import zlib

import numpy as np
import pytest
from helpers import make_image_folder
from PIL import Image

from resforge import DataError
from resforge.data.folder import load_image, recorded_split, scan_folder, scan_images
from resforge.errors import ImageError


def test_class_layout_stratified_split_is_seeded(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b", "c"), per_class=10)
    s1 = scan_folder(tmp_path, val_split=0.2, seed=1)
    assert s1.layout == "classes" and s1.classes == ["a", "b", "c"]
    assert s1.counts("val") == [2, 2, 2] and s1.counts("train") == [8, 8, 8]
    assert s1.val == scan_folder(tmp_path, val_split=0.2, seed=1).val
    assert s1.val != scan_folder(tmp_path, val_split=0.2, seed=2).val
    assert not set(s1.train) & set(s1.val)


def test_split_never_takes_a_class_s_last_training_image(tmp_path):
    make_image_folder(tmp_path, per_class=1)
    make_image_folder(tmp_path, classes=("c",), per_class=3)
    s = scan_folder(tmp_path, val_split=0.7, seed=0)
    assert s.counts("train") == [1, 1, 1] and s.counts("val") == [0, 0, 2]


def test_split_layout_with_and_without_val(tmp_path):
    make_image_folder(tmp_path / "train", per_class=5)
    make_image_folder(tmp_path / "test", per_class=3)
    s = scan_folder(tmp_path, val_split=0.2)
    assert s.layout == "splits" and s.val_source.startswith("0.2")
    assert s.counts("test") == [3, 3] and s.counts("val") == [1, 1] and s.counts("train") == [4, 4]
    make_image_folder(tmp_path / "val", per_class=2)
    s = scan_folder(tmp_path, val_split=0.2)
    assert s.val_source == "folder" and s.counts("val") == [2, 2] and s.counts("train") == [5, 5]


def test_split_is_recorded(tmp_path):
    make_image_folder(tmp_path / "data", per_class=5)
    s = scan_folder(tmp_path / "data", val_split=0.4)
    s.write_split_csv(tmp_path / "split.csv")
    rows = list(csv.DictReader(open(tmp_path / "split.csv")))
    assert len(rows) == 10 and {r["split"] for r in rows} == {"train", "val"}
    assert sum(r["split"] == "val" for r in rows) == 4 and rows[0]["path"].startswith(("a/", "b/"))


def test_bad_files_are_skipped_with_reasons(tmp_path):
    make_image_folder(tmp_path, per_class=4)
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "a" / "text.jpg").write_text("not an image")
    (tmp_path / "a" / "notes.txt").write_text("hello")
    good = (tmp_path / "b" / "000.png").read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (300, 300)).save(tmp_path / "b" / "big.png")
    (tmp_path / "stray.png").write_bytes(good)
    s = scan_folder(tmp_path, val_split=0.25, max_pixels=200 * 200)
    reasons = {p.split("/")[-1]: r for p, r in s.skipped}
    assert reasons["empty.png"] == "empty file"
    assert "not an image" in reasons["text.jpg"]
    assert "extension" in reasons["notes.txt"]
    assert "truncated" in reasons["truncated.png"] or "corrupt" in reasons["truncated.png"]
    assert "decompression bomb" in reasons["big.png"]
    assert "class folder" in reasons["stray.png"]
    assert sum(s.counts("train")) + sum(s.counts("val")) == 8
    for p, _ in s.train + s.val:  # every sample kept is loadable
        load_image(p)


@pytest.mark.parametrize("setup, message", [
    (lambda r: (r / "a").mkdir(parents=True), "no class folders|no readable"),
    (lambda r: make_image_folder(r, classes=("only",)), "single class"),
    (lambda r: (make_image_folder(r), (r / "empty_class").mkdir()), "no readable images in .*: empty_class"),
    (lambda r: r.mkdir(), "no class folders"),
])
def test_unusable_folders_give_one_clear_error(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        scan_folder(root)


def test_missing_folder_and_unknown_val_class(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_folder(tmp_path / "nope")
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "val", classes=("a", "zebra"))
    with pytest.raises(DataError, match="zebra"):
        scan_folder(tmp_path)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255  # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "x.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "x.jpg")
    assert out.size == (10, 20)  # upright: portrait
    top, bottom = np.asarray(out)[:10].mean(), np.asarray(out)[10:].mean()
    assert top > 200 > 50 > bottom  # the white half ends on top after a clockwise turn


def test_modes_are_converted(tmp_path):
    gray16 = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")  # uint16: a 16-bit PNG
    out = np.asarray(load_image(tmp_path / "g16.png", "L"))
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0  # rescaled, not clipped
    rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    assert np.asarray(load_image(tmp_path / "rgba.png")).tolist()[0][0] == [10, 200, 30]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = np.asarray(load_image(tmp_path / "cmyk.jpg")).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full: red
    p = Image.new("P", (8, 8))
    p.putpalette([0, 0, 255] * 256)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").mode == "RGB"
    Image.new("L", (8, 8), 77).save(tmp_path / "gray.png")
    assert np.asarray(load_image(tmp_path / "gray.png", "RGB")).tolist()[0][0] == [77, 77, 77]


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    Image.new("RGB", (800, 600), (120, 10, 10)).save(tmp_path / "big.jpg")
    small = load_image(tmp_path / "big.jpg", min_size=100)
    assert 100 <= min(small.size) < 600 and small.size[0] / small.size[1] == pytest.approx(800 / 600, rel=0.02)


def test_scan_images_files_folders_globs(tmp_path):
    make_image_folder(tmp_path / "d", per_class=2)
    assert len(scan_images([tmp_path / "d"])) == 4
    assert len(scan_images([str(tmp_path / "d" / "a" / "*.png")])) == 2
    assert scan_images([tmp_path / "d" / "b" / "000.png"]) == [str(tmp_path / "d" / "b" / "000.png")]
    literal = tmp_path / "d" / "a" / "photo[1].png"
    (tmp_path / "d" / "a" / "000.png").rename(literal)
    assert scan_images([str(literal)]) == [str(literal)]
    with pytest.raises(DataError, match="no such file"):
        scan_images([tmp_path / "missing.png"])
    with pytest.raises(DataError, match="no files match"):
        scan_images([str(tmp_path / "*.gif")])


def test_split_folders_beside_a_class_folder_are_refused(tmp_path):
    """D/train/{a,b} beside D/dog: dog would silently vanish from training."""
    make_image_folder(tmp_path / "train", per_class=3)
    make_image_folder(tmp_path, classes=("dog",), per_class=3)
    with pytest.raises(DataError, match=r"also dog, which is not a split"):
        scan_folder(tmp_path)


def test_a_test_folder_of_classes_without_train_is_refused(tmp_path):
    make_image_folder(tmp_path, per_class=3)
    make_image_folder(tmp_path / "test", per_class=2)
    with pytest.raises(DataError, match="test/ folder of classes but no train/"):
        scan_folder(tmp_path)


def test_evaluation_reads_a_folder_holding_only_test_and_val(tmp_path):
    make_image_folder(tmp_path / "test", classes=("a", "b"), per_class=2)
    make_image_folder(tmp_path / "val", classes=("b", "c"), per_class=3)
    s = scan_folder(tmp_path, strict=False)
    assert s.classes == ["a", "b", "c"] and s.layout == "splits" and not s.train
    assert s.counts("test") == [2, 2, 0] and s.counts("val") == [0, 3, 3]
    with pytest.raises(DataError, match="no train/"):
        scan_folder(tmp_path)  # training needs one


def test_broken_links_and_link_loops_are_listed_as_skipped(tmp_path):
    make_image_folder(tmp_path, per_class=3)
    (tmp_path / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "a" / "loop.png").symlink_to(tmp_path / "a" / "loop.png")
    (tmp_path / "b" / "link.png").symlink_to(tmp_path / "b" / "000.png")  # a good link is an image like any other
    s = scan_folder(tmp_path, val_split=0.0)
    reasons = {p.split("/")[-1]: r for p, r in s.skipped}
    assert reasons == {"gone.png": "broken symbolic link", "loop.png": "symbolic link loop"}
    assert s.counts("train") == [3, 4]
    assert [p for p in scan_images([tmp_path / "a"]) if p.endswith(("gone.png", "loop.png"))]  # predict reports them
    with pytest.raises(DataError, match="broken symbolic link"):
        load_image(tmp_path / "a" / "gone.png")


def test_a_data_path_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(f)
    with pytest.raises(DataError, match="is a file, not a folder of images"):
        scan_folder(f)


def test_images_over_the_pixel_limit_are_refused_by_name(tmp_path):
    """Before decoding. That PIL's own warning is not printed beside it is tested through the command
    line (test_predict_names_a_decompression_bomb_without_pils_warning)."""
    big = tmp_path / "big.png"
    Image.new("1", (9500, 9500)).save(big)  # 90.25M pixels: over PIL's warning threshold, small on disk
    with pytest.raises(DataError, match="big.png: 9500x9500 pixels is over the limit of 89,478,485"):
        load_image(big)
    with pytest.raises(DataError, match="over the limit of 1,000"):
        load_image(tmp_path / "big.png", max_pixels=1000)


def test_a_pixel_limit_above_pils_own_is_the_one_applied():
    """PIL refuses more than 178,956,970 pixels by itself; a higher limit given to us is the one that holds."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 17_000, 11_000, 8, 0, 0, 0, 0))  # 187 M gray pixels
    png = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(100)))  # their data cut short
    with pytest.raises(ImageError) as refused:
        load_image(png, "L", max_pixels=300_000_000)
    assert refused.value.reason == "corrupt"  # past the size check, into decoding
    with pytest.raises(ImageError, match="17000x11000 pixels is over the limit of 100,000,000"):
        load_image(png, "L", max_pixels=100_000_000)


def test_a_recorded_split_is_read_back_whatever_changed(tmp_path):
    """Five images of a class deleted and five new ones added: the split stays as it was recorded."""
    from resforge.data.folder import read_split_csv, scan_recorded_split

    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=10)
    first = scan_folder(root, val_split=0.3, seed=1)
    first.write_split_csv(tmp_path / "split.csv")
    gone = [p for p, _ in first.train if "/a/" in p][:5]
    for p in gone:
        os.remove(p)
    make_image_folder(tmp_path / "new", classes=("a",), per_class=5, seed=7)
    for i, f in enumerate(sorted((tmp_path / "new" / "a").iterdir())):
        f.rename(root / "a" / f"new{i}.png")
    again = scan_recorded_split(root, tmp_path / "split.csv")
    assert again.val == first.val and again.train == [s for s in first.train if s[0] not in gone]
    assert sorted(p for p, r in again.skipped if "no longer in the folder" in r) == sorted(gone)
    assert len(again.new_files) == 5 and all("/new" in p for p in again.new_files)
    assert scan_folder(root, val_split=0.3, seed=1).val != first.val  # what a fresh draw would have done
    (tmp_path / "bad.csv").write_text("not,a,split\n1,2,3\n")
    with pytest.raises(DataError, match="split record"):
        read_split_csv(tmp_path / "bad.csv")


def test_a_runs_split_is_found_from_the_model_file_never_the_working_directory(tmp_path, monkeypatch):
    root = tmp_path.resolve()
    run = root / "a" / "runs" / "demo"
    (run / "exports").mkdir(parents=True)
    (run / "split.csv").write_text("split,class,path\n")
    decoy = root / "runs" / "demo"  # another run of that name where the command is run
    decoy.mkdir(parents=True)
    (decoy / "split.csv").write_text("split,class,path\n")
    monkeypatch.chdir(root)
    # an older record, relative to where training ran: the folder above the model that ends with it
    assert recorded_split(run / "best.safetensors", "runs/demo") == run / "split.csv"
    assert recorded_split(run / "exports" / "m.onnx", "runs/demo") == run / "split.csv"
    assert recorded_split(root / "elsewhere" / "m.onnx", "runs/demo") is None
    assert recorded_split(root / "elsewhere" / "m.onnx", str(run)) == run / "split.csv"  # a record is absolute now
    assert recorded_split(run / "best.safetensors", str(root / "gone")) == run / "split.csv"  # a moved run: beside it
