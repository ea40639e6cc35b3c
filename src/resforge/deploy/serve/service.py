"""One loaded model as the server uses it, whatever its task: how a request's image is prepared (a decoding
thread), how a batch of prepared images of one shape is run (the batcher's model thread), and how each result
is answered in JSON. A classifier answers its top-k classes; a detector its objects (boxes, and Mask R-CNN's
masks as COCO RLE); a segmenter the share of each class and its class map as a palette PNG.

A dense model reads the image at its full resolution (boxes are in its pixels) and runs on the engine of its
file unless told otherwise: PyTorch for a run, onnxruntime or OpenVINO for an exported graph."""

from __future__ import annotations

import base64
import io
import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from ...data.folder import DEFAULT_MAX_PIXELS, load_image
from ...data.loader import pil_to_tensor
from ...data.masks import palette
from ...runtime.drift import Monitor
from ...runtime.measure import sample_batch
from ...runtime.predictor import Predictor
from ...runtime.record import ModelInfo
from ...runtime.source import open_source
from ...tasks import recorded_task
from ...tasks.detect_infer import LoadedDetector, check_detector_precision, detected_objects, open_detector
from ...tasks.segment_infer import LoadedSegmenter, class_shares, open_segmenter, palette_png
from .http import HttpError

DEFAULT_TOPK, DEFAULT_CONF = 5, 0.25
TASK_NOUNS = {"classify": "classifiers", "detect": "detectors", "segment": "segmenters"}


class Query:
    """What a request asks beside its images: `topk` (classifiers) or `conf` (detectors), checked against the
    model's task, so that no option is accepted and then ignored."""

    def __init__(self, task: str, topk: int | None = None, conf: float | None = None):
        for name, value, task_of in (("topk", topk, "classify"), ("conf", conf, "detect")):
            if value is not None and task != task_of:
                raise HttpError(422, f"{name} applies to {TASK_NOUNS[task_of]}; this server runs a {task} model")
        if topk is not None and topk < 1:
            raise HttpError(422, f"topk must be at least 1, got {topk}")
        if conf is not None and not 0 <= conf <= 1:
            raise HttpError(422, f"conf must be a score from 0 to 1, got {conf:g}")
        self.topk = DEFAULT_TOPK if topk is None else topk
        self.conf = DEFAULT_CONF if conf is None else conf


class Service(ABC):
    """A model behind the server. `prepare`: one image's bytes as the model's input; `run`: a batch of them (one
    shape) in, one result each out; `answer`: a result as JSON. Images over `max_pixels` or more elongated than
    `max_aspect` are refused from their header, before they are decoded."""

    task = "classify"
    info: ModelInfo
    backend: str
    precision: str
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float | None = None
    monitor: Monitor | None = None  # a classifier with a profile, watched (`watch`)

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    def limit(self, max_pixels: int, max_aspect: float) -> None:
        self.max_pixels, self.max_aspect = max_pixels, max_aspect

    def prepare(self, data: bytes, name: str) -> torch.Tensor:
        """A dense model's input: the image as uint8 C x H x W at its own size, in the model's channels."""
        return pil_to_tensor(load_image(data, self.info.pre.mode, self.max_pixels, name=name,
                                        formats=self.info.formats, max_aspect=self.max_aspect))

    def prepare_seen(self, data: bytes, name: str) -> tuple[torch.Tensor, np.ndarray | None]:
        """`prepare`'s input, and the image's statistics when a monitor watches them."""
        return self.prepare(data, name), None

    def watch(self, window: int, decay: float) -> None:
        """Compare what the model is shown with its profile, in a window of `window` images (the model has
        none: nothing is watched)."""

    def observe(self, stats: list[np.ndarray | None], results: list[Any]) -> list[dict[str, Any]]:
        """The monitor's verdict on each answered image ({"score", "flagged"}); none when nothing is watched."""
        return []

    @abstractmethod
    def run(self, xs: list[torch.Tensor]) -> list[Any]: ...

    @abstractmethod
    def answer(self, result: Any, query: Query) -> dict[str, Any]: ...

    def samples(self, n: int) -> list[torch.Tensor]:
        """`n` inputs as `prepare` makes them, to warm the backend up on: mid-grey images at the trained size."""
        p = self.info.pre
        return [torch.full((p.in_chans, p.img_size, p.img_size), 128, dtype=torch.uint8)] * n

    def warm_up(self, max_batch: int) -> None:
        """The first calls of a backend allocate and plan; clients should not pay for them."""
        for n in (1, max_batch):
            for _ in range(2):
                self.run(self.samples(n))

    def describe(self) -> str:
        return f"{self.info.name} ({self.task}) on {self.backend} ({self.precision})"


class Classifier(Service):
    """A Predictor: logits of a batch, the top-k classes of each, and, with a profile, each image's
    out-of-distribution score and the drift of the stream."""

    def __init__(self, predictor: Predictor):
        self.predictor, self.info = predictor, predictor.info
        self.backend, self.precision = predictor.backend, predictor.precision

    def limit(self, max_pixels: int, max_aspect: float) -> None:
        self.predictor.max_pixels, self.predictor.max_aspect = max_pixels, max_aspect

    def prepare(self, data: bytes, name: str) -> torch.Tensor:
        return self.predictor.prepare(data, name)

    def prepare_seen(self, data: bytes, name: str) -> tuple[torch.Tensor, np.ndarray | None]:
        if self.monitor is None:
            return self.prepare(data, name), None
        return self.predictor.prepare_seen(data, name)

    def watch(self, window: int, decay: float) -> None:
        if self.predictor.profile is not None:
            self.monitor = Monitor(self.predictor.profile, self.classes, window, decay)

    def observe(self, stats: list[np.ndarray | None], results: list[torch.Tensor]) -> list[dict[str, Any]]:
        if self.monitor is None:
            return []
        return self.monitor.observe(np.stack(stats), torch.stack(results))

    def run(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.predictor(torch.stack(xs)).float())

    def answer(self, logits: torch.Tensor, query: Query) -> dict[str, Any]:
        top = logits.softmax(-1).topk(min(query.topk, len(self.classes)))
        return {"top": [{"class": self.classes[c], "prob": p}
                        for p, c in zip(top.values.tolist(), top.indices.tolist())]}

    def samples(self, n: int) -> list[torch.Tensor]:
        return list(sample_batch(self.info, n))

    def describe(self) -> str:
        return self.predictor.describe()


class Detector(Service):
    """A detector (a run's, or an exported graph on its engine): the objects in each image."""

    task = "detect"

    def __init__(self, loaded: LoadedDetector, info: ModelInfo):
        self.loaded, self.info, self.precision = loaded, info, "fp32"
        runner = getattr(loaded.model, "runner", None)
        self.backend = "torch" if runner is None else runner.backend

    def run(self, xs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.loaded.detect([x.float() / 255 for x in xs])

    def answer(self, found: dict[str, torch.Tensor], query: Query) -> dict[str, Any]:
        return {"objects": detected_objects(found, self.classes, query.conf)}


class Segmenter(Service):
    """A segmenter on any engine: each image's class map, as the share of its pixels each class takes and a
    palette PNG (a pixel's value is its class's index; the palette holds the classes' colours)."""

    task = "segment"

    def __init__(self, loaded: LoadedSegmenter, info: ModelInfo):
        self.loaded, self.info = loaded, info
        self.backend, self.precision = loaded.net.backend, loaded.net.precision
        self.colors = palette(len(info.classes), loaded.colors)

    def run(self, xs: list[torch.Tensor]) -> list[np.ndarray]:
        return [self.loaded.segment(x.float() / 255).numpy().astype(np.uint8) for x in xs]

    def png(self, classes: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        palette_png(classes, self.colors).save(buffer, format="PNG")
        return buffer.getvalue()

    def answer(self, classes: np.ndarray, query: Query) -> dict[str, Any]:
        return {"pixels": class_shares(classes, self.classes),
                "mask": {"format": "png", "encoding": "base64", "width": classes.shape[1],
                         "height": classes.shape[0], "data": base64.b64encode(self.png(classes)).decode()}}


def service_of(predictor: Predictor) -> Service:
    """A loaded Predictor as the server runs it: a classifier, or a segmenter's network read as a segmenter."""
    if predictor.info.task == "segment":
        return Segmenter(LoadedSegmenter.from_info(predictor.runner, predictor.info), predictor.info)
    return Classifier(predictor)


def load_service(source: str | os.PathLike, backend: str = "auto", device: str = "auto", precision: str = "auto",
                 max_batch: int = 1, metadata: dict[str, Any] | None = None) -> Service:
    """The model at `source` as the server runs it: a classifier through `Predictor.load` (any backend, auto
    measured at `max_batch`); a detector or segmenter on `backend` (auto: its file's engine)."""
    if recorded_task(source) == "classify":
        return Classifier(Predictor.load(source, backend, device, precision, batch_size=max_batch,
                                         metadata=metadata))
    src = open_source(source, metadata)
    if src.info.task == "detect":
        check_detector_precision(precision)
        return Detector(open_detector(src, device, backend=backend), src.info)
    return Segmenter(open_segmenter(src, device, backend=backend, precision="fp32" if precision == "auto"
                                    else precision), src.info)
