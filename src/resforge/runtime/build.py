"""A source on a backend: which backends can run each kind of model file, on which device and in which
precision, refused before anything is built when it cannot work, and the runner built."""

from __future__ import annotations

import torch

from ..device import resolve_device
from ..errors import ConfigError
from .backends import (
    OnnxRuntimeRunner,
    OpenVinoRunner,
    Runner,
    TorchRunner,
    ort_providers,
    require_backend,
    resolve_precision,
)
from .source import Source, onnx_for

KINDS = {"torch": ("torch", "onnxruntime", "openvino", "tensorrt"), "onnx": ("onnxruntime", "openvino", "tensorrt"),
         "openvino": ("openvino",)}  # source kind -> the backends that can run it


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

