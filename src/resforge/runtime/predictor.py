"""One loaded model for every backend: what evaluation, prediction, export checks, bench and serve use.

`Predictor.load(source)` takes a run directory, a `.safetensors` with its sidecar, an `.onnx` file or
an OpenVINO `.xml` (`source.py` reads it and its record, `ModelInfo`: classes and preprocessing) and
puts the network on a backend (`build.py`): torch, onnxruntime, openvino, tensorrt, or `auto`, the
fastest here by a short measurement cached per model file (`auto.py`). Images go in as file paths,
bytes, PIL images, numpy arrays or uint8 tensors, one or many; `prepare` decodes and preprocesses them
in one place, exactly as the record says; probabilities and top-k class names come out. Labelled files
go through `infer`, the one loop of evaluation, ensembles and compression's measurements.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ..data.folder import DEFAULT_MAX_PIXELS, Sample, check_size, convert_mode
from ..data.loader import ImageDataset, decode_image, make_loader, pil_to_tensor, resolve_workers
from ..data.transforms import eval_transform
from ..device import cpu_cores
from ..errors import CheckpointError, ConfigError, DataError
from .auto import choose_backend
from .backends import BACKENDS, PRECISIONS, Runner
from .build import backend_device, build_runner
from .inference import TTA_MODES, TenCropViews, infer
from .drift import verdicts
from .profile import STATS, Profile, image_stats
from .record import ModelInfo
from .source import open_source

log = logging.getLogger("resforge")

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor


class Predictor:
    """A model on a backend, with its classes and preprocessing. Call it on a prepared batch for logits;
    `predict` and `probabilities` take images. Images over `max_pixels`, or (when set) more elongated than
    `max_aspect`, are refused before they are decoded or resized; files decode only in the record's formats."""

    def __init__(self, runner: Runner, info: ModelInfo, source: str, model: torch.nn.Module | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect: float | None = None):
        self.runner, self.info, self.source, self.model = runner, info, source, model
        self.classes, self.pre = info.classes, info.pre
        self.max_pixels, self.max_aspect = max_pixels, max_aspect
        self.transform = None if info.takes_pixels else eval_transform(info.pre)
        self.auto: dict[str, Any] | None = None  # what the auto choice measured, when it made one
        self.profile = _profile(info, source)

    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def precision(self) -> str:
        return self.runner.precision

    @property
    def takes_pixels(self) -> bool:
        return self.info.takes_pixels

    @classmethod
    def load(cls, source: str | os.PathLike, backend: str = "auto", device: str = "auto", precision: str = "auto",
             *, threads: int | None = None, compile: bool = False, cuda_graph: bool = False, batch_size: int = 1,
             metadata: dict[str, Any] | None = None) -> Predictor:
        """`source` on `backend`; `auto` measures the backends that can run it at `batch_size` and keeps the
        fastest (remembered per model file, batch size, threads and machine). `metadata` supplies what a
        model file without resforge's record lacks (classes, img_size, crop_pct, mean, std, interpolation)."""
        if backend not in ("auto", *BACKENDS):
            raise ConfigError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {backend!r}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads must be a positive count, got {threads!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size!r}")
        if (compile or cuda_graph) and backend != "torch":
            raise ConfigError(f"{'compile' if compile else 'cuda_graph'} applies to the torch backend: give "
                              "backend='torch'")
        src = open_source(source, metadata)
        if src.info.task == "detect":
            raise ConfigError(f"{source} is a detector: its answers are boxes (resforge predict and eval, or "
                              "tasks.detect_infer.load_detector), not one tensor a batch")
        dev = backend_device(backend, device)
        if backend == "auto":
            runner, measured = choose_backend(src, dev, precision, threads, batch_size)
        else:
            runner, measured = build_runner(src, backend, dev, precision, threads, compile, cuda_graph), None
        predictor = cls(runner, src.info, str(source), src.model)
        predictor.auto = measured
        return predictor

    # -- a prepared batch in, logits out ------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (float32, CPU) of a prepared batch: float NCHW, or uint8 NHWC for a model taking pixels."""
        return self.runner(x)

    # -- images in ---------------------------------------------------------------------------------
    def decode(self, image: ImageInput, name: str | None = None) -> torch.Tensor:
        """Any accepted image as uint8 CxHxW in the model's channels."""
        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            return decode_image(image, self.pre, self.max_pixels, name, self.info.formats, self.max_aspect)
        if isinstance(image, Image.Image):
            check_size(image.width, image.height, name or "image", self.max_pixels, self.max_aspect)
            return pil_to_tensor(convert_mode(image, self.pre.mode))
        if isinstance(image, (np.ndarray, torch.Tensor)):
            x = _array_image(image, self.pre.in_chans, name or "image")
            check_size(x.shape[2], x.shape[1], name or "image", self.max_pixels, self.max_aspect)
            return x
        raise DataError(f"{name or 'image'}: {type(image).__name__} is not an image type (give a path, bytes, a "
                        "PIL image, a numpy array or a uint8 tensor)")

    def prepare(self, image: ImageInput, name: str | None = None) -> torch.Tensor:
        """One image as the model's input: normalised float CxHxW, or uint8 HxWxC for a model taking pixels."""
        x = self.decode(image, name)
        return to_hwc(x) if self.takes_pixels else self.transform(x)

    def prepare_seen(self, image: ImageInput, name: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """`prepare`'s input and the image's statistics as it came (`runtime.profile.STATS`), what a monitor
        compares with the model's profile."""
        x = self.decode(image, name)
        return (to_hwc(x) if self.takes_pixels else self.transform(x)), image_stats(x)

    def batches(self, images: Sequence[ImageInput], batch_size: int, names: Sequence[str] | None = None
                ) -> Iterator[tuple[list[int], torch.Tensor | None, np.ndarray | None, dict[int, str]]]:
        """(indices, prepared batch, the images' statistics, {index: error}) in order; an image that cannot be
        read is reported, not raised. A model taking pixels gets batches of images of one size. The images of a
        batch are decoded in threads (PIL and the resize let go of the GIL), while no model runs."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")

        def prepared(i: int) -> tuple[torch.Tensor, np.ndarray] | str:
            image = images[i]
            name = names[i] if names else (str(image) if isinstance(image, (str, os.PathLike)) else f"image {i}")
            try:
                return self.prepare_seen(image, name)
            except DataError as e:
                return str(e).removeprefix(f"{name}: ")

        with ThreadPoolExecutor(min(batch_size, cpu_cores())) as pool:
            for start in range(0, len(images), batch_size):
                chunk = range(start, min(start + batch_size, len(images)))
                results = list(pool.map(prepared, chunk))
                errors = {i: r for i, r in zip(chunk, results) if isinstance(r, str)}
                good = [(i, r) for i, r in zip(chunk, results) if not isinstance(r, str)]
                while good:  # pixel graphs: a run of images of one size per batch
                    n = len(good) if not self.takes_pixels else next(
                        (k for k, (_, (x, _)) in enumerate(good) if x.shape != good[0][1][0].shape), len(good))
                    yield ([i for i, _ in good[:n]], torch.stack([x for _, (x, _) in good[:n]]),
                           np.stack([s for _, (_, s) in good[:n]]), errors)
                    good, errors = good[n:], {}
                if errors:
                    yield [], None, None, errors

    def logits(self, images: Sequence[ImageInput], batch_size: int = 32) -> torch.Tensor:
        """Logits over the classes, [N, classes], float32 on the CPU; an unreadable image is an error."""
        _, _, out, errors = self.observe(images, batch_size)
        if errors:
            first = min(errors)
            raise DataError(f"image {first}: {errors[first]}")
        return out

    def probabilities(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Softmax over the classes, [N, classes]; an unreadable image is an error."""
        return self.logits(images, batch_size).softmax(-1).numpy()

    def predict(self, images: ImageInput | Sequence[ImageInput], topk: int = 5, batch_size: int = 32,
                names: Sequence[str] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """Top-k classes with probabilities per image (`{"top": [{"class", "prob"}, ...]}`, and for a model with a
        monitoring profile `"ood": {"score", "flagged"}`), or `{"error": ...}` for an image that cannot be read.
        One image in, one result out; a list, a list."""
        if topk < 1:
            raise ConfigError(f"topk must be at least 1, got {topk}")
        if self.info.task != "classify":
            raise ConfigError(f"{self.source} is a {self.info.task} model: its answers are class maps "
                              "(tasks.segment_infer.LoadedSegmenter, resforge predict), not top-k classes")
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)
        items = [images] if single else list(images)
        rows: list[dict[str, Any]] = [{} for _ in items]
        k = min(topk, len(self.classes))
        for idx, x, _, errors in self.batches(items, batch_size, names):
            for i, message in errors.items():
                rows[i] = {"error": message}
            if x is None:
                continue
            logits = self(x).float()
            top = logits.softmax(-1).topk(k, dim=-1)
            for i, vals, ids in zip(idx, top.values.tolist(), top.indices.tolist()):
                rows[i] = {"top": [{"class": self.classes[c], "prob": v} for c, v in zip(ids, vals)]}
            if self.profile is not None:
                for i, verdict in zip(idx, verdicts(*self.profile.judge(logits.numpy().astype(np.float64)))):
                    rows[i]["ood"] = verdict
        return rows[0] if single else rows

    def observe(self, images: Sequence[ImageInput], batch_size: int = 32, names: Sequence[str] | None = None
                ) -> tuple[list[int], np.ndarray, torch.Tensor, dict[int, str]]:
        """What a monitor reads of images: (the indices of those read, their statistics [n, STATS], their
        logits [n, classes], {index: error} of those that could not be)."""
        idx, stats, logits, errors = [], [], [], {}
        for i, x, s, bad in self.batches(images, batch_size, names):
            errors.update(bad)
            if x is not None:
                idx += i
                stats.append(s)
                logits.append(self(x).float())
        return (idx, np.concatenate(stats) if stats else np.zeros((0, len(STATS))),
                torch.cat(logits) if logits else torch.zeros(0, len(self.classes)), errors)

    # -- labelled files in -------------------------------------------------------------------------
    def loader(self, samples: Sequence[Sample], batch_size: int = 64, workers: int = -1, tta: str | None = None
               ) -> DataLoader:
        """Batches of (prepared images, labels) of `samples` in order, decoded in `workers` processes (-1:
        automatic). A model taking pixels gets them one by one: a batch must share one size. `tta`: flip or
        multicrop (ten crops per image, for a model that takes tensors)."""
        if tta is not None and tta not in TTA_MODES:
            raise DataError(f"unknown test-time augmentation {tta!r}; choose {' or '.join(TTA_MODES)}")
        if tta == "multicrop" and self.takes_pixels:
            raise ConfigError(f"{self.source} crops inside its graph: multicrop needs a model that takes tensors")
        if tta == "multicrop":
            transform = TenCropViews(self.pre)
        elif self.takes_pixels:
            transform, batch_size = to_hwc, 1
        else:
            transform = self.transform
        dataset = ImageDataset(samples, transform, self.pre, max_pixels=self.max_pixels)
        return make_loader(dataset, batch_size, train=False, workers=resolve_workers(workers), seed=0)

    def infer(self, samples: Sequence[Sample], batch_size: int = 64, workers: int = -1, tta: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, classes] on the CPU, labels [N]) of labelled files: what evaluation, ensembles and
        compression's accuracy figures all read. With `tta`, the logs of the views' averaged probabilities."""
        batches = self.loader(samples, batch_size, workers, tta)
        return infer(self, batches, flip=tta == "flip", flip_dim=2 if self.takes_pixels else -1)

    def describe(self) -> str:
        return f"{self.info.name} on {self.backend} ({self.precision})"



def _profile(info: ModelInfo, source: str) -> Profile | None:
    """The model's monitoring profile; one this resforge cannot read leaves the model usable, unmonitored."""
    if not info.profile:
        return None
    try:
        return Profile.from_dict(info.profile, source)
    except CheckpointError as e:
        log.warning("%s; the model runs without monitoring", e)
        return None


def to_hwc(image: torch.Tensor) -> torch.Tensor:
    """uint8 CxHxW as the HxWxC pixels a graph with its own preprocessing takes."""
    return image.permute(1, 2, 0).contiguous()


def _array_image(a: np.ndarray | torch.Tensor, chans: int, name: str) -> torch.Tensor:
    """An already decoded image: numpy HxW or HxWxC (PIL's layout), or a torch CxHxW or HxW tensor, uint8."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.require(a, requirements=["C", "W"]))
    if t.dtype != torch.uint8:
        raise DataError(f"{name}: expected uint8 pixels (0-255), got {str(t.dtype).replace('torch.', '')}")
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 3 and not isinstance(a, torch.Tensor):
        t = t.permute(2, 0, 1)
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4) or min(t.shape[1:]) < 1:
        raise DataError(f"{name}: expected an image of 1, 3 or 4 channels (numpy HxWxC, torch CxHxW), got shape "
                        f"{list(a.shape)}")
    if t.shape[0] == chans:
        return t.contiguous()
    hwc = t.permute(1, 2, 0).numpy()  # converted as a file of that kind would be
    im = Image.fromarray(hwc[..., 0] if t.shape[0] == 1 else hwc, {1: "L", 3: "RGB", 4: "RGBA"}[t.shape[0]])
    return pil_to_tensor(convert_mode(im, "L" if chans == 1 else "RGB"))

