"""One loaded model for every backend: what evaluation, prediction, export checks, bench and serve use.

`Predictor.load(source)` takes a run directory, a `.safetensors` with its sidecar, an `.onnx` file or
an OpenVINO `.xml`, reads the model's record (`ModelInfo`: classes and preprocessing) and puts the
network on a backend: torch, onnxruntime, openvino, tensorrt, or `auto`, the fastest here by a short
measurement cached per model file. Images go in as file paths, bytes, PIL images, numpy arrays or
uint8 tensors, one or many; `prepare` decodes and preprocesses them in one place, exactly as the
record says; probabilities and top-k class names come out.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import statistics
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..data.folder import DEFAULT_MAX_PIXELS, check_size, convert_mode
from ..data.loader import decode_image, pil_to_tensor
from ..data.transforms import eval_transform
from .. import timing
from ..device import cpu_cores, cpu_name, resolve_device
from ..errors import CheckpointError, ConfigError, DataError
from ..io import sha256_file, write_json
from ..models.weights import cache_dir, load_model, resolve_model_path, sidecar_path
from .backends import (
    BACKENDS,
    PRECISIONS,
    OnnxRuntimeRunner,
    OpenVinoRunner,
    Runner,
    TorchRunner,
    openvino_core,
    ort_providers,
    require_backend,
    resolve_precision,
)
from .record import ONNX_KEY, OV_KEY, ModelInfo, assemble

log = logging.getLogger("resforge")

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor
KINDS = {"torch": ("torch", "onnxruntime", "openvino", "tensorrt"), "onnx": ("onnxruntime", "openvino", "tensorrt"),
         "openvino": ("openvino",)}  # source kind -> the backends that can run it
AUTO_SECONDS = 0.5  # measuring time per candidate backend
AUTO_MAX_BATCH = 16  # larger batches are measured at this size: the ranking holds, the measuring stays short


@dataclass
class Source:
    """A model file as found: its kind, the file that identifies it, its record and what the graph shows."""

    kind: str  # torch | onnx | openvino
    path: Path
    info: ModelInfo
    model: torch.nn.Module | None = None  # the network, for torch sources


def open_source(source: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Source:
    """Read a model file's record; `metadata` supplies what a foreign file lacks (classes, img_size, ...)."""
    p = Path(source)
    suffix = p.suffix.lower()
    if suffix in (".onnx", ".xml") and not p.is_file():
        raise CheckpointError(f"no model at {source}" + (": a folder, not a model file" if p.is_dir() else ""))
    if suffix == ".onnx":
        return _open_onnx(p, metadata or {})
    if suffix == ".xml":
        return _open_openvino(p, metadata or {})
    if p.is_file() and suffix not in (".safetensors", ".json"):
        raise CheckpointError(f"{source} is not a model resforge can load: expected a run directory, a .safetensors "
                              "file with its .json sidecar, an .onnx file or an OpenVINO .xml")
    path = resolve_model_path(source)
    model, meta = load_model(path)
    info = ModelInfo.from_sidecar(meta, str(source))
    if metadata:
        info = assemble(str(source), info.to_json(), metadata, None, None, None)
    info.check_model(str(source), model.num_classes, model.stem_conv.in_channels)
    return Source("torch", path, info, model)


def _open_onnx(path: Path, metadata: dict[str, Any]) -> Source:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable ONNX file (corrupt or truncated?): {e}") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or opset > newest:
        raise CheckpointError(f"{path} uses ONNX opset {opset}; the installed onnx reads up to {newest}")
    if not proto.graph.input or not proto.graph.output:
        raise CheckpointError(f"{path} has no graph inputs or outputs: not a classifier")
    props = {p.key: p.value for p in proto.metadata_props}
    inp = proto.graph.input[0].type.tensor_type
    outputs = proto.graph.output[0].type.tensor_type.shape.dim
    kinds = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.UINT8: "uint8"}
    info = _record(path, props.get(ONNX_KEY), metadata, [d.dim_value or None for d in inp.shape.dim],
                   kinds.get(inp.elem_type, onnx.TensorProto.DataType.Name(inp.elem_type).lower()),
                   (outputs[-1].dim_value or None) if outputs else None)
    return Source("onnx", path, info)


def _record(path: Path, found: str | None, metadata: dict[str, Any], dims: list[int | None], dtype: str,
            outputs: int | None) -> ModelInfo:
    """A graph's record, checked against what the graph shows: NCHW floats or NHWC pixels, the class count,
    a fixed input size."""
    pixels = dtype == "uint8"
    if dtype not in ("float32", "uint8") or (pixels and found is None):
        raise CheckpointError(f"{path} takes {dtype} input{' without a resforge record' if pixels else ''}: resforge "
                              "feeds float32 NCHW tensors, or uint8 pixels to graphs it exported with their "
                              "preprocessing")
    chans = (dims[-1] if dims else None) if pixels else (dims[1] if len(dims) == 4 else None)
    size = None if pixels or len(dims) != 4 or dims[2] != dims[3] else dims[2]
    info = assemble(str(path), found, metadata, chans, size, outputs)
    if info.takes_pixels != pixels:
        raise CheckpointError(f"{path}: its record and its graph disagree on whether it takes pixels")
    if pixels and set(metadata) - {"classes", "formats"}:
        raise ConfigError(f"{path} does its own preprocessing: only its class names and image formats can be given")
    if size is not None and size != info.pre.img_size:
        raise CheckpointError(f"{path} takes {size}x{size} images but its preprocessing makes {info.pre.img_size}")
    return info


def _open_openvino(path: Path, metadata: dict[str, Any]) -> Source:
    if not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"{path} has no weights file {path.with_suffix('.bin').name} beside it")
    try:
        model = openvino_core().read_model(str(path))
    except RuntimeError as e:
        raise CheckpointError(f"{path} is not a readable OpenVINO IR (corrupt or truncated?): "
                              f"{str(e).strip().splitlines()[0][:200]}") from None
    found = model.get_rt_info(OV_KEY).astype(str) if model.has_rt_info(OV_KEY) else None
    shape = model.inputs[0].get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else []
    out = model.outputs[0].get_partial_shape()
    outputs = out[out.rank.get_length() - 1].get_length() if out.rank.is_static and out[-1].is_static else None
    dtype = model.inputs[0].get_element_type().to_dtype().name
    return Source("openvino", path, _record(path, found, metadata, dims, dtype, outputs))


def _fingerprint(source: Source) -> str:
    """Identifies a model's content: its weights and what describes them (sidecar, or the IR's .xml)."""
    files = {"torch": [source.path, sidecar_path(source.path)], "onnx": [source.path],
             "openvino": [source.path, source.path.with_suffix(".bin")]}[source.kind]
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()[:20]


def onnx_for(source: Source) -> Path:
    """The ONNX of a torch source, exported once and cached by the weights' hash (exporting takes seconds)."""
    from ..io import atomic_path
    from .convert import to_onnx

    path = cache_dir() / "onnx" / f"{source.path.stem}-{_fingerprint(source)}.onnx"
    if not path.is_file():
        import onnx

        log.info("exporting %s to ONNX for onnxruntime/openvino (once; cached in %s)", source.path, path.parent)
        model = copy.deepcopy(source.model).to("cpu", memory_format=torch.contiguous_format)  # a runner may hold it
        proto = to_onnx(model, source.info, dynamic_batch=True)
        with atomic_path(path) as tmp:
            onnx.save(proto, tmp)
    return path


def backend_device(backend: str, device: str) -> torch.device:
    """`device` for `backend`: auto is the GPU where there is one and the backend can run there, else the CPU
    (OpenVINO here, and an onnxruntime build without its CUDA provider, run on the CPU)."""
    if device == "auto" and backend in ("onnxruntime", "openvino"):
        providers = require_backend(backend).get_available_providers() if backend == "onnxruntime" else []
        if "CUDAExecutionProvider" not in providers:
            return torch.device("cpu")
    return resolve_device(device)


def check_backend(source: Source, backend: str, device: torch.device, precision: str) -> str:
    """What building `source` on `backend` (not auto) would refuse, found without building it (a server says
    so before it listens): a backend that cannot run the file, or is not installed or able to use `device`
    here, or a precision it cannot run. The precision it runs in."""
    if backend not in KINDS[source.kind]:
        able = ", ".join(KINDS[source.kind])
        raise ConfigError(f"{source.path} ({source.kind}) runs on {able}, not on {backend}")
    if backend in ("onnxruntime", "tensorrt"):
        ort_providers(device, backend == "tensorrt")
    elif backend == "openvino":
        require_backend(backend)
    return resolve_precision(backend, precision, device, source.info.export.get("dtype", "fp32"))


def build_runner(source: Source, backend: str, device: torch.device, precision: str, threads: int | None = None,
                 compile: bool = False, cuda_graph: bool = False) -> Runner:
    """`source` on `backend` (not auto); `compile` and `cuda_graph` are the torch backend's (Predictor.load says
    so for any other)."""
    precision = check_backend(source, backend, device, precision)
    if backend == "torch":
        if threads:
            torch.set_num_threads(threads)
        return TorchRunner(source.model, device, precision, compile=compile, cuda_graph=cuda_graph)
    if source.kind == "openvino":
        return OpenVinoRunner(source.path, device, precision, threads)
    onnx_path = source.path if source.kind == "onnx" else onnx_for(source)
    if backend == "openvino":
        if source.info.takes_pixels:  # OpenVINO's own Interpolate ignores antialias: the IR's preprocessing
            raise ConfigError(f"{source.path} takes pixels with its preprocessing in ONNX operators that "
                              "OpenVINO runs differently; export it with --format openvino instead")
        return OpenVinoRunner(onnx_path, device, precision, threads)
    runner = OnnxRuntimeRunner(onnx_path, device, threads, tensorrt=backend == "tensorrt")
    runner.precision = precision
    return runner


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

    def batches(self, images: Sequence[ImageInput], batch_size: int, names: Sequence[str] | None = None
                ) -> Iterator[tuple[list[int], torch.Tensor | None, dict[int, str]]]:
        """(indices, prepared batch, {index: error}) in order; an image that cannot be read is reported, not
        raised. A model taking pixels gets batches of images of one size. The images of a batch are decoded
        in threads (PIL and the resize let go of the GIL), while no model runs."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")

        def prepared(i: int) -> torch.Tensor | str:
            image = images[i]
            name = names[i] if names else (str(image) if isinstance(image, (str, os.PathLike)) else f"image {i}")
            try:
                return self.prepare(image, name)
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
                        (k for k, (_, x) in enumerate(good) if x.shape != good[0][1].shape), len(good))
                    yield [i for i, _ in good[:n]], torch.stack([x for _, x in good[:n]]), errors
                    good, errors = good[n:], {}
                if errors:
                    yield [], None, errors

    def probabilities(self, images: Sequence[ImageInput], batch_size: int = 32) -> np.ndarray:
        """Softmax over the classes, [N, classes]; an unreadable image is an error."""
        out = np.zeros((len(images), len(self.classes)), np.float32)
        for idx, x, errors in self.batches(images, batch_size):
            if errors:
                i, message = next(iter(errors.items()))
                raise DataError(f"image {i}: {message}")
            out[idx] = self(x).softmax(-1).numpy()
        return out

    def predict(self, images: ImageInput | Sequence[ImageInput], topk: int = 5, batch_size: int = 32,
                names: Sequence[str] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """Top-k classes with probabilities per image (`{"top": [{"class", "prob"}, ...]}`), or
        `{"error": ...}` for an image that cannot be read. One image in, one result out; a list, a list."""
        if topk < 1:
            raise ConfigError(f"topk must be at least 1, got {topk}")
        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)
        items = [images] if single else list(images)
        rows: list[dict[str, Any]] = [{} for _ in items]
        k = min(topk, len(self.classes))
        for idx, x, errors in self.batches(items, batch_size, names):
            for i, message in errors.items():
                rows[i] = {"error": message}
            if x is None:
                continue
            top = self(x).softmax(-1).topk(k, dim=-1)
            for i, vals, ids in zip(idx, top.values.tolist(), top.indices.tolist()):
                rows[i] = {"top": [{"class": self.classes[c], "prob": v} for c, v in zip(ids, vals)]}
        return rows[0] if single else rows

    def describe(self) -> str:
        return f"{self.info.name} on {self.backend} ({self.precision})"


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


# -- auto: the fastest backend here ------------------------------------------------------------------
def _candidates(source: Source, device: torch.device) -> list[str]:
    """The backends worth measuring for `source` here (installed, and able to run it on this device)."""
    out = []
    for backend in KINDS[source.kind]:
        if backend == "tensorrt":
            continue  # only on request: its engine build takes minutes
        if backend != "torch":
            try:
                engine = require_backend(backend)
            except ConfigError:
                continue
            if backend == "openvino" and (device.type != "cpu" or (source.kind == "onnx" and source.info.takes_pixels)):
                continue
            if backend == "onnxruntime" and device.type == "cuda" and \
                    "CUDAExecutionProvider" not in engine.get_available_providers():
                continue
        out.append(backend)
    return out


def sample_batch(info: ModelInfo, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """A batch of the model's input kind for timing, on `device` (a GPU's figures are then the model's, not
    the host-to-device copy's): normalised noise, or mid-grey pixels at the resize size."""
    p = info.pre
    if info.takes_pixels:
        x = torch.full((batch_size, p.resize_size, p.resize_size, p.in_chans), 128, dtype=torch.uint8)
    else:
        x = torch.randn(batch_size, p.in_chans, p.img_size, p.img_size, generator=torch.Generator().manual_seed(0))
    return x.to(device) if device is not None else x


def _auto_key(source: Source, device: torch.device, precision: str, threads: int | None, batch_size: int,
              candidates: list[str]) -> str:
    import onnxruntime

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    parts = [_fingerprint(source), source.kind, str(device), precision, threads or os.cpu_count(), batch_size,
             candidates, cpu_name(), __version__, torch.__version__, onnxruntime.__version__, ov_version]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def choose_backend(source: Source, device: torch.device, precision: str, threads: int | None, batch_size: int
                   ) -> tuple[Runner, dict[str, Any]]:
    """The fastest backend for `source` here, measured at `batch_size` once and remembered in the cache."""
    candidates = _candidates(source, device)
    key = _auto_key(source, device, precision, threads, batch_size, candidates)
    cache = cache_dir() / "auto-backend.json"
    known = _read_json(cache)
    if key in known:
        record = known[key]
        log.info("auto backend: %s %s (measured before at batch %d: %s)", record["backend"], record["precision"],
                 batch_size, _rates(record["img_per_s"]))
        return build_runner(source, record["backend"], device, precision, threads), record
    x = sample_batch(source.info, min(batch_size, AUTO_MAX_BATCH))
    rates: dict[str, float] = {}
    refused: dict[str, str] = {}
    best: tuple[float, Runner] | None = None
    for backend in candidates:
        try:
            runner = build_runner(source, backend, device, precision, threads)
            runner(x), runner(x)  # warm-up: kernels chosen, memory allocated
        except (ConfigError, CheckpointError) as e:
            log.debug("auto backend: %s left out (%s)", backend, e)
            refused[backend] = str(e)
            continue
        per_image = statistics.median(timing.timed_calls(lambda: runner(x), AUTO_SECONDS, max_calls=50)) / len(x)
        rates[f"{backend} {runner.precision}"] = 1 / per_image
        if best is None or per_image < best[0]:
            best = (per_image, runner)
    if best is None:  # the engines' reasons: an invalid graph is named as such, not as a missing backend
        raise ConfigError(f"no backend here can run {source.path} on {device}: "
                          + ("; ".join(f"{b}: {why}" for b, why in refused.items()) or "none is installed for it"))
    runner = best[1]
    record = {"backend": runner.backend, "precision": runner.precision, "batch_size": batch_size, "img_per_s": rates}
    write_json(cache, {**_read_json(cache), key: record})
    log.info("auto backend: %s %s, the fastest here at batch %d (%s)", runner.backend, runner.precision, batch_size,
             _rates(rates))
    return runner, record


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{name} {r:.1f} img/s" for name, r in sorted(rates.items(), key=lambda kv: -kv[1]))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
