"""A saved or exported detector, loaded and run: what evaluation, prediction, export's parity gate, bench, serve
and quantisation call. `LoadedDetector` runs a PyTorch detector or an exported graph (`ExportedDetector`, on
onnxruntime or OpenVINO) alike, slicing images into tiles for one trained on tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.annotations import Objects
from ..data.folder import load_image
from ..data.loader import make_loader, pil_to_tensor
from ..data.objects import ObjectsDataset, collate_objects, detection_transform
from ..data.tiles import sliced_predict
from ..device import resolve_device, to_device
from ..errors import ConfigError, DataError
from ..evaluation.coco import detection_metrics, mask_rle
from ..models.detection import Detector
from ..runtime.backends import OnnxRuntimeRunner, OpenVinoRunner
from ..runtime.build import backend_device, build_runner
from ..runtime.source import Source, open_source


@dataclass
class LoadedDetector:
    """A detector in evaluation mode (a run's, or an exported file on its engine), with its class names (labels
    1..K) and, for a detector trained on tiles, their size and overlap: what evaluation and prediction both call."""

    model: Detector | ExportedDetector
    classes: list[str]
    tile: dict[str, Any] | None = None
    mode: str = "RGB"  # the channels it reads images in

    @property
    def device(self) -> torch.device:
        return self.model.device if isinstance(self.model, ExportedDetector) else next(self.model.parameters()).device

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The detections (on the CPU) of float CxHxW images: by sliced inference when the detector was
        trained on tiles, else in one call."""
        images = to_device(images, self.device)
        if self.tile:
            out = [sliced_predict(self.model, image, self.tile["size"], self.tile["overlap"]) for image in images]
        else:
            out = self.model(images)
        return [{k: v.cpu() for k, v in o.items()} for o in out]


class ExportedDetector:
    """An exported detector (`models.detection.DetectorGraph`) on its engine, called as torchvision's detectors
    are: float C x H x W images in, a dict of boxes, labels, scores (and masks) for each out, one image a call."""

    device = torch.device("cpu")

    def __init__(self, runner: OnnxRuntimeRunner | OpenVinoRunner, detector: str):
        self.runner, self.detector = runner, detector
        self.names = ["boxes", "labels", "scores"] + (["masks"] if detector == "maskrcnn" else [])

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [dict(zip(self.names, self.runner.outputs(image.float()))) for image in images]


def detection_figures(predictor: LoadedDetector, samples: list[Objects], batch_size: int = 8, workers: int = 0
                      ) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """(COCO metrics, detections, targets) of `predictor` on annotated `samples` (class indices the model's)."""
    masks = predictor.model.detector == "maskrcnn"
    loader = make_loader(ObjectsDataset(samples, detection_transform(None), masks=masks), batch_size,
                         train=False, workers=max(workers, 0), seed=0, collate_fn=collate_objects)
    predictions, targets, sizes = [], [], []
    for x, y in loader:
        predictions += predictor.detect(x)
        targets += y
        sizes += [tuple(image.shape[-2:]) for image in x]
    return detection_metrics(predictions, targets, sizes, len(predictor.classes), masks=masks), predictions, targets


def load_detector(source: str | os.PathLike, device: str = "auto", tile: dict[str, Any] | None = None,
                  backend: str = "auto") -> LoadedDetector:
    """A saved detector (run directory, .safetensors or its sidecar; or an exported .onnx or OpenVINO .xml) on
    `device`, in evaluation mode, slicing images into `tile` ({"size", "overlap"}; default: the tiles it was
    trained on, if any); see `open_detector` for `backend`."""
    return open_detector(open_source(source), device, tile, backend)


def detector_backend(src: Source, backend: str) -> str:
    """The engine a detector read by `open_source` runs on when asked for `backend` (auto: its file's own), or
    why it cannot."""
    if src.info.task != "detect":
        raise ConfigError(f"{src.path} holds a {src.info.task} model, not a detector")
    engines = {"torch": ["torch", "onnxruntime", "openvino"], "onnx": ["onnxruntime", "openvino"],
               "openvino": ["openvino"]}[src.kind]
    if backend != "auto" and backend not in engines:
        raise ConfigError(f"{src.path} is a detector that runs on {' or '.join(engines)}, not on {backend}")
    return engines[0] if backend == "auto" else backend


def check_detector_precision(precision: str) -> None:
    """A detector runs in fp32: its anchors, box coding and NMS are float32's (bf16 would put coordinates past
    256 px on a 2-px grid)."""
    if precision not in ("auto", "fp32"):
        raise ConfigError(f"a detector runs in fp32 (its boxes are decoded in float32), not {precision}")


def open_detector(src: Source, device: str = "auto", tile: dict[str, Any] | None = None, backend: str = "auto"
                  ) -> LoadedDetector:
    """A detector read by `open_source` on `backend`: auto is its file's engine (PyTorch for a run, onnxruntime
    for .onnx, OpenVINO for .xml); a run goes to onnxruntime or OpenVINO as the graph `export` writes (NMS
    inside; converted once, cached), an .onnx file to OpenVINO too."""
    backend = detector_backend(src, backend)
    tile = tile or src.info.task_record.get("tile")
    if backend == "torch":
        if not isinstance(src.model, Detector):
            raise ConfigError(f"{src.path} holds a classifier, not a detector")
        return LoadedDetector(src.model.to(resolve_device(device)).eval(), src.info.classes, tile, src.info.pre.mode)
    runner = build_runner(src, backend, backend_device(backend, device), "auto" if backend == "onnxruntime" else "fp32")
    return LoadedDetector(ExportedDetector(runner, src.info.name), src.info.classes, tile, src.info.pre.mode)


def predict_boxes(source: str | os.PathLike, files: list[str], *, conf: float = 0.25, batch_size: int = 8,
                  device: str = "auto", save_images: str | os.PathLike | None = None,
                  tile: dict[str, Any] | None = None, backend: str = "auto") -> list[dict[str, Any]]:
    """Objects scoring at least `conf` in each image, as rows {"path", "objects": [{"class", "score", "box": [x1,
    y1, x2, y2], and for Mask R-CNN "mask": COCO's compressed RLE}]} or {"path", "error"}; `save_images` draws
    them into that folder; `tile` ({"size", "overlap"}) slices images as a run trained on tiles does; `backend`
    as `open_detector` takes it."""
    loaded = load_detector(source, device, tile, backend)
    classes = loaded.classes
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        images, names = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(pil_to_tensor(load_image(path, loaded.mode)))
                names.append(path)
            except DataError as e:
                rows.append({"path": path, "error": str(e)})
        if not images:
            continue
        for path, image, o in zip(names, images, loaded.detect([i.float() / 255 for i in images])):
            rows.append({"path": path, "objects": detected_objects(o, classes, conf)})
            if save_images is not None:
                keep = o["scores"] >= conf
                labels, scores = o["labels"][keep], o["scores"][keep]
                _draw(image, o["boxes"][keep], [f"{classes[int(l_) - 1]} {float(s):.2f}" for l_, s in
                                                zip(labels, scores)],
                      o["masks"][keep] if "masks" in o else None, Path(save_images) / f"{Path(path).stem}.png")
    order = {p: i for i, p in enumerate(files)}
    return sorted(rows, key=lambda r: order[r["path"]])


def detected_objects(found: dict[str, torch.Tensor], classes: list[str], conf: float) -> list[dict[str, Any]]:
    """One image's detections scoring at least `conf`, as [{"class", "score", "box": [x1, y1, x2, y2], and for
    Mask R-CNN "mask": COCO's compressed RLE}]: what predict writes and serve answers."""
    keep = found["scores"] >= conf
    objects = [{"class": classes[int(label) - 1], "score": round(float(score), 4),
                "box": [round(float(v), 1) for v in box]}
               for box, label, score in zip(found["boxes"][keep], found["labels"][keep], found["scores"][keep])]
    if "masks" in found:
        for obj, rle in zip(objects, mask_rle(found["masks"][keep])):
            obj["mask"] = rle
    return objects


def _draw(image: torch.Tensor, boxes: torch.Tensor, captions: list[str], masks: torch.Tensor | None,
          path: Path) -> None:
    """The image with its masks, boxes and captions drawn (torchvision's `draw_segmentation_masks` and
    `draw_bounding_boxes`), written atomically."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from ..io import atomic_path

    drawn = image.expand(3, -1, -1)
    if masks is not None and len(masks):
        drawn = draw_segmentation_masks(drawn, masks[:, 0] > 0.5, alpha=0.4, colors="yellow")
    if len(boxes):
        drawn = draw_bounding_boxes(drawn, boxes, captions, colors="yellow", width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
