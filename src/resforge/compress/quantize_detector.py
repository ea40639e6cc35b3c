"""int8 detectors: NNCF's post-training quantisation of the OpenVINO graph `export` writes (resize, NMS and mask
pasting inside), calibrated on the run's training images as the graph takes them (whole images: it resizes
them itself), measured in AP@.5 against the fp32 graph on the run's validation split.

What is left in floating point was found by measurement: quantised whole, a detector's box regression snaps
its coordinates to the int8 grid (a tiny Faster R-CNN's boxes moved by 0.3 px steps and its detections
reordered), the head collapse its users report. So the layers that give scores and box offsets (the box
predictor, the RPN head, RetinaNet's and FCOS's heads), the mask head and the post-processing stay in
float; the backbone, the pyramid and Faster R-CNN's box head (two fully connected layers over every
proposal, as much work as an R50 backbone at 400 px) go int8: on the trees benchmark that took batch-1
latency from 139 to 91 ms at the same AP@.5. With `max_drop`, the box head and then the pyramid return to
float while the loss is over it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..data.annotations import DetectionScan, Objects, read_recorded_split
from ..data.folder import load_image
from ..data.loader import pil_to_tensor
from ..data.tiles import Window, tile_grid
from ..errors import ConfigError
from ..io import temp_dir
from ..runtime.backends import OpenVinoRunner, openvino_core
from ..runtime.convert import DEFAULT_OPSET, detector_onnx, move_into_place, to_openvino
from ..runtime.record import ModelInfo
from ..runtime.source import Source
from ..tasks.detect_infer import ExportedDetector, LoadedDetector, detection_figures
from ..timing import per_second, timed_calls
from .quantize import Quantized, _write_record

log = logging.getLogger("resforge")

# node names of the TorchScript export, by what is left in float: the heads' last layers, the RPN, the mask head,
# one-stage heads and post-processing always; the box head's fully connected layers, then the pyramid, too when
# --max-drop asks for it
HEADS = r".*/(rpn|head|transform|box_predictor)/.*|.*/roi_heads/(?!box_head/).*"
BOX_HEAD, PYRAMID = r".*/roi_heads/box_head/.*", r".*/backbone/fpn/.*"
LEVELS = [{"heads and post-processing": HEADS},
          {"heads and post-processing": HEADS, "box head": BOX_HEAD},
          {"heads and post-processing": HEADS, "box head": BOX_HEAD, "feature pyramid": PYRAMID}]
MATCH_IOU, CONFIDENT = 0.5, 0.5  # agreement: an fp32 detection this sure, found again by int8 this close


def quantize_detector(src: Source, backend: str, path: Path, images: str | os.PathLike | None, calib: int,
                      max_drop: float | None, default_ranges: bool = True) -> Quantized:
    """`src` (a detector run) as an int8 OpenVINO IR at `path`, calibrated on `calib` of the inputs its graph gets
    from the run's training images (or the files of `images`); see the module. `default_ranges`: no range method,
    activation type or baseline was asked for, which NNCF on the detector's own graph does not take."""
    import openvino as ov

    if not default_ranges:
        raise ConfigError("a detector's int8 is NNCF's, with its own ranges and activations, measured against its "
                          "own fp32 graph: drop --method, --activations and --baseline")
    if backend != "openvino":
        raise ConfigError("a detector quantises with NNCF on its OpenVINO graph (--backend openvino): onnxruntime's "
                          "quantiser calibrates a network, not a graph with its resize and NMS inside")
    scan = _recorded_scan(src)
    info = src.info.with_export(format="openvino", dtype="int8", opset=DEFAULT_OPSET, dynamic_batch=False,
                                resforge=__version__, torch=torch.__version__)
    inputs = _calibration_inputs(_calibration_windows(src, scan, images, calib), info)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(path.parent, "quantize") as tmp:
        fp32 = tmp / "fp32.xml"  # NNCF reads the graph as saved (in memory, it missed nodes of the If bodies)
        ov.save_model(to_openvino(detector_onnx(src.model, replace(info, export={**info.export, "dtype": "fp32"})),
                                  info), str(fp32), compress_to_fp16=False)
        kept, result = [], None
        for level, ignored in enumerate(LEVELS):
            raw = tmp / f"raw{level}.xml"
            _nncf(fp32, inputs, list(ignored.values()), raw)
            kept = list(ignored)
            result = _measure(fp32, raw, info, scan.val)
            if max_drop is None or result.drop <= max_drop:
                break
        else:
            raise ConfigError(f"int8 loses {result.drop:.2f} points of AP@.5 even with only the backbone in int8 "
                              f"(at most {max_drop:g} asked): {path} was not written; keep the fp32 export")
        result = replace(result, path=path, calib=len(inputs), kept_fp32=kept)
        record = info.with_export(quantized={
            "backend": backend, "activations": "nncf", "calibration_images": len(inputs),
            "fp32_map50": result.fp32_score, "int8_map50": result.int8_score, "agreement": result.agreement,
            "validation_images": result.images, "img_per_s_batch1": result.timings, "kept_fp32": kept,
            **({"max_drop": max_drop} if max_drop is not None else {})})
        written = tmp / path.name
        _write_record(raw, written, backend, record)
        move_into_place(written, path, "openvino")
    log.info("%s", result.line())
    log.info("wrote %s", path)
    return result


def _recorded_scan(src: Source) -> DetectionScan:
    """The run's folder split as it recorded it: training images to calibrate on, validation ones to measure."""
    data, split_csv = src.info.trained.get("data"), src.info.recorded_split(src.path)
    scan = read_recorded_split(data, split_csv) if data and split_csv is not None and Path(data).is_dir() else None
    if scan is None or not scan.val:
        raise ConfigError(f"no validation images of {src.path}'s run were found (its split.csv or data folder moved) "
                          "to measure the int8 detector on")
    if scan.classes != src.info.classes:
        raise ConfigError(f"{data} now names other classes than the run recorded: quantise from a folder as it was")
    return scan


def check_detector_calibration(src: Source, images: str | os.PathLike | None, calib: int) -> None:
    """What `quantize_detector` would refuse about its calibration set, asked before anything is spent."""
    _calibration_windows(src, _recorded_scan(src), images, calib)


def _calibration_windows(src: Source, scan: DetectionScan, images: str | os.PathLike | None, calib: int
                         ) -> list[tuple[str, Window | None]]:
    """`calib` of the (file, window: None for the whole image) the graph gets from the run's training images (or
    the files of `images`), spread evenly: each image whole, and for a detector run on tiles each of its tiles
    too (sliced inference calls the graph on both)."""
    if images is not None:
        from ..data.folder import scan_images

        sized = [(f, load_image(f, src.info.pre.mode).size) for f in scan_images([images])]
    else:
        sized = [(o.path, (o.width, o.height)) for o in scan.train]
    tile = src.info.task_record.get("tile")
    inputs: list[tuple[str, Window | None]] = []
    for f, (width, height) in sized:
        inputs.append((f, None))
        if tile:
            inputs += [(f, w) for w in tile_grid(width, height, tile["size"], tile["overlap"])]
    if len(inputs) < calib:
        raise ConfigError(f"the calibration images give the detector's graph {len(inputs)} input(s), fewer than the "
                          f"{calib} asked: lower --calib or give more images")
    return [inputs[int(i * len(inputs) / calib)] for i in range(calib)]


def _calibration_inputs(chosen: list[tuple[str, Window | None]], info: ModelInfo) -> list[np.ndarray]:
    """The graph's inputs of the (file, window) `chosen`, each file decoded once."""
    decoded = {f: _image(f, info.pre.mode) for f in dict.fromkeys(f for f, _ in chosen)}
    return [decoded[f] if w is None else decoded[f][:, w[1]:w[3], w[0]:w[2]].copy() for f, w in chosen]


def _image(path: str, mode: str) -> np.ndarray:
    """A file as the detector's graph takes it: float C x H x W, 0-1, at its own size."""
    return pil_to_tensor(load_image(path, mode)).float().numpy() / 255


def _nncf(fp32: Path, images: list[np.ndarray], ignored: list[str], out: Path) -> None:
    import nncf
    import openvino as ov

    quantized = nncf.quantize(openvino_core().read_model(str(fp32)), nncf.Dataset(images), subset_size=len(images),
                              preset=nncf.QuantizationPreset.MIXED,
                              ignored_scope=nncf.IgnoredScope(patterns=ignored, validate=False))
    ov.save_model(quantized, str(out), compress_to_fp16=False)


def _measure(fp32: Path, int8: Path, info: ModelInfo, val: list[Objects]) -> Quantized:
    """AP@.5 of both graphs on `val`, the share of fp32's confident detections int8 finds again, and each
    graph's images per second at batch 1 on the first validation image."""
    from torchvision.ops import box_iou

    cpu, tile = torch.device("cpu"), info.task_record.get("tile")
    loaded = {name: LoadedDetector(ExportedDetector(OpenVinoRunner(model, cpu, "fp32"), info.name), info.classes,
                                   tile) for name, model in (("fp32", fp32), ("int8", int8))}
    (m32, p32, _), (m8, p8, _) = (detection_figures(loaded[k], val, batch_size=1) for k in ("fp32", "int8"))
    found = total = 0
    for a, b in zip(p32, p8):
        sure = a["scores"] >= CONFIDENT
        near = (box_iou(a["boxes"][sure], b["boxes"]) >= MATCH_IOU) & (a["labels"][sure][:, None] == b["labels"])
        found, total = found + int(near.any(1).sum()), total + int(sure.sum())
    x = torch.from_numpy(_image(val[0].path, info.pre.mode))
    timings = {k: per_second(1, timed_calls(lambda d=d: d.detect([x]), 1.0, warmup=2)) for k, d in loaded.items()}
    return Quantized(path=int8, backend="openvino", activations="nncf", calib=0, fp32_score=m32["map50"],
                     int8_score=m8["map50"], agreement=found / total if total else 1.0, images=len(val),
                     timings=timings, metric="AP50")
