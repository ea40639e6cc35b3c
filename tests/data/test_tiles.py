"""Tiles of large images: the grid, boxes and masks cut by it, empty tiles, the tile dataset, sliced prediction."""

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

import resforge.data.tiles as tiles_module
from resforge.config import AugmentConfig
from resforge.data.annotations import Objects
from resforge.data.objects import decode_masks, detection_transform
from resforge.data.tiles import TiledDataset, tile_grid, tile_samples, sliced_predict
from resforge.errors import ConfigError


# --- the grid

def test_grid_covers_the_image_with_the_overlap_and_ends_on_its_edges():
    windows = tile_grid(1000, 700, 256, 0.2)
    cover = np.zeros((700, 1000), dtype=int)
    for x1, y1, x2, y2 in windows:
        assert (x2 - x1, y2 - y1) == (256, 256)  # no partial or padded tile
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    assert windows == sorted(windows, key=lambda w: (w[1], w[0]))  # row-major
    xs = sorted({w[0] for w in windows})
    ys = sorted({w[1] for w in windows})
    assert xs[0] == ys[0] == 0 and xs[-1] + 256 == 1000 and ys[-1] + 256 == 700
    for starts in (xs, ys):
        gaps = np.diff(starts)
        assert (256 - gaps >= 0.2 * 256).all()  # every neighbour shares at least the asked overlap
        assert gaps.max() - gaps.min() <= 1  # spread evenly, not one odd last tile
    assert len(windows) == len(xs) * len(ys) == 5 * 4


def test_grid_on_a_side_no_longer_than_a_tile_is_one_window_spanning_it():
    windows = tile_grid(200, 900, 256, 0.25)
    assert {(w[0], w[2]) for w in windows} == {(0, 200)}
    assert windows[-1][3] == 900 and len(windows) == 5
    assert tile_grid(512, 256, 256, 0.0) == [(0, 0, 256, 256), (256, 0, 512, 256)]
    assert tile_grid(100, 80, 256, 0.5) == [(0, 0, 100, 80)]


@pytest.mark.parametrize("size, overlap, flag", [(0, 0.2, "--tile"), (-5, 0.2, "--tile"), (2.5, 0.2, "--tile"),
                                                 (256, 1.0, "--overlap"), (256, -0.1, "--overlap"),
                                                 (256, float("nan"), "--overlap"), (1, 0.5, "--overlap")])
def test_bad_grid_options_name_the_option(size, overlap, flag):
    with pytest.raises(ConfigError, match=flag):
        tile_grid(1000, 1000, size, overlap)
    with pytest.raises(ConfigError, match=flag):
        sliced_predict(FakeDetector(), torch.zeros(3, 50, 50), size, overlap)


def test_bad_tiling_shares_name_the_option():
    obj = Objects("a.png", 100, 100, [], [])
    with pytest.raises(ConfigError, match="--tile-min-visible"):
        tile_samples([obj], 50, 0.0, min_visible=0.0)
    with pytest.raises(ConfigError, match="--tile-keep-empty"):
        tile_samples([obj], 50, 0.0, keep_empty=1.5)
    with pytest.raises(ConfigError, match="--batch"):
        sliced_predict(FakeDetector(), torch.zeros(3, 50, 50), 32, 0.0, batch=0)


# --- boxes and masks cut by the grid

def two_halves(masks=None):
    """600x300 cut into two 300-px tiles: a box 1/4 in the left tile, one half in each, one wholly left."""
    return Objects("/x/a.png", 600, 300, [(250, 10, 450, 50), (280, 100, 320, 140), (10, 200, 60, 250)], [0, 1, 2],
                   masks=masks, iscrowd=[0, 1, 0])


def test_a_box_is_kept_clipped_where_most_of_it_lies_and_dropped_where_less_does():
    left, right = tile_samples([two_halves()], 300, 0.0, keep_empty=1.0)
    assert (left.window, right.window) == ((0, 0, 300, 300), (300, 0, 600, 300))
    assert (left.objects.width, left.objects.height, left.objects.path) == (300, 300, "/x/a.png")
    # the first box is a quarter inside the left tile: dropped there, kept clipped in the right
    assert left.objects.boxes == [(280, 100, 300, 140), (10, 200, 60, 250)]
    assert left.objects.labels == [1, 2] and left.objects.iscrowd == [1, 0]
    assert right.objects.boxes == [(0, 10, 150, 50), (0, 100, 20, 140)]  # exactly half inside is kept
    assert right.objects.labels == [0, 1]
    stricter = tile_samples([two_halves()], 300, 0.0, min_visible=0.6, keep_empty=1.0)
    assert [t.objects.labels for t in stricter] == [[2], [0]]


def test_masks_are_cropped_to_the_tile_as_the_whole_image_decodes_them():
    disk = np.zeros((300, 600), dtype=np.uint8, order="F")
    yy, xx = np.mgrid[:300, :600]
    disk[(yy - 225) ** 2 + (xx - 35) ** 2 < 20 ** 2] = 1
    polygon = [[250, 10, 450, 10, 450, 50, 350, 30, 250, 50]]  # concave, across the tile border
    triangle = [[280, 100, 320, 100, 300, 140]]
    source = two_halves([polygon, triangle, coco_mask.encode(disk)])
    whole = decode_masks(source)
    for tile in tile_samples([source], 300, 0.0, keep_empty=1.0):
        x1, y1, x2, y2 = tile.window
        kept = [source.labels.index(label) for label in tile.objects.labels]
        assert torch.equal(decode_masks(tile.objects), whole[kept, y1:y2, x1:x2])
    box_only = tile_samples([two_halves([polygon, None, []])], 300, 0.0, keep_empty=1.0)
    assert box_only[0].objects.masks == [None, None]


# --- empty tiles

def test_a_seeded_share_of_empty_tiles_is_kept_whatever_the_order_of_images():
    busy = Objects("/x/busy.png", 1000, 1000, [(10, 10, 50, 50)], [0])
    sea = Objects("/x/sea.png", 1000, 1000, [], [])  # a negative image: all its tiles are empty
    kept = tile_samples([busy, sea], 100, 0.0, keep_empty=0.25)
    assert len(kept) == 1 + round(0.25 * 199)
    assert [t.window for t in kept if t.objects.boxes] == [(0, 0, 100, 100)]  # tiles with objects always kept
    assert {t.source.path for t in kept if not t.objects.boxes} == {"/x/busy.png", "/x/sea.png"}

    def chosen(tiles):
        return {(t.source.path, t.window) for t in tiles}
    assert chosen(tile_samples([sea, busy], 100, 0.0, keep_empty=0.25)) == chosen(kept)
    assert chosen(tile_samples([busy, sea], 100, 0.0, keep_empty=0.25, seed=1)) != chosen(kept)
    assert len(tile_samples([busy, sea], 100, 0.0, keep_empty=0.0)) == 1
    assert len(tile_samples([busy, sea], 100, 0.0, keep_empty=1.0)) == 200


# --- the tile dataset

@pytest.fixture
def two_images(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (300, 600, 3), dtype=np.uint8)).save(path)
        samples.append(two_halves([[[250, 10, 450, 10, 450, 50, 250, 50]], [[280, 100, 320, 100, 300, 140]], None]))
        samples[-1].path = str(path)
    return samples


def test_tile_items_are_crops_with_their_objects(two_images):
    tiles = tile_samples(two_images, 300, 0.0, keep_empty=1.0)
    ds = TiledDataset(tiles, detection_transform(None), masks=True)
    assert len(ds) == 4
    for i, tile in enumerate(tiles):
        x1, y1, x2, y2 = tile.window
        full = torch.from_numpy(np.array(Image.open(tile.source.path))).permute(2, 0, 1)
        image, target = ds[i]
        assert torch.allclose(image, full[:, y1:y2, x1:x2] / 255)
        assert target["boxes"].tolist() == [list(b) for b in tile.objects.boxes]
        assert target["labels"].tolist() == [label + 1 for label in tile.objects.labels]
        assert target["masks"].shape == (len(tile.objects.boxes), 300, 300)
        assert torch.equal(target["masks"], decode_masks(tile.objects))


def test_tiles_of_one_image_read_in_order_decode_it_once(two_images, monkeypatch):
    decoded = []

    def counting(path, *args):
        decoded.append(path)
        return Image.open(path).convert("RGB")
    monkeypatch.setattr(tiles_module, "load_image", counting)
    ds = TiledDataset(tile_samples(two_images, 300, 0.0, keep_empty=1.0), detection_transform(None))
    for i in range(len(ds)):
        ds[i]
    assert decoded == [s.path for s in two_images]


def test_tile_augmentation_is_seeded_by_epoch_and_index(two_images):
    aug = detection_transform(AugmentConfig(hflip=0.5, vflip=0.5, scale=[1.0, 1.0]))
    ds = TiledDataset(tile_samples(two_images, 300, 0.0, keep_empty=1.0), aug, seed=3)

    def epoch(e):
        return [ds[(e, i)] for i in range(len(ds))]
    first, again, other = epoch(5), epoch(5), epoch(6)
    for (im1, t1), (im2, t2) in zip(first, again):
        assert torch.equal(im1, im2) and torch.equal(t1["boxes"], t2["boxes"])
    assert any(not torch.equal(im1, im2) for (im1, _), (im2, _) in zip(first, other))


# --- sliced prediction

MODEL_SIDE, MIN_PX = 512, 8


def bright_rectangles(image):
    """(x1, y1, x2, y2) of each separate bright rectangle of channel 0 (cut ones included); numpy, as torch's
    small ops are slow on a loaded two-core machine."""
    m = image[0].numpy() > 0.5
    corners = m.copy()
    corners[1:] &= ~m[:-1]
    corners[:, 1:] &= ~m[:, :-1]
    return [(x, y, x + int(np.cumprod(m[y, x:]).sum()), y + int(np.cumprod(m[y:, x]).sum()))
            for y, x in np.argwhere(corners).tolist()]


class FakeDetector:
    """A detector that finds bright rectangles, but as one that shrinks its input to MODEL_SIDE does: only those
    still MIN_PX wide there. Smaller boxes score higher, so a tile's piece of an object would win plain NMS."""

    def __init__(self, labels=(1,), masks=False):
        self.labels, self.masks, self.calls = labels, masks, []

    def __call__(self, images):
        self.calls.append([tuple(image.shape[-2:]) for image in images])
        return [self.detect(image) for image in images]

    def detect(self, image):
        h, w = image.shape[-2:]
        scale = min(1.0, MODEL_SIDE / max(h, w))
        rows = [(r, label) for r in bright_rectangles(image) if min(r[2] - r[0], r[3] - r[1]) * scale >= MIN_PX
                for label in self.labels]
        boxes = torch.tensor([r for r, _ in rows], dtype=torch.float32).reshape(-1, 4)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        out = {"boxes": boxes, "labels": torch.tensor([label for _, label in rows], dtype=torch.int64),
               "scores": 1 / (1 + area / 1e4)}
        if self.masks:
            out["masks"] = torch.zeros(len(rows), 1, h, w)
            for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                out["masks"][k, :, y1:y2, x1:x2] = 1
        return out


def scene(width, height, rects):
    image = torch.zeros(3, height, width)
    for x1, y1, x2, y2 in rects:
        image[:, y1:y2, x1:x2] = 1
    return image


def boxes_of(out):
    return sorted(tuple(b) for b in out["boxes"].int().tolist())


def test_a_small_object_missed_downscaled_is_found_on_tiles():
    small, large = (1400, 1000, 1412, 1012), (100, 100, 800, 600)  # the large one is wider than a tile
    image = scene(2000, 1500, [small, large])
    assert boxes_of(FakeDetector()([image])[0]) == [large]  # one downscaled pass: 12 px become 3
    model = FakeDetector()
    out = sliced_predict(model, image, 512, 0.2, batch=4)
    assert boxes_of(out) == [large, small]  # the large one from the whole-image pass, its pieces dropped
    assert (out["scores"].diff() <= 0).all() and out["labels"].tolist() == [1, 1]
    assert [len(c) for c in model.calls] == [4] * 5 + [1]  # 20 tiles four at a time, then the whole image
    assert {s for c in model.calls[:-1] for s in c} == {(512, 512)} and model.calls[-1] == [(1500, 2000)]
    tiles_only = sliced_predict(FakeDetector(), image, 512, 0.2, full_image=False)
    found = boxes_of(tiles_only)
    assert small in found and large not in found  # without the whole image, a larger-than-tile object is pieces


def test_copies_from_overlapping_tiles_merge_into_one():
    inside, across = (300, 200, 340, 240), (480, 300, 560, 340)  # in four tiles whole; cut in two, whole in one
    image = scene(1000, 600, [inside, across])
    assert tile_grid(1000, 600, 512, 0.25) == [(x, y, x + 512, y + 512) for y in (0, 88) for x in (0, 244, 488)]
    out = sliced_predict(FakeDetector(), image, 512, 0.25, full_image=False)
    assert boxes_of(out) == [inside, across]
    two_classes = sliced_predict(FakeDetector(labels=(1, 2)), image, 512, 0.25, full_image=False)
    assert sorted(zip(boxes_of(two_classes), two_classes["labels"].tolist())) == sorted(
        (box, label) for box in (inside, across) for label in (1, 2))  # NMS is class-wise


def test_masks_are_pasted_back_at_full_size():
    inside, across = (300, 200, 340, 240), (480, 300, 560, 340)
    out = sliced_predict(FakeDetector(masks=True), scene(1000, 600, [inside, across]), 512, 0.25)
    assert out["masks"].shape == (2, 1, 600, 1000)
    for (x1, y1, x2, y2), mask in zip(out["boxes"].int().tolist(), out["masks"]):
        assert torch.equal(mask[0], scene(1000, 600, [(x1, y1, x2, y2)])[0])


def test_an_image_within_one_tile_is_run_once():
    model = FakeDetector()
    out = sliced_predict(model, scene(300, 200, [(10, 10, 40, 40)]), 512, 0.2)
    assert model.calls == [[(200, 300)]] and boxes_of(out) == [(10, 10, 40, 40)]
