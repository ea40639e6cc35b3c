"""A model file as found: what kind it is, its record (classes, preprocessing), checked against what the
graph shows, and for a torch file the network itself.

A run directory or a `.safetensors` with its sidecar is a torch source; an `.onnx` file or an OpenVINO
`.xml` is read for its record (or given one through `metadata`, for a file made elsewhere). The
backends that run each kind are `build.py`'s.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..io import atomic_path, sha256_file
from ..models.detection import Detector
from ..models.segmentation import Segmenter, SegmenterLogits
from ..models.weights import cache_dir, load_model, resolve_model_path, sidecar_path
from .backends import openvino_core
from .record import ONNX_KEY, OV_KEY, ModelInfo, assemble

log = logging.getLogger("resforge")


@dataclass
class Source:
    """A model file as found: its kind, the file that identifies it, its record and what the graph shows."""

    kind: str  # torch | onnx | openvino
    path: Path
    info: ModelInfo
    model: torch.nn.Module | None = None  # the network, for torch sources (a segmenter's: its logits alone)


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
    if isinstance(model, Segmenter):
        info.check_model(str(source), model.num_classes, model.body.stem_conv.in_channels)
        return Source("torch", path, info, SegmenterLogits(model))
    if isinstance(model, Detector):  # the detector itself: its graph has several outputs (DetectorGraph)
        info.check_model(str(source), model.num_classes, model.stem_conv.in_channels)
        return Source("torch", path, info, model)
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


def fingerprint(source: Source) -> str:
    """Identifies a model's content: its weights and what describes them (sidecar, or the IR's .xml)."""
    files = {"torch": [source.path, sidecar_path(source.path)], "onnx": [source.path],
             "openvino": [source.path, source.path.with_suffix(".bin")]}[source.kind]
    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()[:20]


def onnx_for(source: Source) -> Path:
    """The ONNX of a torch source (a detector's whole graph, NMS inside), exported once and cached by the weights'
    hash (exporting takes seconds)."""
    from .convert import detector_onnx, to_onnx

    path = cache_dir() / "onnx" / f"{source.path.stem}-{fingerprint(source)}.onnx"
    if not path.is_file():
        import onnx

        log.info("exporting %s to ONNX for onnxruntime/openvino (once; cached in %s)", source.path, path.parent)
        model = copy.deepcopy(source.model).to("cpu", memory_format=torch.contiguous_format)  # a runner may hold it
        proto = detector_onnx(model, source.info) if source.info.task == "detect" else \
            to_onnx(model, source.info, dynamic_batch=True)
        with atomic_path(path) as tmp:
            onnx.save(proto, tmp)
    return path

