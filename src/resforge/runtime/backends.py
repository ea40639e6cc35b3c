"""The engines a Predictor runs on, behind one call: PyTorch, ONNX Runtime and OpenVINO.

A runner takes a prepared batch as a CPU tensor (float NCHW, normalised; or uint8 NHWC pixels for
a graph with the preprocessing inside) and returns float32 logits on the CPU. Providers, threads
and precision are fixed when it is built, so a call is one engine call and little else.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..device import autocast, precision_name, resolve_amp
from ..errors import CheckpointError, ConfigError

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")  # tensorrt: ONNX Runtime's TensorRT provider
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PIP_EXTRA = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "onnxruntime-gpu with TensorRT"}
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def resolve_precision(backend: str, precision: str, device: torch.device, exported: str = "fp32") -> str:
    """auto: bf16 where the hardware runs it natively (torch, OpenVINO; as training's amp auto), else fp32.
    ONNX Runtime runs a file in the precision it was exported in (`exported`)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if backend in ("onnxruntime", "tensorrt"):
        if precision not in ("auto", exported):
            raise ConfigError(f"{backend} runs a model in the precision it was exported in ({exported}); for "
                              f"{precision} use --backend torch or openvino, or export with --dtype {precision}")
        return exported
    return precision_name(resolve_amp("off" if precision == "fp32" else precision, device))


def require_backend(backend: str):
    """The backend's package, or a clear error naming what to install."""
    module = {"onnxruntime": "onnxruntime", "tensorrt": "onnxruntime", "openvino": "openvino"}[backend]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"the {backend} backend needs the {module} package: "
                          f"pip install {PIP_EXTRA[backend]}") from None


class Runner:
    """One loaded model on one engine."""

    backend: str
    precision: str
    max_batch: int | None = None  # a graph exported with a fixed batch size takes exactly this many
    device = torch.device("cpu")  # where a batch is best handed over (already there, it is not copied)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of any size (a fixed-batch graph gets it in slices, the last one padded)."""
        n = self.max_batch
        if n is None or len(x) == n:
            return self.run(x)
        parts = []
        for i in range(0, len(x), n):
            part = x[i:i + n]
            padded = torch.cat([part, part[-1:].expand(n - len(part), *part.shape[1:])]) if len(part) < n else part
            parts.append(self.run(padded)[:len(part)])
        return torch.cat(parts)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchRunner(Runner):
    """PyTorch eager or compiled, in autocast's precision; with `cuda_graph`, each batch shape's forward pass
    is captured once in a CUDA graph and replayed (one launch instead of one per kernel: what sets the pace
    of small batches on a GPU)."""

    backend = "torch"

    def __init__(self, model: nn.Module, device: torch.device, precision: str, compile: bool = False,
                 cuda_graph: bool = False):
        if cuda_graph and device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device; this model runs on {device}")
        self.device, self.precision, self.cuda_graph = device, precision, cuda_graph
        self.dtype = resolve_amp("off" if precision == "fp32" else precision, device)
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        # Static shapes: a batch size of its own compiles once and runs kernels made for it.
        self.forward = torch.compile(self.model, dynamic=False) if compile else self.model
        self.graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.lock = threading.Lock()  # a graph's input and output are one buffer each: calls take turns

    @torch.inference_mode()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        if self.cuda_graph:
            with self.lock:
                return self._replay(x).cpu()
        with autocast(self.device, self.dtype):
            return self.forward(x).float().cpu()

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        graph, inputs, outputs = self.graphs[key]
        inputs.copy_(x)
        graph.replay()
        return outputs

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """Warm up on a side stream (kernels chosen, memory allocated, compiled), then record one forward pass.
        Autocast's cast cache stays off: cached casts would outlive the capture."""
        inputs = x.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), autocast(self.device, self.dtype, cache=False):
            for _ in range(3):
                self.forward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast(self.device, self.dtype, cache=False):
            outputs = self.forward(inputs).float()
        return graph, inputs, outputs


def ort_providers(device: torch.device, tensorrt: bool = False) -> list:
    """ONNX Runtime's execution providers for `device` (TensorRT's first when asked), or a clear error when
    this onnxruntime build lacks them."""
    available = require_backend("tensorrt" if tensorrt else "onnxruntime").get_available_providers()
    if tensorrt:
        if "TensorrtExecutionProvider" not in available:
            raise ConfigError("TensorRT is not available here: this onnxruntime build has no "
                              "TensorrtExecutionProvider (it needs onnxruntime-gpu with TensorRT on an NVIDIA GPU)")
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError("this onnxruntime build has no CUDA provider (pip install onnxruntime-gpu), "
                              "or run it with --device cpu")
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, model: bytes | Path, device: torch.device, threads: int | None = None, tensorrt: bool = False):
        ort = require_backend("tensorrt" if tensorrt else "onnxruntime")
        self.precision = "fp32"
        if tensorrt:
            self.backend = "tensorrt"
        providers = ort_providers(device, tensorrt)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                providers=providers)
        except Exception as e:  # ORT raises its own types for unreadable graphs and unsupported opsets
            raise CheckpointError(f"onnxruntime cannot load {model if isinstance(model, Path) else 'the model'}: "
                                  f"{str(e).splitlines()[0][:300]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.max_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x, [self.output_name])[0]

    def outputs(self, x: torch.Tensor, names: list[str] | None = None) -> list[torch.Tensor]:
        """The graph's outputs named (all, by default: a detector's boxes, labels, scores, masks)."""
        try:
            return [torch.from_numpy(o) for o in self.session.run(names, {self.input_name: x.numpy()})]
        except Exception as e:  # ORT's own error types: a graph that does not take what its record says
            raise _refused(self.backend, x, e) from None


def openvino_core() -> Any:
    """The process's one OpenVINO Core. Each Core's CPU plugin puts a signal stack of its own on the
    thread that compiles and, when it goes, puts back the one it found: Cores freed in any order but
    the reverse leave the thread on a freed signal stack, and the next signal handled there (a child
    process ending, with a SIGCHLD handler installed) corrupts memory. One Core is never freed early."""
    return _core(require_backend("openvino"))


@functools.cache
def _core(ov: Any) -> Any:
    return ov.Core()


class OpenVinoRunner(Runner):
    backend = "openvino"

    def __init__(self, model: Any, device: torch.device, precision: str, threads: int | None = None):
        if device.type != "cpu":
            raise ConfigError("the openvino backend runs on the CPU here (--device cpu)")
        self.precision = precision
        config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        core = openvino_core()
        try:
            if isinstance(model, (str, os.PathLike)):
                model = core.read_model(str(model))
            compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:
            raise CheckpointError(f"openvino cannot load the model: {str(e).strip().splitlines()[0][:300]}") from None
        self.request = compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request: calls from several threads take turns
        first = compiled.inputs[0].get_partial_shape()[0]
        self.max_batch = first.get_length() if first.is_static else None

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x, 1)[0]

    def outputs(self, x: torch.Tensor, count: int | None = None) -> list[torch.Tensor]:
        """The model's first `count` outputs (all, by default: a detector's boxes, labels, scores, masks)."""
        with self.lock:
            try:
                self.request.infer({0: x.numpy()}, share_inputs=True)
            except RuntimeError as e:
                raise _refused(self.backend, x, e) from None
            return [torch.from_numpy(self.request.get_output_tensor(i).data.copy())
                    for i in range(count or len(self.request.model_outputs))]


def _refused(backend: str, x: torch.Tensor, e: Exception) -> CheckpointError:
    reason = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
    return CheckpointError(f"{backend} could not run the model on a {str(x.dtype).replace('torch.', '')} input of "
                           f"shape {list(x.shape)}: {reason}")
