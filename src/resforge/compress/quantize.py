"""int8 post-training quantisation: a model file with int8 weights and activations, calibrated on the
run's own training images with exactly the evaluation preprocessing.

Two engines, each with the quantiser made for it:
  - onnxruntime: `quantize_static`, QDQ format, per-channel symmetric int8 weights. The activation
    type is measured, not assumed: on CPUs with VNNI, u8 activations (U8S8) run about 3x faster than
    ORT's current default s8 (S8S8), which can be no faster than fp32. `activations="auto"` quantises
    both and keeps the faster here.
  - openvino: NNCF's `nncf.quantize` on the IR (its own range estimation and bias correction).

The result carries the model record (classes, preprocessing, and under `export.quantized` how it
was made and what it scored against fp32 on the validation split), so `Predictor`, `eval` and
`bench` take it like any export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..data.folder import load_image
from ..data.loader import decode_image, pil_to_tensor
from ..data.masks import MaskSample
from ..data.transforms import eval_transform
from ..runtime.backends import openvino_core, require_backend
from ..runtime.convert import DEFAULT_OPSET, INPUT, move_into_place, to_onnx, to_openvino
from ..runtime.record import OV_KEY, ModelInfo, onnx_props
from ..models import transforms
from ..runtime.build import build_runner
from ..runtime.inference import infer
from ..runtime.predictor import Predictor
from ..runtime.source import Source, open_source
from ..errors import ConfigError
from ..io import temp_dir
from ..tasks.segment_infer import LoadedSegmenter, compare_segmenters, validation_masks
from ..timing import per_second, timed_calls
from . import qat

log = logging.getLogger("resforge")

BACKENDS = ("onnxruntime", "openvino")
METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("auto", "u8", "s8")
SUFFIX = {"onnxruntime": ".onnx", "openvino": ".xml"}
TIMING_SECONDS = 1.0  # per candidate, to choose the activation type
SENSITIVITY_IMAGES = 8  # validation images whose activations rank the layers for --max-drop
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "FakeQuantize", "ConvInteger"}


@dataclass
class Quantized:
    path: Path
    backend: str
    activations: str  # u8 | s8 (onnxruntime) or "nncf" (openvino)
    calib: int  # calibration images
    fp32_score: float  # on the validation split, the fp32 graph on the same engine: top-1, or a segmenter's mIoU
    int8_score: float
    agreement: float  # share of validation images (a segmenter's: pixels) given the fp32 graph's class
    images: int  # validation images
    timings: dict[str, float] = field(default_factory=dict)  # activation type -> img/s at batch 1, when measured
    kept_fp32: list[str] = field(default_factory=list)  # layers left in higher precision for --max-drop
    metric: str = "top-1"  # or mIoU (segmenters), AP50 (detectors)

    @property
    def drop(self) -> float:
        """The metric lost, in points."""
        return 100 * (self.fp32_score - self.int8_score)

    def line(self) -> str:
        what = {"top-1": "top-1", "mIoU": "pixel", "AP50": "detection"}[self.metric]
        return (f"int8 ({self.backend}, {self.activations} activations, {self.calib} calibration images): "
                f"{self.metric} {self.int8_score:.2%} against fp32 {self.fp32_score:.2%} ({self.drop:+.2f} pt lost) "
                f"on {self.images} validation images; {what} agreement {self.agreement:.2%}"
                + (f"; in float: {', '.join(self.kept_fp32)}" if self.metric == "AP50" else
                   f"; {len(self.kept_fp32)} layer(s) kept in higher precision" if self.kept_fp32 else ""))


def quantize(source: str | os.PathLike, backend: str = "onnxruntime", out: str | os.PathLike | None = None, *,
             calib: int, method: str = "minmax", activations: str = "auto",
             images: str | os.PathLike | None = None, max_drop: float | None = None,
             baseline: str | os.PathLike | None = None) -> Quantized:
    """Quantise a run's model (or a .safetensors with its sidecar) to an int8 ONNX or OpenVINO IR file.

    `calib` images of the run's training split (or of `images`) calibrate the activation ranges;
    the run's validation split measures what the int8 file loses against fp32 (the fp32 graph of
    `baseline`, default `source`). `max_drop` (points of top-1, a segmenter's of mIoU, a detector's of AP@.5)
    leaves the most sensitive layers (a detector's pyramid) in fp32 until the loss is within it. A model trained for int8 (`resforge quantize --qat`) keeps the
    activation scales it learned.
    """
    _check_options(backend, calib, method, activations, max_drop)
    src = open_source(source)
    if src.kind != "torch":
        if _is_quantized(src):
            raise ConfigError(f"{source} is already quantised: quantise the run it came from")
        raise ConfigError(f"{source} is an exported {src.kind} file: quantise from the run directory or its "
                          ".safetensors (which calibrate on the run's own images)")
    path = Path(out) if out else src.path.with_name(f"{src.path.stem}-int8{SUFFIX[backend]}")
    if path.suffix.lower() != SUFFIX[backend]:
        raise ConfigError(f"{backend} int8 models are {SUFFIX[backend]} files, got {path}")
    net, learned = src.model, None
    if transforms.has(src.model, "fakequant"):
        if backend != "onnxruntime" or activations == "s8":
            raise ConfigError(f"{source} was trained for int8 with uint8 activations, whose learned scales "
                              "onnxruntime's quantiser takes: quantise it with --backend onnxruntime (u8)")
        net, learned = qat.plain(src.model)
        activations = "u8"
    if src.info.task == "detect":
        from .quantize_detector import quantize_detector  # it builds on this module's record and figures

        return quantize_detector(src, backend, path, images, calib, max_drop,
                                 default_ranges=method == "minmax" and activations == "auto" and baseline is None)
    calib_files = _calibration_files(src, images, calib)
    val = validation_masks(src.info, src.path) if src.info.task == "segment" else \
        src.info.recorded_samples(src.path, "val")
    if not val:
        raise ConfigError(f"no validation images of {src.path}'s run were found (its split.csv or data folder moved) "
                          "to measure the int8 model on")
    info = src.info.with_export(format="onnx" if backend == "onnxruntime" else "openvino", dtype="int8",
                                opset=DEFAULT_OPSET, dynamic_batch=True, resforge=__version__, torch=torch.__version__)
    batch = network_inputs(info, calib_files)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(path.parent, "quantize") as tmp:
        fp32 = tmp / "fp32.onnx"
        import onnx

        fp32_info = replace(info, export={**info.export, "dtype": "fp32"})
        proto = to_onnx(net, fp32_info, dynamic_batch=True)
        onnx.save(proto, str(fp32))
        raw, written = tmp / f"raw{SUFFIX[backend]}", tmp / path.name
        reference = fp32
        if baseline is not None:
            reference = tmp / "baseline.onnx"
            onnx.save(to_onnx(open_source(baseline).model, fp32_info, dynamic_batch=True), str(reference))
        measure = partial(_measure, Source("onnx", reference, info), backend, info=info, val=val)
        kept: list[str] = []
        if backend == "onnxruntime":
            fixed = qat.overrides(proto, net, learned, INPUT, torch.from_numpy(batch[:1])) if learned else {}
            chosen, timings = _quantize_ort(fp32, raw, batch, method, activations, tmp, fixed)
            result = measure(raw)
            if max_drop is not None and result.drop > max_drop:
                spread = val[::max(1, len(val) // SENSITIVITY_IMAGES)][:SENSITIVITY_IMAGES]
                probe = network_inputs(info, [v.path if isinstance(v, MaskSample) else v[0] for v in spread])
                kept, result = _restore_ort(tmp, raw, batch, probe, method, chosen, fixed, measure, max_drop)
        else:
            chosen, timings = "nncf", {}
            kept = _quantize_openvino(proto, info, raw, batch, val if max_drop is not None else None, max_drop)
            result = measure(raw)
        result = replace(result, path=path, activations=chosen, calib=len(calib_files), timings=timings,
                         kept_fp32=kept)
        key = "top1" if result.metric == "top-1" else "miou"
        record = info.with_export(quantized={"backend": backend, "activations": chosen, "method": method,
                                             "calibration_images": len(calib_files), f"fp32_{key}": result.fp32_score,
                                             f"int8_{key}": result.int8_score, "agreement": result.agreement,
                                             "validation_images": result.images, "img_per_s_batch1": timings,
                                             **({"learned_scales": len(learned), "baseline": str(baseline)}
                                                if learned else {}),
                                             **({"max_drop": max_drop, "kept_fp32": kept}
                                                if max_drop is not None else {})})
        _write_record(raw, written, backend, record)
        move_into_place(written, path, "onnx" if backend == "onnxruntime" else "openvino")
    log.info("%s", result.line())
    log.info("wrote %s", path)
    return result


def check_calibration(source: str | os.PathLike, backend: str, calib: int, method: str, activations: str,
                      images: str | os.PathLike | None, max_drop: float | None = None) -> None:
    """What `quantize` would refuse about its options and calibration set, asked before a fine-tune."""
    _check_options(backend, calib, method, activations, max_drop)
    src = open_source(source)
    if src.kind != "torch":
        raise ConfigError(f"{source} is an exported {src.kind} file: train for int8 from the run directory or its "
                          ".safetensors")
    if src.info.task == "detect":
        from .quantize_detector import check_detector_calibration

        check_detector_calibration(src, images, calib)
        return
    _calibration_files(src, images, calib)


def _check_options(backend: str, calib: int, method: str, activations: str, max_drop: float | None) -> None:
    if max_drop is not None and not max_drop >= 0:
        raise ConfigError(f"--max-drop is the points (of top-1, mIoU or AP@.5) int8 may lose and cannot be negative, got "
                          f"{max_drop:g}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if activations not in ACTIVATIONS:
        raise ConfigError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    if isinstance(calib, bool) or not isinstance(calib, int) or calib < 1:
        raise ConfigError(f"--calib must be a positive number of images, got {calib!r}")
    if backend == "openvino":
        require_backend("openvino")
        if method != "minmax" or activations != "auto":
            raise ConfigError("--method and --activations choose onnxruntime's calibration; NNCF (openvino) "
                              "estimates its own ranges and types")


def _is_quantized(src: Source) -> bool:
    if src.info.export.get("quantized"):
        return True
    if src.kind == "onnx":
        import onnx

        graph = onnx.load(str(src.path), load_external_data=False).graph
        return any(n.op_type in QUANTIZED_OPS for n in graph.node)
    model = openvino_core().read_model(str(src.path))
    return any(op.get_type_name() in QUANTIZED_OPS for op in model.get_ops())


def _calibration_files(src: Source, images: str | os.PathLike | None, calib: int) -> list[str]:
    """`calib` files spread evenly over the run's training split (sorted by class, so every class is in)."""
    if images is not None:
        from ..data.folder import scan_images

        files, where = sorted(scan_images([images])), f"{images}"
    else:
        files = [f for f, _ in src.info.recorded_samples(src.path, "train")]
        where = f"the training split of {src.path}'s run"
        if not files:
            raise ConfigError(f"no training images of {src.path}'s run were found (its split.csv or data folder "
                              "moved) to calibrate on: give a folder of images with --images DIR")
    if len(files) < calib:
        raise ConfigError(f"the calibration set ({where}) has {len(files)} image(s), fewer than the {calib} asked: "
                          "lower --calib or give more images")
    step = len(files) / calib
    return [files[int(i * step)] for i in range(calib)]


def network_inputs(info: ModelInfo, files: Sequence[str]) -> np.ndarray:
    """The network's inputs for `files`, as inference prepares them (to calibrate and probe on): a classifier's
    evaluation transform; a segmenter's square input at its trained scale (`LoadedSegmenter.network_input`)."""
    if info.task == "segment":  # decoded whole, as predict decodes (a window is cut at full resolution)
        prepare = LoadedSegmenter.from_info(lambda x: x, info).network_input
        return np.stack([prepare(pil_to_tensor(load_image(f, info.pre.mode))).numpy() for f in files])
    prepare = eval_transform(info.pre)
    return np.stack([prepare(decode_image(f, info.pre)).numpy() for f in files])


def _quantize_ort(fp32: Path, out: Path, batch: np.ndarray, method: str, activations: str, tmp: Path,
                  fixed: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """QDQ with per-channel int8 weights; both activation types when `auto`, the faster kept. `fixed`:
    the scales of some tensors, given rather than calibrated."""
    from onnxruntime.quantization import quant_pre_process

    prepared = tmp / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    candidates = ["u8", "s8"] if activations == "auto" else [activations]
    files = {}
    for kind in candidates:
        files[kind] = tmp / f"int8-{kind}.onnx"
        _ort_static(prepared, files[kind], batch, method, kind, fixed)
    timings = {}
    if len(candidates) > 1:
        timings = {kind: _images_per_second(files[kind], batch[:1]) for kind in candidates}
        log.info("int8 activations measured here at batch 1: %s", ", ".join(f"{k} {v:.1f} img/s"
                                                                         for k, v in timings.items()))
    chosen = max(timings, key=timings.get) if timings else candidates[0]
    os.replace(files[chosen], out)
    return chosen, timings


def _reader(batch: np.ndarray) -> Any:
    """onnxruntime's calibration reader over the images of `batch`, one at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{INPUT: batch[i:i + 1]} for i in range(len(batch))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)
    return Reader()


def _ort_static(prepared: Path, out: Path, batch: np.ndarray, method: str, kind: str, fixed: dict[str, Any],
                exclude: Sequence[str] = ()) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    # its histogram calibrators print their progress ("Collecting tensor data ...") on stdout, which is ours
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(prepared), str(out), _reader(batch), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8 if kind == "u8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=calibrate, nodes_to_exclude=list(exclude),
                        extra_options={"TensorQuantOverrides": fixed} if fixed else None)


def _restore_ort(tmp: Path, raw: Path, batch: np.ndarray, probe: np.ndarray, method: str, kind: str,
                 fixed: dict[str, Any], measure: Callable[[Path], Quantized], max_drop: float
                 ) -> tuple[list[str], Quantized]:
    """Quantise again with the noisiest nodes on the validation images `probe` left in fp32, twice as
    many each time, until the metric lost is within `max_drop` (so at most twice the fewest that would
    do, by that ranking); the file at `raw` is the last."""
    order = _noisiest_nodes(tmp / "prepared.onnx", raw, probe, tmp)
    k = 1
    while True:
        kept = order[:k]
        _ort_static(tmp / "prepared.onnx", raw, batch, method, kind, fixed, kept)
        result = measure(raw)
        log.info("%d of %d quantised nodes kept in fp32: %.2f pt of %s lost", k, len(order), result.drop,
                 result.metric)
        if result.drop <= max_drop:
            return kept, result
        if k == len(order):
            raise ConfigError(f"with all {k} quantised nodes in fp32 the int8 file still loses {result.drop:.2f} pt, "
                              f"more than the {max_drop:g} asked")
        k = min(2 * k, len(order))


def _noisiest_nodes(prepared: Path, qdq: Path, batch: np.ndarray, tmp: Path) -> list[str]:
    """The quantised nodes, noisiest first: the quantisation noise power of their int8 inputs (activations
    on `batch`, and weights) relative to the signal, by onnxruntime's QDQ debugging tools."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         compute_weight_error, create_activation_matching,
                                                         create_weight_matching,
                                                         modify_model_output_intermediate_tensors)

    activations = {}
    for kind, model in (("float", prepared), ("int8", qdq)):
        augmented = tmp / f"augmented-{kind}.onnx"
        modify_model_output_intermediate_tensors(str(model), str(augmented))
        activations[kind] = collect_activations(str(augmented), _reader(batch))
    matched = create_activation_matching(activations["int8"], activations["float"])
    noise_db = {name: e["qdq_err"] for name, e in compute_activation_error(matched).items()}
    noise_db.update(compute_weight_error(create_weight_matching(str(prepared), str(qdq))))
    noise = {}
    for node in onnx.load(str(prepared)).graph.node:  # the float graph's node names are the int8 graph's
        terms = [noise_db[t] for t in node.input if t in noise_db]
        if terms:
            noise[node.name] = sum(10 ** (-db / 10) for db in terms)
    return sorted(noise, key=noise.get, reverse=True)


def _images_per_second(path: Path, x: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return per_second(len(x), timed_calls(lambda: session.run(None, {INPUT: x}), TIMING_SECONDS, warmup=3))


def _quantize_openvino(proto: Any, info: ModelInfo, out: Path, batch: np.ndarray,
                       val: list[tuple[str, int]] | None = None, max_drop: float | None = None) -> list[str]:
    """NNCF's post-training quantisation of the IR (the performance preset: symmetric activations); with
    `max_drop`, NNCF's accuracy control, which returns layers to fp32 until top-1 (mIoU) on `val` is within it.
    Returns the layers it left in fp32."""
    import nncf
    import openvino as ov

    if max_drop is not None:
        # NNCF's accuracy control compiles models on OpenVINO Cores of its own; after it, this
        # process's next OpenVINO model crashed (a segfault): it runs in a process of its own.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_accuracy_controlled, proto, info, out, batch, val or [], max_drop).result()
    model = to_openvino(proto, replace(info, input="tensor"))
    dataset = nncf.Dataset([batch[i:i + 1] for i in range(len(batch))])
    quantized = nncf.quantize(model, dataset, subset_size=len(batch), preset=nncf.QuantizationPreset.PERFORMANCE)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return []


def _accuracy_controlled(proto: Any, info: ModelInfo, out: Path, batch: np.ndarray, val: list[tuple[str, int]],
                         max_drop: float) -> list[str]:
    """NNCF's quantisation with accuracy control (in a process of its own); the layers it left in fp32."""
    import nncf
    import openvino as ov

    model = to_openvino(proto, replace(info, input="tensor"))
    dataset = nncf.Dataset([batch[i:i + 1] for i in range(len(batch))])
    transform = eval_transform(info.pre)

    def top1(compiled: Any, items: Iterable[tuple[str, int]]) -> tuple[float, list[float]]:
        hits = [float(np.argmax(compiled(transform(decode_image(f, info.pre)).numpy()[None])[0]) == label)
                for f, label in items]
        return float(np.mean(hits)), hits

    def miou(compiled: Any, items: Iterable[MaskSample]) -> float:
        loaded = LoadedSegmenter.from_info(lambda x: torch.from_numpy(compiled(x.numpy())[0]), info)
        return compare_segmenters(loaded, loaded, list(items))[0]

    metric = miou if info.task == "segment" else top1
    quantized = nncf.quantize_with_accuracy_control(model, dataset, nncf.Dataset(val), metric,
                                                    max_drop=max_drop / 100, drop_type=nncf.DropType.ABSOLUTE,
                                                    subset_size=len(batch),
                                                    preset=nncf.QuantizationPreset.PERFORMANCE)
    fp32_ops = {op.get_friendly_name() for op in quantized.get_ops() if op.get_type_name() == "Convolution"
                and not any(i.get_source_output().get_node().get_type_name() == "FakeQuantize"
                            for i in op.inputs())}
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return sorted(fp32_ops)


def _write_record(raw: Path, out: Path, backend: str, info: ModelInfo) -> None:
    """`raw` with the record in it, as `out` (another file: OpenVINO maps the weights it reads)."""
    if backend == "onnxruntime":
        import onnx

        proto = onnx.load(str(raw))
        del proto.metadata_props[:]
        for key, value in onnx_props(info).items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(out))
        return
    import openvino as ov

    model = openvino_core().read_model(str(raw))
    model.set_rt_info(info.to_json(), OV_KEY)
    ov.save_model(model, str(out), compress_to_fp16=False)


def _measure(fp32: Source, backend: str, written: Path, *, info: ModelInfo, val: list) -> Quantized:
    """Top-1 (a segmenter's mIoU) of the fp32 graph and of the int8 file, on the same engine and the same
    validation images."""
    kind = "onnx" if backend == "onnxruntime" else "openvino"
    precision = "auto" if backend == "onnxruntime" else "fp32"  # ORT: the file's own; OpenVINO: no bf16 hint
    run32 = build_runner(fp32, backend, torch.device("cpu"), precision)
    run8 = build_runner(Source(kind, written, info), backend, torch.device("cpu"), precision)
    if info.task == "segment":
        s32, s8, agreement = compare_segmenters(LoadedSegmenter.from_info(run32, info),
                                                LoadedSegmenter.from_info(run8, info), val)
        return Quantized(path=written, backend=backend, activations="", calib=0, fp32_score=s32, int8_score=s8,
                         agreement=agreement, images=len(val), metric="mIoU")
    # one pass over the images, both graphs on each batch: their logits side by side
    batches = Predictor(run32, info, str(fp32.path)).loader(val, 32)
    logits, labels = infer(lambda x: torch.cat([run32(x), run8(x)], 1), batches)
    p32, p8 = logits.chunk(2, dim=1)
    p32, p8 = p32.argmax(1), p8.argmax(1)
    return Quantized(path=written, backend=backend, activations="", calib=0,
                     fp32_score=float((p32 == labels).float().mean()), int8_score=float((p8 == labels).float().mean()),
                     agreement=float((p32 == p8).float().mean()), images=len(val))
