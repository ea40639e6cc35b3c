"""A saved or exported segmenter, loaded and run: what evaluation, prediction, export's parity gate, bench, serve
and quantisation call. `LoadedSegmenter` runs any engine's network (PyTorch, onnxruntime, OpenVINO) the same way:
the resize (or the slicing into windows, blended where they overlap) and the upsampling happen around it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from ..data.folder import load_image
from ..data.loader import pil_to_tensor
from ..data.masks import MaskDataset, MaskSample, overlay, palette, read_recorded_masks
from ..data.tiles import tile_grid
from ..data.transforms import Preprocess, eval_transform
from ..errors import ConfigError, DataError
from ..evaluation.segmentation import confusion, segmentation_metrics
from ..io import atomic_path
from ..models.segmentation import Segmenter
from ..runtime.backends import TorchRunner
from ..runtime.build import backend_device, build_runner
from ..runtime.record import ModelInfo
from ..runtime.source import Source, open_source

WINDOWS_PER_CALL = 8  # sliced inference: windows sent through the network at once


@dataclass
class LoadedSegmenter:
    """A segmenter on one engine (`net`: a batch of normalised images in, class logits at their size out:
    PyTorch, onnxruntime or OpenVINO), with what it needs to read an image: its classes, normalisation, input
    size, and for one trained on windows their size and overlap."""

    net: Callable[[torch.Tensor], torch.Tensor]
    classes: list[str]
    pre: Preprocess
    tile: dict[str, Any] | None = None
    colors: list[tuple[int, int, int]] | None = None  # RGB masks: each class's colour
    ignore_index: int = 255

    @classmethod
    def from_info(cls, net: Callable[[torch.Tensor], torch.Tensor], info: ModelInfo,
                  tile: dict[str, Any] | None = None) -> LoadedSegmenter:
        """`net` read as a model record says (`tile` overrides the windows it records)."""
        record = info.task_record
        return cls(net, info.classes, info.pre, tile or record.get("tile"),
                   [tuple(c) for c in record["colors"]] if record.get("colors") else None,
                   record.get("ignore_index", 255))

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """K x H x W class probabilities of a float C x H x W image (0-1) at its own size: by sliced inference,
        blended where windows overlap, for a model trained on windows; else in one pass at the trained size."""
        x = (image.cpu() - torch.tensor(self.pre.mean)[:, None, None]) / torch.tensor(self.pre.std)[:, None, None]
        h, w = x.shape[-2:]
        if not self.tile:
            scale = self.pre.img_size / min(h, w)
            size = [max(1, round(h * scale)), max(1, round(w * scale))]
            logits = self.net(F.interpolate(x[None], size=size, mode="bilinear", align_corners=False,
                                            antialias=True))
            return F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)[0].softmax(0)
        size = self.tile["size"]
        windows = tile_grid(w, h, size, self.tile["overlap"])
        total = torch.zeros(len(self.classes), h, w)
        weight = torch.zeros(1, h, w)
        for start in range(0, len(windows), WINDOWS_PER_CALL):
            group = windows[start:start + WINDOWS_PER_CALL]
            crops = torch.stack([F.pad(x[:, y1:y2, x1:x2], (0, size - (x2 - x1), 0, size - (y2 - y1)))
                                 for x1, y1, x2, y2 in group])
            probs = self.net(crops).float().softmax(1)
            for (x1, y1, x2, y2), p in zip(group, probs):
                ramp = _ramp(y2 - y1)[:, None] * _ramp(x2 - x1)[None, :]
                total[:, y1:y2, x1:x2] += p[:, :y2 - y1, :x2 - x1] * ramp
                weight[:, y1:y2, x1:x2] += ramp
        return total / weight

    def segment(self, image: torch.Tensor) -> torch.Tensor:
        """H x W class indices of a float C x H x W image (0-1)."""
        return self.probabilities(image).argmax(0)

    def network_input(self, image: torch.Tensor) -> torch.Tensor:
        """A square network input of a uint8 C x H x W image, as inference feeds it (to calibrate int8 on): its
        centre at the trained scale, or for a model run on windows a window at full resolution (padded)."""
        if not self.tile:
            return eval_transform(self.pre)(image)
        window = v2.functional.center_crop(image, [self.tile["size"]] * 2).float() / 255
        return (window - torch.tensor(self.pre.mean)[:, None, None]) / torch.tensor(self.pre.std)[:, None, None]

    @property
    def model(self) -> Segmenter:
        """The PyTorch segmenter, for one PyTorch runs (its summary, its sparsity)."""
        if not isinstance(self.net, TorchRunner):
            raise ConfigError("this segmenter runs on another engine than PyTorch: it has no PyTorch network")
        return self.net.model.segmenter


def _class_maps(models: list[LoadedSegmenter], samples: list[MaskSample]
                ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(true mask, each model's class map) of every sample, each image read once."""
    first = models[0]
    dataset = MaskDataset(samples, first.pre.img_size, [0.0], [1.0], colors=first.colors,
                          ignore_index=first.ignore_index, mode=first.pre.mode)
    for i in range(len(samples)):
        image, mask = dataset.raw(i)
        yield mask.as_subclass(torch.Tensor), [m.segment(image.float() / 255) for m in models]


def segmenter_miou(loaded: LoadedSegmenter, samples: list[MaskSample]) -> float:
    """mIoU of `loaded` over `samples`, from one confusion matrix."""
    k = len(loaded.classes)
    total = torch.zeros(k, k, dtype=torch.int64)
    for mask, (pred,) in _class_maps([loaded], samples):
        total += confusion(pred, mask, k, loaded.ignore_index)
    return segmentation_metrics(total, loaded.classes)["miou"]


def compare_segmenters(a: LoadedSegmenter, b: LoadedSegmenter, samples: list[MaskSample]
                       ) -> tuple[float, float, float]:
    """mIoU of `a` and of `b` over `samples` (one confusion matrix each), and the share of pixels both give the
    same class: a compressed segmenter beside the one it came from."""
    k, ignore = len(a.classes), a.ignore_index
    totals = [torch.zeros(k, k, dtype=torch.int64) for _ in range(2)]
    same = pixels = 0
    for mask, maps in _class_maps([a, b], samples):
        for total, pred in zip(totals, maps):
            total += confusion(pred, mask, k, ignore)
        same, pixels = same + int((maps[0] == maps[1]).sum()), pixels + maps[0].numel()
    a_miou, b_miou = (segmentation_metrics(t, a.classes)["miou"] for t in totals)
    return a_miou, b_miou, same / max(pixels, 1)


def validation_masks(info: ModelInfo, model: str | os.PathLike) -> list[MaskSample]:
    """The validation images and masks of the run that trained `model` (whose record is `info`), as its
    split.csv recorded them; none when the record or the data folder is not found."""
    data, split_csv = info.trained.get("data"), info.recorded_split(model)
    if not data or split_csv is None or not Path(data).is_dir():
        return []
    return read_recorded_masks(data, split_csv, ignore_index=info.task_record.get("ignore_index", 255)).val


def _ramp(n: int) -> torch.Tensor:
    """A window's blending weight along one side: highest at its centre, small but positive at its edges, so
    where windows overlap the one that sees a pixel with more context around it counts more."""
    x = torch.arange(n, dtype=torch.float32)
    return torch.minimum(x + 1, n - x) / ((n + 1) / 2)


def load_segmenter(source: str | os.PathLike, device: str = "auto", tile: dict[str, Any] | None = None,
                   backend: str = "auto", precision: str = "fp32") -> LoadedSegmenter:
    """A segmenter (run directory, .safetensors, or an exported .onnx / OpenVINO .xml): `open_segmenter`."""
    return open_segmenter(open_source(source), device, tile, backend, precision)


def open_segmenter(src: Source, device: str = "auto", tile: dict[str, Any] | None = None, backend: str = "auto",
                   precision: str = "fp32") -> LoadedSegmenter:
    """A segmenter read by `open_source` on `backend` (auto: the file's own engine, PyTorch for a run) and
    `device` in `precision` (onnxruntime: the file's own), slicing images into `tile` ({"size", "overlap"};
    default: the windows it was trained on, if any)."""
    if src.info.task != "segment":
        raise ConfigError(f"{src.path} holds a {src.info.task} model, not a segmenter")
    if backend == "auto":
        backend = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}[src.kind]
    precision = "auto" if backend == "onnxruntime" else precision
    return LoadedSegmenter.from_info(build_runner(src, backend, backend_device(backend, device), precision),
                                     src.info, tile)


def palette_png(classes: np.ndarray, colors: np.ndarray) -> Image.Image:
    """A uint8 class map as a palette image: each pixel's value its class, the classes' `colors` shown by any
    viewer."""
    image = Image.fromarray(classes, "P")
    image.putpalette(colors.ravel().tolist())
    return image


def class_shares(classes: np.ndarray, names: list[str]) -> dict[str, float]:
    """The share of a class map's pixels each class present takes: what predict writes and serve answers."""
    counts = np.bincount(classes.ravel(), minlength=len(names))
    return {c: round(float(n) / classes.size, 4) for c, n in zip(names, counts) if n}


def predict_masks(source: str | os.PathLike, files: list[str], out_dir: str | os.PathLike, *, device: str = "auto",
                  save_images: str | os.PathLike | None = None, tile: dict[str, Any] | None = None,
                  backend: str = "auto", precision: str = "fp32") -> list[dict[str, Any]]:
    """A class-index PNG per image in `out_dir` (palette PNG: the class colours show in any viewer), as rows
    {"path", "mask", "pixels": {class: share}} or {"path", "error"}; `save_images` lays the classes over the
    images in that folder; `tile` ({"size", "overlap"}) slices images as a run trained on windows does; `backend`
    and `precision` as `open_segmenter` takes them."""
    loaded = load_segmenter(source, device, tile, backend, precision)
    colors = palette(len(loaded.classes), loaded.colors)
    rows: list[dict[str, Any]] = []
    for path in files:
        try:
            image = pil_to_tensor(load_image(path, loaded.pre.mode))
        except DataError as e:
            rows.append({"path": path, "error": str(e)})
            continue
        pred = loaded.segment(image.float() / 255).numpy().astype(np.uint8)
        target = Path(out_dir) / f"{Path(path).stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            palette_png(pred, colors).save(tmp, format="PNG")
        rows.append({"path": path, "mask": str(target), "pixels": class_shares(pred, loaded.classes)})
        if save_images is not None:
            drawn = overlay(image.permute(1, 2, 0).numpy(), pred.astype(np.int64), colors, 255)
            shown = Path(save_images) / f"{Path(path).stem}.png"
            shown.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(shown) as tmp:
                Image.fromarray(drawn).save(tmp, format="PNG")
    return rows
