"""Segmentation folders: every mask style read alike, every usual mask mistake skipped with its file named."""

import numpy as np
import pytest
import torch
from helpers import make_mask_folder
from PIL import Image

from resforge.config import AugmentConfig
from resforge.data.masks import MaskDataset, collate_masks, read_mask, recognize_masks, scan_masks
from resforge.errors import DataError
from resforge.tasks import recognize_task


@pytest.mark.parametrize("style", ["palette", "index", "rgb"])
def test_palette_index_and_rgb_masks_read_as_the_same_classes(tmp_path, style):
    root = make_mask_folder(tmp_path / style, n=6, style=style)
    reference = scan_masks(make_mask_folder(tmp_path / "ref", n=6, style="index"), val_split=0.0)
    scan = scan_masks(root, val_split=0.0)
    assert scan.classes == ["background", "square", "disc"] and not scan.skipped
    assert (scan.colors is not None) == (style == "rgb")
    for ours, ref in zip(scan.train, reference.train):
        mine, theirs = read_mask(ours.mask, scan.colors), read_mask(ref.mask)
        if style == "rgb":  # the RGB table has no ignored colour: the rims were drawn as background
            theirs = np.where(theirs == 255, 0, theirs)
        assert np.array_equal(mine, theirs)
    if style != "rgb":
        assert scan.pixel_counts("train") == reference.pixel_counts("train")
        assert sum(scan.pixel_counts("train")) < 6 * 64 * 64  # the 255 rims are not counted


def test_every_mask_mistake_is_skipped_with_the_file_named(tmp_path):
    root = tmp_path / "bad"
    make_mask_folder(root, n=8, style="index")
    images, masks = root / "images", root / "masks"
    Image.new("L", (32, 32)).save(masks / "000.png")  # another size than its image
    Image.fromarray(np.full((64, 64), 7, np.uint8), "L").save(masks / "001.png")  # class 7 of 3
    (masks / "002.png").unlink()  # an image without its mask
    Image.new("L", (64, 64)).save(masks / "999.png")  # a mask without its image
    (masks / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt
    (images / "004.jpg").write_bytes(b"")  # an empty image
    (masks / "005.png").rename(masks / "005.jpg")  # a lossy mask
    scan = scan_masks(root, val_split=0.0)
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in scan.skipped}
    assert reasons["000.jpg"] == "its mask 000.png is 32x32 but the image is 64x64"
    assert reasons["001.jpg"] == "its mask 001.png holds class value 7, beyond the 3 classes (0-2; 255 is ignored)"
    assert reasons["002.jpg"] == "no mask for it in masks/"
    assert reasons["999.png"] == "a mask without an image in images/"
    assert reasons["003.jpg"].startswith("its mask 003.png: not a readable mask")
    assert reasons["004.jpg"] == "empty file"
    assert reasons["005.jpg"] == ("its mask 005.jpg is lossy (.jpg): compression invents class values along every "
                                  "edge; save masks as PNG")
    assert [s.path.rsplit("/", 1)[-1] for s in scan.train] == ["006.jpg", "007.jpg"]


def test_an_rgb_colour_missing_from_the_table_is_named(tmp_path):
    root = make_mask_folder(tmp_path / "rgb", n=3, style="rgb")
    rgb = np.asarray(Image.open(f"{root}/masks/001.png")).copy()
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb, "RGB").save(f"{root}/masks/001.png")
    scan = scan_masks(root, val_split=0.0)
    assert scan.skipped == [(f"{root}/images/001.jpg", "its mask 001.png: colour (1, 2, 3) is not in the class "
                                                       "table")]


def test_rgb_masks_without_colours_are_refused_with_the_fix(tmp_path):
    root = make_mask_folder(tmp_path / "rgb", n=3, style="rgb")
    (tmp_path / "rgb" / "classes.yaml").write_text("- background\n- square\n- disc\n")
    with pytest.raises(DataError, match="no usable image.*an RGB colour mask, but no class file gives the colours"):
        scan_masks(root, val_split=0.0)


def test_masks_of_one_class_only_are_refused_naming_the_ignored_value(tmp_path):
    root = tmp_path / "one"
    make_mask_folder(root, n=3, style="index")
    (root / "classes.txt").unlink()
    for p in (root / "masks").iterdir():
        Image.fromarray(np.where(np.asarray(Image.open(p)) > 0, 255, 0).astype(np.uint8), "L").save(p)
    with pytest.raises(DataError, match=r"one class only \(0; 255 is ignored: --ignore-index\)"):
        scan_masks(root)
    # the same masks with 255 as a class: --ignore-index -1 reads every value
    assert scan_masks(root, ignore_index=-1, val_split=0.0).classes == [str(i) for i in range(256)]


def test_a_mask_folder_is_recognised_as_segmentation_at_the_top_or_in_splits(tmp_path):
    top = make_mask_folder(tmp_path / "top", n=3)
    split = make_mask_folder(tmp_path / "split", n=8, splits=True)
    assert recognize_task(top) == ("segment", "images/ beside masks/: images with class masks")
    assert recognize_task(split) == ("segment", "images/ beside masks/ in train, val: images with class masks")
    scan = scan_masks(split)
    assert (len(scan.train), len(scan.val), scan.val_source) == (6, 2, "folder")
    assert recognize_masks(tmp_path) is None


def test_training_samples_are_cropped_jittered_and_padded_with_the_ignored_value(tmp_path):
    scan = scan_masks(make_mask_folder(tmp_path / "m", n=4, size=40), val_split=0.0)
    train = MaskDataset(scan.train, 64, [0.5] * 3, [0.25] * 3, augment=AugmentConfig(hflip=0.5), seed=3)
    sizes = set()
    for epoch in range(3):
        image, mask = train[(epoch, 0)]
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
        sizes.add(int((mask != 255).sum()))
        again = train[(epoch, 0)]
        assert torch.equal(again[0], image) and torch.equal(again[1], mask)  # seeded per (epoch, index)
    assert len(sizes) > 1  # another scale each epoch
    val = MaskDataset(scan.val + scan.train, 48, [0.0] * 3, [1.0] * 3)
    x, y = collate_masks([val[0], val[1]])
    assert x.shape == (2, 3, 48, 48) and y.shape == (2, 48, 48)


def test_windows_cover_large_images_for_training_and_validation(tmp_path):
    scan = scan_masks(make_mask_folder(tmp_path / "m", n=2, size=100), val_split=0.0)
    val = MaskDataset(scan.train, 40, [0.0] * 3, [1.0] * 3, tile=40)
    assert len(val) == 2 * 9  # a 3 x 3 grid of 40-px windows over each 100-px image
    image, mask = val[4]
    assert image.shape == (3, 40, 40)
    whole = torch.from_numpy(read_mask(scan.train[0].mask))
    x1, y1, x2, y2 = val.windows[4][1]
    assert torch.equal(mask, whole[y1:y2, x1:x2])


def test_data_inspect_reads_a_mask_folder(tmp_path, caplog):
    import resforge

    root = make_mask_folder(tmp_path / "m", n=6)
    Image.fromarray(np.full((64, 64), 9, np.uint8), "L").save(f"{root}/masks/005.png")
    caplog.set_level("INFO", logger="resforge")
    report = resforge.inspect_data(root, out=str(tmp_path / "out"))
    assert report.classes == ["background", "square", "disc"] and report.images == {"train": 5}
    scan = scan_masks(root, val_split=0.0)
    assert report.pixels["train"] == scan.pixel_counts("train") and report.pixels["train"][0] > 0
    assert report.images_with["train"][0] == 5 and report.skipped == 1
    for name in ("inspect.json", "pixels_per_class.png", "samples.png", "skipped.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 100
    assert "value 255 ignored" in caplog.text and "skipped: 1" in caplog.text


def test_coco_instances_are_painted_into_class_masks(tmp_path):
    from resforge.data.annotations import Objects
    from resforge.data.masks import paint

    big = [[0, 0, 40, 0, 40, 40, 0, 40]]  # a 40-px square of class 0
    small = [[10, 10, 20, 10, 20, 20, 10, 20]]  # a 10-px square of class 1 inside it, listed first
    crowd = [[50, 50, 60, 50, 60, 60, 50, 60]]
    obj = Objects("x.png", 64, 64, [(10, 10, 20, 20), (0, 0, 40, 40), (50, 50, 60, 60), (44, 0, 50, 6)],
                  [1, 0, 0, 1], masks=[small, big, crowd, None], iscrowd=[0, 0, 1, 0])
    values = paint(obj, 255)
    assert values[15, 15] == 2 and values[30, 30] == 1  # the small object is not hidden under the big one
    assert values[55, 55] == 255 and values[2, 46] == 255  # a crowd region, a box without a mask: ignored
    assert values[62, 2] == 0


def test_a_coco_folder_with_polygons_is_read_for_segmentation(tmp_path):
    from helpers import make_detection_folder

    root = make_detection_folder(tmp_path / "coco", n=6)
    scan = scan_masks(root, val_split=0.0)
    assert scan.classes == ["background", "square", "disc"] and "instances painted into class masks" in scan.reason
    assert all(s.objects is not None for s in scan.train) and scan.pixel_counts("train")[1] > 0
