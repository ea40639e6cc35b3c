"""Large images as overlapping tiles: trained on tile by tile, predicted on by sliced inference.

Aerial, microscopy and document images are large and their objects small: shrunk to a detector's input
size, the objects vanish. Training sees tiles at full resolution (`tile_samples`, `TiledDataset`);
prediction runs the detector on every tile, and optionally on the whole image for objects larger than a
tile, and merges the detections (`sliced_predict`), as SAHI does beside Ultralytics.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import batched_nms, box_area

from ..errors import ConfigError
from .annotations import Objects
from .folder import load_image
from .loader import pil_to_tensor
from .objects import ObjectsDataset, Target, decode_masks

Window = tuple[int, int, int, int]  # x1, y1, x2, y2 pixels of the image
EDGE_PX = 2.0  # a detection within this of a tile's inner edge is taken as cut there by the tile


def tile_grid(width: int, height: int, size: int, overlap: float) -> list[Window]:
    """Windows of `size` px covering the image row by row, neighbours sharing at least `overlap` of a tile.

    The first and last window of each row and column lie on the image's edges and those between are spread
    evenly, so no tile is partial or padded and all overlaps are alike (SAHI aligns only the last one, whose
    overlap then varies). A side not longer than `size` is one window spanning it."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"--tile must be a positive number of pixels, got {size!r}")
    if not 0 <= overlap < 1:
        raise ConfigError(f"--overlap must be a share of a tile in [0, 1), got {overlap!r}")
    step = math.floor(size * (1 - overlap) + 1e-9)  # the tolerance: 100 * (1 - 0.2) is 80, not 79.99...
    if step < 1:
        raise ConfigError(f"--overlap {overlap} leaves {size}-pixel tiles less than a pixel apart")
    xs, ys = _starts(width, size, step), _starts(height, size, step)
    return [(x, y, min(x + size, width), min(y + size, height)) for y in ys for x in xs]


def _starts(length: int, size: int, step: int) -> list[int]:
    """Window starts from 0 to `length - size`, evenly spread and at most `step` apart."""
    if length <= size:
        return [0]
    n = math.ceil((length - size) / step) + 1
    return [round(k * (length - size) / (n - 1)) for k in range(n)]


@dataclass
class Tile:
    """One window of an annotated image; `objects` are its objects in tile pixels (path still the image's)."""

    source: Objects
    window: Window
    objects: Objects


def tile_samples(samples: Sequence[Objects], size: int, overlap: float, min_visible: float = 0.5,
                 keep_empty: float = 0.2, seed: int = 0) -> list[Tile]:
    """Every tile of every image (`tile_grid`), a box kept in a tile, clipped, when at least `min_visible` of
    its area lies inside (a sliver of an object is no example of it; the neighbouring tile holds it whole).

    Tiles with no objects are negatives, and on sparse imagery (sea, desert) they would outnumber the rest:
    `keep_empty` is the share of them kept (all tiles with objects always are). Which ones is decided by a
    seeded hash of (seed, image path, window): the same for any order of `samples`, and adding images does
    not change the choice among the others'."""
    if not 0 < min_visible <= 1:
        raise ConfigError(f"--tile-min-visible must be a share of a box's area in (0, 1], got {min_visible!r}")
    if not 0 <= keep_empty <= 1:
        raise ConfigError(f"--tile-keep-empty must be a share of the empty tiles in [0, 1], got {keep_empty!r}")
    tiles = []
    for obj in samples:
        masks = _LocalMasks(obj)
        tiles += [Tile(obj, window, _crop_objects(obj, window, min_visible, masks))
                  for window in tile_grid(obj.width, obj.height, size, overlap)]
    empty = sorted((t for t in tiles if not t.objects.boxes), key=lambda t: _tile_hash(seed, t))
    kept = {id(t) for t in empty[:round(keep_empty * len(empty))]}
    return [t for t in tiles if t.objects.boxes or id(t) in kept]


def _tile_hash(seed: int, tile: Tile) -> bytes:
    return hashlib.blake2b(f"{seed}\0{tile.source.path}\0{tile.window}".encode(), digest_size=8).digest()


def _crop_objects(obj: Objects, window: Window, min_visible: float, masks: _LocalMasks) -> Objects:
    """The objects of one window in its pixels: boxes at least `min_visible` inside, clipped; their masks
    cropped to the window as compressed RLE (`masks` holds each object's mask decoded once per image)."""
    x1, y1, x2, y2 = window
    b = np.asarray(obj.boxes, dtype=np.float64).reshape(-1, 4)
    c = np.clip(b, [x1, y1, x1, y1], [x2, y2, x2, y2])
    inside = np.clip(c[:, 2] - c[:, 0], 0, None) * np.clip(c[:, 3] - c[:, 1], 0, None)
    keep = np.flatnonzero(inside >= min_visible * (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).tolist()
    c -= [x1, y1, x1, y1]
    return Objects(obj.path, x2 - x1, y2 - y1, [tuple(c[k].tolist()) for k in keep], [obj.labels[k] for k in keep],
                   None if obj.masks is None else [masks.crop(k, window) for k in keep],
                   None if obj.iscrowd is None else [obj.iscrowd[k] for k in keep])


class _LocalMasks:
    """Each object's mask rasterised once, on a canvas just covering it, then cropped for every tile.

    A polygon is drawn on its own bounding canvas rather than shifted into each tile: pycocotools draws
    vertices left of or above the canvas (negative coordinates) a pixel off, so shifted polygons would not
    give the same mask as the whole image's. RLE masks are decoded at the image's size and cut to their box."""

    def __init__(self, obj: Objects):
        self.obj = obj
        self.local: dict[int, tuple[int, int, np.ndarray] | None] = {}

    def crop(self, k: int, window: Window) -> dict[str, Any] | None:
        from pycocotools import mask as coco_mask

        if k not in self.local:
            self.local[k] = self._rasterise(self.obj.masks[k])
        if self.local[k] is None:
            return None
        x0, y0, m = self.local[k]
        x1, y1, x2, y2 = window
        out = np.zeros((y2 - y1, x2 - x1), dtype=np.uint8, order="F")
        ax, ay = max(x0, x1), max(y0, y1)
        bx, by = min(x0 + m.shape[1], x2), min(y0 + m.shape[0], y2)
        if ax < bx and ay < by:
            out[ay - y1:by - y1, ax - x1:bx - x1] = m[ay - y0:by - y0, ax - x0:bx - x0]
        return coco_mask.encode(out)

    def _rasterise(self, seg: Any) -> tuple[int, int, np.ndarray] | None:
        """(x, y, mask) of the part of the image holding the object's mask, None for a box-only object."""
        from pycocotools import mask as coco_mask

        if not seg:
            return None
        if isinstance(seg, list):
            xs = [v for p in seg for v in p[0::2]]
            ys = [v for p in seg for v in p[1::2]]
            x0, y0 = math.floor(min(xs)), math.floor(min(ys))
            w, h = math.ceil(max(xs)) - x0 + 1, math.ceil(max(ys)) - y0 + 1
            moved = [[v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(p)] for p in seg]
            return x0, y0, coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(moved, h, w)))
        h, w = self.obj.height, self.obj.width
        rle = coco_mask.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
        x, y, bw, bh = coco_mask.toBbox(rle).tolist()
        x0, y0 = math.floor(x), math.floor(y)
        return x0, y0, coco_mask.decode(rle)[y0:math.ceil(y + bh), x0:math.ceil(x + bw)]


class TiledDataset(ObjectsDataset):
    """`ObjectsDataset` whose items are tiles: the same (image, target) form, transform call and per-sample
    seeding (inherited), only `raw` differs. The last decoded image is kept, so the tiles of one image read
    in order (evaluation) decode it once per loader process."""

    def __init__(self, tiles: Sequence[Tile], transform: Callable[..., Any], **options: Any):
        self.tiles = list(tiles)
        super().__init__([t.objects for t in self.tiles], transform, **options)
        self._last: tuple[str, Tensor] | None = None

    def raw(self, i: int) -> tuple[tv_tensors.Image, Target]:
        """Tile `i` before any transform: its crop of the image, its objects in tile pixels (labels 1..K)."""
        tile = self.tiles[i]
        x1, y1, x2, y2 = tile.window
        # a copy, not a view: a view would carry the whole image's storage to the main process
        image = tv_tensors.Image(self._decode(tile.source.path)[:, y1:y2, x1:x2].clone())
        obj = tile.objects
        boxes = torch.tensor(obj.boxes, dtype=torch.float32).reshape(-1, 4)
        target: Target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(y2 - y1, x2 - x1)),
                          "labels": torch.tensor(obj.labels, dtype=torch.int64) + 1}
        if self.masks:
            target["masks"] = tv_tensors.Mask(decode_masks(obj) if obj.masks else
                                              torch.zeros(len(obj.labels), y2 - y1, x2 - x1, dtype=torch.uint8))
        return image, target

    def _decode(self, path: str) -> Tensor:
        if self._last is None or self._last[0] != path:
            self._last = path, pil_to_tensor(load_image(path, self.mode, self.max_pixels))
        return self._last[1]


@dataclass
class _Pass:
    """One detector output placed in the image: boxes moved there, masks still the window's."""

    window: Window
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    cut: Tensor  # [N] bool: the box ends at an edge where the tile, not the image, ends
    masks: Tensor | None


@torch.no_grad()
def sliced_predict(model: Callable[[list[Tensor]], list[dict[str, Tensor]]], image: Tensor, size: int,
                   overlap: float, batch: int = 4, iou: float = 0.5, full_image: bool = True) -> dict[str, Tensor]:
    """A detector's output for one large image (float CxHxW) from its tiles, `batch` tiles a call.

    `full_image` also runs the detector on the whole image (which it downscales itself), for objects larger
    than a tile: without it they come back as pieces. Merging: a detection cut by its tile's inner edge and
    lying mostly (`iou` of its area) inside a larger one of its class is a piece of that one and dropped,
    then class-wise NMS at `iou` removes the copies overlapping tiles found. Masks are pasted at full size.
    Returns boxes, labels, scores (and masks [N, 1, H, W]) by decreasing score."""
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch!r}")
    h, w = image.shape[-2:]
    windows = tile_grid(w, h, size, overlap)
    outputs: list[dict[str, Tensor]] = []
    for s in range(0, len(windows), batch):
        outputs += model([image[:, y1:y2, x1:x2] for x1, y1, x2, y2 in windows[s:s + batch]])
    if full_image and windows != [(0, 0, w, h)]:
        outputs += model([image])
        windows = windows + [(0, 0, w, h)]
    return _merge([_place(o, win, w, h) for o, win in zip(outputs, windows)], iou, h, w)


def _place(output: dict[str, Tensor], window: Window, width: int, height: int) -> _Pass:
    x1, y1, x2, y2 = window
    b = output["boxes"]
    cut = torch.zeros(len(b), dtype=torch.bool, device=b.device)
    if x1 > 0:
        cut |= b[:, 0] <= EDGE_PX
    if y1 > 0:
        cut |= b[:, 1] <= EDGE_PX
    if x2 < width:
        cut |= b[:, 2] >= x2 - x1 - EDGE_PX
    if y2 < height:
        cut |= b[:, 3] >= y2 - y1 - EDGE_PX
    return _Pass(window, b + b.new_tensor([x1, y1, x1, y1]), output["scores"], output["labels"], cut,
                 output.get("masks"))


def _merge(passes: list[_Pass], iou: float, height: int, width: int) -> dict[str, Tensor]:
    boxes = torch.cat([p.boxes for p in passes])
    scores = torch.cat([p.scores for p in passes])
    labels = torch.cat([p.labels for p in passes])
    whole = (~_pieces(boxes, labels, torch.cat([p.cut for p in passes]), iou)).nonzero().squeeze(1)
    order = whole[batched_nms(boxes[whole], scores[whole], labels[whole], iou)]
    out = {"boxes": boxes[order], "labels": labels[order], "scores": scores[order]}
    if passes[0].masks is not None:
        out["masks"] = _paste(passes, order, height, width)
    return out


def _pieces(boxes: Tensor, labels: Tensor, cut: Tensor, share: float) -> Tensor:
    """[N] bool: cut boxes with at least `share` of their area inside a larger box of their class."""
    pieces = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    if not cut.any():
        return pieces
    a = boxes[cut]
    lt = torch.max(a[:, None, :2], boxes[None, :, :2])
    rb = torch.min(a[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    area = box_area(boxes)
    own = area[cut][:, None]
    pieces[cut] = ((inter >= share * own) & (area[None, :] > own) & (labels[cut][:, None] == labels[None, :])).any(1)
    return pieces


def _paste(passes: list[_Pass], order: Tensor, height: int, width: int) -> Tensor:
    """The kept detections' masks, each pasted at its window in an image-sized mask."""
    owner = [(p, k) for p in passes for k in range(len(p.boxes))]
    first = passes[0].masks
    out = first.new_zeros(len(order), first.shape[1], height, width)
    for row, i in enumerate(order.tolist()):
        p, k = owner[i]
        x1, y1, x2, y2 = p.window
        out[row, :, y1:y2, x1:x2] = p.masks[k]
    return out
