"""A model as a graph for other engines: ONNX through `torch.onnx.export` (dynamo), OpenVINO IR from
that ONNX, and, for graphs that take raw pixels, the preprocessing as graph operations.

The preprocessing a graph carries is `eval_transform`'s, step for step: the shorter side resized to
`resize_size` by torchvision's size rule (antialiased), rounded to 8 bits as torchvision's uint8
resize does, centre-cropped with torchvision's rounding, scaled to [0, 1] and normalised. In ONNX
it is standard operators (Resize-18 with antialias; `exclude_outside` keeps the filter inside the
image, as PyTorch and PIL do). OpenVINO's CPU Interpolate ignores the antialias flag (a 37x53 ->
20x28 downscale came out up to 108 grey levels off PyTorch's), so in the IR the same resampling is
spelled out as a gather of each output pixel's filter taps, inside a PrePostProcessor step that also
does the type and layout conversion and the normalisation. Export checks both against PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..data.transforms import Preprocess
from .backends import openvino_core
from .record import OV_KEY, ModelInfo, onnx_props

DEFAULT_OPSET = 18  # the first with antialiased Resize
INPUT, OUTPUT, PIXELS = "input", "logits", "pixels"
MIN_SIDE = 32  # the smallest image side a segmenter's graph takes: one pixel at the backbone's output stride 32


class HalfPrecision(nn.Module):
    """fp16 weights and activations behind an fp32 interface: callers keep feeding float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def to_onnx(model: nn.Module, info: ModelInfo, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
            dtype: str = "fp32") -> Any:
    """The network as an ONNX ModelProto carrying `info` (with the preprocessing inside when
    `info.takes_pixels`): input `input` (float NCHW) or `pixels` (uint8 NHWC), output `logits`. A segmenter's
    graph takes images of any height and width (its logits come out at the input's size)."""
    pre = info.pre
    net = HalfPrecision(model) if dtype == "fp16" else model
    x, shapes = example_input(info, dynamic_batch)
    quiet = io.StringIO()  # the exporter prints its progress; what goes wrong is raised
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net.eval(), (x,), dynamo=True, opset_version=opset, input_names=[INPUT],
                                    output_names=[OUTPUT], dynamic_shapes=shapes, verbose=False)
    proto = program.model_proto
    if info.takes_pixels:
        proto = _with_pixels_input(proto, pre, opset, "batch" if dynamic_batch else 1)
    return _stamped(proto, info)


def detector_onnx(detector: nn.Module, info: ModelInfo, *, opset: int = DEFAULT_OPSET) -> Any:
    """A detector's graph (`DetectorGraph`: one float C x H x W image of any size in; boxes, labels, scores and
    masks out, a variable number of each, the resize, normalisation and NMS inside) as an ONNX ModelProto carrying
    `info`. Through the TorchScript exporter: the dynamo exporter does not trace torchvision's detectors (their
    shapes depend on the data), while torchvision writes ONNX symbolics for its NMS and RoIAlign and makes its
    resize traceable at any image size."""
    import onnx

    from ..models.detection import DetectorGraph

    graph = DetectorGraph(detector).eval()
    x = torch.rand(info.pre.in_chans, info.pre.img_size, info.pre.img_size + 32, generator=torch.Generator()
                   .manual_seed(0))
    buffer, quiet = io.BytesIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), \
            _nms_without_branch():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (x,), buffer, dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=graph.outputs, dynamic_axes={INPUT: [1, 2], **{n: [0] for n in graph.outputs}})
    return _stamped(onnx.load_from_string(buffer.getvalue()), info)


@contextlib.contextmanager
def _nms_without_branch() -> Iterator[None]:
    """torchvision's class-wise NMS, traced without its branch for no boxes: scripted for tracing, that branch
    becomes an ONNX If whose empty answer OpenVINO returned as one row of uninitialised memory (an FCOS with
    nothing above its threshold "found" a box of score 1e-19, or above the threshold). The same offsets by
    class, from the largest coordinate or 0: what torchvision computes whenever there are boxes."""
    from torchvision.ops import boxes as ops

    real = ops._batched_nms_coordinate_trick

    def offset_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
                   ) -> torch.Tensor:
        top = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
        return ops.nms(boxes + (idxs.to(boxes) * (top + 1))[:, None], scores, iou_threshold)

    ops._batched_nms_coordinate_trick = offset_nms
    try:
        yield
    finally:
        ops._batched_nms_coordinate_trick = real


def _stamped(proto: Any, info: ModelInfo) -> Any:
    """`proto` naming its maker and carrying `info`, checked."""
    import onnx

    proto.producer_name, proto.producer_version = "resforge", __version__
    proto.doc_string = f"{info.name}, {len(info.classes)} classes; preprocessing and classes in metadata_props"
    del proto.metadata_props[:]
    for key, value in onnx_props(info).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def example_input(info: ModelInfo, dynamic_batch: bool) -> tuple[torch.Tensor, tuple[dict[int, Any]] | None]:
    """What `torch.export` traces the network with, and which of its dimensions stay free: the batch when
    `dynamic_batch`; a segmenter's height and width always (its example is not square, or the exporter would tie
    one to the other)."""
    pre, dense = info.pre, info.task == "segment"
    x = torch.zeros(2 if dynamic_batch else 1, pre.in_chans, pre.img_size, pre.img_size + 32 * dense)
    dims = {0: torch.export.Dim("batch")} if dynamic_batch else {}
    if dense:
        dims.update({2: torch.export.Dim("height", min=MIN_SIDE), 3: torch.export.Dim("width", min=MIN_SIDE)})
    return x, ((dims,) if dims else None)


def _onnx_preprocessing(pre: Preprocess, opset: int, ir_version: int, batch: str | int = "batch") -> Any:
    """uint8 NHWC pixels of any size -> the normalised float NCHW input, in standard ONNX operators."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = [], []

    def const(name: str, value: Any, dtype: Any = np.int64) -> str:
        inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    c = pre.in_chans
    x = node("Transpose", [node("Cast", [PIXELS], "f", to=TensorProto.FLOAT)], "nchw", perm=[0, 3, 1, 2])
    shape = node("Shape", [x], "shape")
    h = node("Slice", [shape, const("i2", [2]), const("i3", [3])], "h")
    w = node("Slice", [shape, const("i3b", [3]), const("i4", [4])], "w")
    r, size = const("r", [pre.resize_size]), const("size", [pre.img_size])
    # torchvision: the shorter side becomes r, the longer int(r * long / short) (w <= h: w is the shorter)
    longer = node("Div", [node("Mul", [r, node("Max", [h, w], "long")], "rl"), node("Min", [h, w], "short")], "nl")
    w_short = node("LessOrEqual", [w, h], "w_short")
    new_h = node("Where", [w_short, longer, r], "new_h")
    new_w = node("Where", [w_short, r, longer], "new_w")
    if pre.interpolation == "nearest":
        zero, one, one_i = const("zero", 0.0, np.float32), const("one", 1.0, np.float32), const("one_i", [1])
    else:
        lo, hi = const("lo", 0.0, np.float32), const("hi", 255.0, np.float32)

    def resample(x: str, axis: int, n_in: str, n_out: str) -> str:
        """One axis, as PyTorch's uint8 resize does it (width first): resampled, rounded, clamped to 8 bits."""
        tag = "hw"[axis - 2]
        if pre.interpolation == "nearest":  # PyTorch's: floor(i * in / out) in float32, which Resize misses by one
            fl = {t: node("Cast", [n], f"{t}_{tag}", to=TensorProto.FLOAT) for t, n in (("nin", n_in), ("nout", n_out))}
            i = node("Range", [zero, node("Squeeze", [fl["nout"]], f"o_{tag}"), one], f"i_{tag}")
            scaled = node("Floor", [node("Mul", [i, node("Div", [fl["nin"], fl["nout"]], f"s_{tag}")], f"is_{tag}")],
                          f"fl_{tag}")
            idx = node("Min", [node("Cast", [scaled], f"ix_{tag}", to=TensorProto.INT64),
                               node("Sub", [n_in, one_i], f"last_{tag}")], f"idx_{tag}")
            return node("Gather", [x, idx], f"near_{tag}", axis=axis)
        mode = {"bilinear": "linear", "bicubic": "cubic"}[pre.interpolation]
        out = node("Resize", [x, "", "", n_out], f"resized_{tag}", mode=mode, axes=[axis], antialias=1,
                   exclude_outside=1, coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.5)
        return node("Clip", [node("Round", [out], f"round_{tag}"), lo, hi], f"u8_{tag}")

    pixels = resample(resample(x, 3, w, new_w), 2, h, new_h)

    two = const("two", [2.0], np.float32)

    def offset(new: str, tag: str) -> str:  # torchvision's centre crop: round((new - size) / 2), half to even
        margin = node("Cast", [node("Sub", [new, size], f"m_{tag}")], f"mf_{tag}", to=TensorProto.FLOAT)
        half = node("Round", [node("Div", [margin, two], f"half_{tag}")], f"rhalf_{tag}")
        return node("Cast", [half], f"off_{tag}", to=TensorProto.INT64)

    starts = node("Concat", [offset(new_h, "h"), offset(new_w, "w")], "starts", axis=0)
    ends = node("Add", [starts, size], "ends")
    crop = node("Slice", [pixels, starts, ends, const("axes", [2, 3])], "crop")
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    scaled = node("Mul", [crop, const("gain", (1 / (255 * std)).reshape(1, c, 1, 1), np.float32)], "scaled")
    node("Add", [scaled, const("bias", (-mean / std).reshape(1, c, 1, 1), np.float32)], "preprocessed")
    graph = helper.make_graph(
        nodes, "preprocessing",
        [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, [batch, "height", "width", c])],
        [helper.make_tensor_value_info("preprocessed", TensorProto.FLOAT, [batch, c, pre.img_size, pre.img_size])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _with_pixels_input(proto: Any, pre: Preprocess, opset: int, batch: str | int) -> Any:
    import onnx.compose

    pre_graph = _onnx_preprocessing(pre, opset, proto.ir_version, batch)
    merged = onnx.compose.merge_models(pre_graph, proto, io_map=[("preprocessed", INPUT)], prefix1="pre/")
    merged.graph.input[0].name = PIXELS  # the prefix renamed it; outside names stay plain
    for n in merged.graph.node:
        n.input[:] = [PIXELS if i == f"pre/{PIXELS}" else i for i in n.input]
    return merged


def to_openvino(onnx_proto: Any, info: ModelInfo) -> Any:
    """An OpenVINO model from the ONNX of the bare network (float NCHW input), with the preprocessing
    folded in by a PrePostProcessor when `info.takes_pixels`, and `info` in its rt_info."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(onnx_proto, path)
        model = openvino_core().read_model(str(path))
    if info.takes_pixels:
        model = _ov_preprocessing(model, info.pre)
    model.set_rt_info(info.to_json(), OV_KEY)
    return model


def _ov_preprocessing(model: Any, pre: Preprocess) -> Any:
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    batch = model.inputs[0].get_partial_shape()[0]  # fixed (1) unless exported with a dynamic batch
    ppp = PrePostProcessor(model)
    inp = ppp.input()
    inp.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_shape(
        ov.PartialShape([batch, -1, -1, pre.in_chans]))
    inp.model().set_layout(ov.Layout("NCHW"))
    steps = inp.preprocess().convert_element_type(ov.Type.f32)
    steps.custom(lambda x: _ov_resize_and_crop(x, pre))
    steps.mean([255 * m for m in pre.mean]).scale([255 * s for s in pre.std])
    model = ppp.build()
    model.inputs[0].get_tensor().set_names({PIXELS})
    return model


def _ov_resize_and_crop(x: Any, pre: Preprocess) -> Any:
    """NHWC float pixels -> the shorter side resized to `resize_size`, rounded to 8 bits, centre-cropped."""
    import openvino.opset13 as ops

    def i64(v: Any) -> Any:
        return ops.constant(np.asarray(v, np.int64))

    shape = ops.shape_of(x, "i64")
    h, w = ops.gather(shape, i64([1]), i64(0)), ops.gather(shape, i64([2]), i64(0))
    r, size = i64([pre.resize_size]), i64([pre.img_size])
    longer = ops.divide(ops.multiply(r, ops.maximum(h, w)), ops.minimum(h, w))  # i64: floor division
    w_short = ops.less_equal(w, h)
    new_h, new_w = ops.select(w_short, longer, r), ops.select(w_short, r, longer)
    for axis, n_in, n_out in ((2, w, new_w), (1, h, new_h)):  # as PyTorch's uint8 resize: width first, 8-bit between
        x = ops.clamp(ops.round(_ov_resample(x, axis, n_in, n_out, pre.interpolation), "half_to_even"), 0.0, 255.0)

    def offset(new: Any) -> Any:
        margin = ops.convert(ops.subtract(new, size), "f32")
        return ops.convert(ops.round(ops.divide(margin, np.float32(2)), "half_to_even"), "i64")

    starts = ops.concat([offset(new_h), offset(new_w)], 0)
    return ops.slice(x, starts, ops.add(starts, size), i64([1, 1]), i64([1, 2])).output(0)


def _ov_resample(x: Any, axis: int, n_in: Any, n_out: Any, interpolation: str) -> Any:
    """PyTorch's antialiased resampling along one axis: each output pixel a normalised weighted sum of
    its filter's taps (the filter stretched by the downscale factor), as gathers and a sum."""
    import openvino.opset13 as ops

    f32 = np.float32
    scalar = ops.squeeze(n_out, ops.constant(np.int64(0)))
    in_f, out_f = ops.convert(n_in, "f32"), ops.convert(n_out, "f32")
    scale = ops.divide(in_f, out_f)  # [1]
    i = ops.range(ops.constant(f32(0)), ops.convert(scalar, "f32"), ops.constant(f32(1)), "f32")  # [out]
    last = ops.subtract(in_f, f32(1))
    if interpolation == "nearest":  # PyTorch's nearest: floor(i * scale), no filter
        idx = ops.convert(ops.minimum(ops.floor(ops.multiply(i, scale)), last), "i64")
        return ops.gather(x, idx, ops.constant(np.int64(axis)))
    half_width = 1.0 if interpolation == "bilinear" else 2.0
    stretch = ops.maximum(scale, f32(1))
    support = ops.multiply(stretch, f32(half_width))
    taps = ops.add(ops.multiply(ops.ceiling(support), f32(2)), f32(1))  # [1]: the most taps an output uses
    j = ops.range(ops.constant(f32(0)), ops.squeeze(taps, ops.constant(np.int64(0))), ops.constant(f32(1)), "f32")
    center = ops.multiply(ops.add(i, f32(0.5)), scale)
    lo = ops.maximum(ops.floor(ops.add(ops.subtract(center, support), f32(0.5))), f32(0))
    hi = ops.minimum(ops.floor(ops.add(ops.add(center, support), f32(0.5))), in_f)
    column = ops.constant(np.asarray([-1, 1], np.int64))
    pos = ops.add(ops.reshape(lo, column, False), j)  # [out, taps]
    t = ops.abs(ops.divide(ops.add(ops.subtract(pos, ops.reshape(center, column, False)), f32(0.5)), stretch))
    if interpolation == "bilinear":
        weight = ops.relu(ops.subtract(f32(1), t))
    else:  # Keys' cubic with a = -0.5, PyTorch's (and PIL's) antialiased bicubic
        a = f32(-0.5)
        near = ops.add(ops.multiply(ops.subtract(ops.multiply(f32(a + 2), t), f32(a + 3)), ops.multiply(t, t)), f32(1))
        far = ops.multiply(ops.subtract(ops.multiply(ops.add(ops.multiply(ops.subtract(t, f32(5)), t), f32(8)), t),
                                        f32(4)), a)
        weight = ops.select(ops.less(t, f32(1)), near, ops.select(ops.less(t, f32(2)), far, f32(0)))
    inside = ops.convert(ops.less(pos, ops.reshape(hi, column, False)), "f32")
    weight = ops.multiply(weight, inside)
    weight = ops.divide(weight, ops.reduce_sum(weight, ops.constant(np.int64(1)), True))
    idx = ops.convert(ops.minimum(pos, last), "i64")
    taken = ops.gather(x, idx, ops.constant(np.int64(axis)))  # [..., out, taps, ...]
    trailing = 3 - axis  # the axes after the filtered one in NHWC: W and C for H, C for W
    weight = ops.reshape(weight, ops.constant(np.asarray([0, 0] + [1] * trailing, np.int64)), True)
    return ops.reduce_sum(ops.multiply(taken, weight), ops.constant(np.int64(axis + 1)), False)


def move_into_place(written: Path, path: Path, format: str) -> None:
    """On disk first (fsync), then renamed: the weights before the .xml that names them."""
    files = [written.with_suffix(".bin"), written] if format == "openvino" else [written]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for f in files:
        os.replace(f, path.with_suffix(f.suffix))
