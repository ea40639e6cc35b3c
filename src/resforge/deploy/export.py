"""`resforge export`: a trained model as a file for another engine, checked against PyTorch before it is kept.

Formats: ONNX, OpenVINO IR (.xml + .bin) and a `torch.export` program (.pt2). Each file carries the
model's record (classes, preprocessing, architecture, metrics, versions: `runtime.record.ModelInfo`), so
`Predictor.load` needs nothing else for an ONNX file or an IR (a .pt2 is for PyTorch programs:
`read_pt2_info` gives its record). With `embed_preprocessing` the graph takes uint8 NHWC pixels
of any size and resizes, crops and normalises them itself.

The parity gate: the written file is loaded back and run on real images from the run's own
validation split (up to 256) beside the PyTorch model; the largest logit difference and the top-1
agreement are printed, and past the tolerance the export fails and leaves no file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import __version__
from ..data.loader import decode_image
from ..errors import ConfigError, DataError, ExportError, ResforgeError
from ..io import temp_dir
from ..runtime.backends import Runner, TorchRunner, require_backend
from ..runtime.convert import (DEFAULT_OPSET, HalfPrecision, detector_onnx, example_input, move_into_place, to_onnx,
                               to_openvino)
from ..runtime.record import PT2_FILE, ModelInfo
from ..runtime.build import build_runner
from ..runtime.predictor import Predictor
from ..runtime.source import Source, open_source

log = logging.getLogger("resforge")

FORMATS = ("onnx", "openvino", "pt2")
DTYPES = ("fp32", "fp16")
SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "pt2": ".pt2"}
PARITY_IMAGES = 256
# Largest logit difference allowed, as a fraction of the largest logit (at least 1): fp32 engines differ
# in summation order only; fp16 weights and activations keep about three decimal digits.
LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
BOX_IOU, SCORE_TOLERANCE = 0.99, 1e-3  # a detector's export: a detection matches one of the same class this close
MAP_AGREEMENT = 0.999  # a segmenter's export: the share of pixels that must get the class PyTorch gives them
MAP_PROB_TOLERANCE = {"fp32": 1e-3, "fp16": 1.0}  # fp16: the agreement alone
PIXELS_AGREEMENT = 0.995  # a graph resizing pixels itself differs from torchvision by a grey level at most
PIXELS_PROB_DIFF = 0.01


@dataclass
class Parity:
    """The exported file against the PyTorch model, on the same images."""

    images: int
    where: str  # which images
    max_abs_diff: float  # largest logit difference
    tolerance: float  # the largest allowed: a share of the largest logit
    top1_agreement: float
    max_prob_diff: float
    mean_prob_diff: float
    decided: int  # disagreements where PyTorch's top two were further apart than twice the tolerance

    def line(self) -> str:
        return (f"parity on {self.images} {self.where}: max |logit diff| {self.max_abs_diff:.2e} (tolerance "
                f"{self.tolerance:.2e}), top-1 agreement {self.top1_agreement:.2%}, max prob diff "
                f"{self.max_prob_diff:.2e}")


@dataclass
class MapParity:
    """A segmenter's exported file against the PyTorch model: class maps and probabilities, pixel by pixel."""

    images: int
    where: str
    pixels: int
    agreement: float  # share of pixels given the same class
    max_prob_diff: float
    tolerance: float  # the largest probability difference allowed (fp32)

    def line(self) -> str:
        return (f"parity on {self.images} {self.where} ({self.pixels} pixels): class agreement {self.agreement:.4%}, "
                f"max prob diff {self.max_prob_diff:.2e}")


@dataclass
class BoxParity:
    """A detector's exported file against the PyTorch model: each detection matched to one of the same class."""

    images: int
    where: str
    detections: int  # PyTorch's, above the score floor
    unmatched: int  # detections of either model above the floor without a match in the other's
    max_score_diff: float  # between matched detections
    mask_agreement: float | None  # Mask R-CNN: share of the matched masks' pixels both put in (or out of) the object

    def line(self) -> str:
        masks = "" if self.mask_agreement is None else f", mask pixels agreeing {self.mask_agreement:.4%}"
        return (f"parity on {self.images} {self.where}: {self.detections} detections, {self.unmatched} unmatched "
                f"(IoU >= {BOX_IOU}, the same class), max score diff {self.max_score_diff:.2e}{masks}")


@dataclass
class Exported:
    path: Path
    format: str
    parity: Parity | MapParity | BoxParity


def export(source: str | os.PathLike, format: str, out: str | os.PathLike | None = None, *,
           opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, dtype: str = "fp32",
           embed_preprocessing: bool = False, images: str | os.PathLike | None = None) -> Exported:
    """Export a run's best model (or a .safetensors with its sidecar) and gate it on parity with PyTorch.

    `images`: a folder of images for the parity check instead of the run's validation split.
    """
    _check_options(format, dtype, opset, embed_preprocessing)
    src = open_source(source)
    if src.kind != "torch":
        raise ConfigError(f"{source} is already an exported {src.kind} file: export from the run directory or "
                          "its .safetensors")
    if src.info.task == "detect" and (format == "pt2" or dtype != "fp32" or embed_preprocessing):
        raise ConfigError("a detector exports as an fp32 ONNX or OpenVINO graph that takes float images of any size "
                          "and does its own resize, normalisation and NMS: torch.export does not trace torchvision's "
                          "detectors, and --dtype fp16 and --embed-preprocessing do not apply")
    if embed_preprocessing and src.info.task == "segment":
        raise ConfigError("--embed-preprocessing puts a classifier's resize and crop into its graph; a segmenter's "
                          "graph takes normalised images of any size, and the resize (or the slicing into windows) "
                          "and the upsampling run around it: export without it")
    dynamic_batch = dynamic_batch or src.info.task == "segment"  # sliced inference sends several windows a call
    info = replace(src.info.with_export(format=format, dtype=dtype, opset=opset if format != "pt2" else None,
                                        dynamic_batch=dynamic_batch, resforge=__version__, torch=torch.__version__),
                   input="pixels" if embed_preprocessing else "tensor")
    path = Path(out) if out else _default_path(src, format, dtype, embed_preprocessing)
    if path.suffix.lower() != SUFFIX[format]:
        raise ConfigError(f"{format} exports are {SUFFIX[format]} files, got {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the file to write")
    decoded, where = parity_images(src, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(path.parent, "export") as tmp:
        written = tmp / path.name
        try:
            _write(src, info, format, written, opset, dynamic_batch, dtype)
        except ResforgeError:
            raise
        except Exception as e:  # the exporters' own errors: say which step failed, keep the cause for Python users
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ExportError(f"the {format} conversion of {source} failed: {reason}; nothing was written") from e
        if info.task == "segment":
            parity: Parity | MapParity | BoxParity = check_map_parity(src, info, written, format, decoded, where)
            log.info("%s", parity.line())
            _gate_maps(parity, path)
        elif info.task == "detect":
            parity = check_box_parity(src, info, written, format, decoded, where)
            log.info("%s", parity.line())
            _gate_boxes(parity, path)
        else:
            parity = check_parity(src, info, written, format, decoded, where)
            log.info("%s", parity.line())
            _gate(parity, embed_preprocessing, path)
        move_into_place(written, path, format)
    log.info("exported %s (%s, %.1f MB)", path, format, _size(path, format) / 1e6)
    return Exported(path, format, parity)


def _check_options(format: str, dtype: str, opset: int, pixels: bool) -> None:
    if format not in FORMATS:
        hint = (" (TensorRT: export onnx, and run it with --backend tensorrt where onnxruntime-gpu has TensorRT)"
                if format == "tensorrt" else "")
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}{hint}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if format != "pt2" and not DEFAULT_OPSET <= opset <= newest:
        raise ConfigError(f"opset must lie in {DEFAULT_OPSET}..{newest} (18 is the first with antialiased "
                          f"Resize; the installed onnx knows up to {newest}), got {opset}")
    if pixels and format == "pt2":
        raise ConfigError("--embed-preprocessing makes an ONNX or OpenVINO graph that takes pixels; a pt2 program "
                          "takes the preprocessed tensor")
    if format == "openvino":
        require_backend("openvino")


def _default_path(src: Source, format: str, dtype: str, pixels: bool) -> Path:
    """Beside the weights: best.onnx, best-fp16-pixels.xml, ..."""
    stem = src.path.stem + ("-fp16" if dtype == "fp16" else "") + ("-pixels" if pixels else "")
    return src.path.with_name(stem + SUFFIX[format])


def _write(src: Source, info: ModelInfo, format: str, path: Path, opset: int, dynamic_batch: bool,
           dtype: str) -> None:
    if format == "pt2":
        net = src.model.eval() if dtype == "fp32" else HalfPrecision(src.model).eval()
        x, shapes = example_input(info, dynamic_batch)
        program = torch.export.export(net, (x,), dynamic_shapes=shapes)
        torch.export.save(program, str(path), extra_files={PT2_FILE: info.to_json()})
        return
    import onnx

    detector = info.task == "detect"
    if format == "onnx":
        onnx.save(detector_onnx(src.model, info, opset=opset) if detector else
                  to_onnx(src.model, info, opset=opset, dynamic_batch=dynamic_batch, dtype=dtype), str(path))
        return
    import openvino as ov

    bare = replace(info, input="tensor")  # the network; the PrePostProcessor adds the pixels input
    proto = detector_onnx(src.model, info, opset=opset) if detector else \
        to_onnx(src.model, bare, opset=opset, dynamic_batch=dynamic_batch)
    # fp16 weights, computed as the CPU can
    ov.save_model(to_openvino(proto, info), str(path), compress_to_fp16=dtype == "fp16")


def parity_images(src: Source, folder: str | os.PathLike | None) -> tuple[list[torch.Tensor], str]:
    """Up to PARITY_IMAGES images to check an export on, decoded: from `folder`, else the run's validation
    split (found through the sidecar), spread over the split. An unreadable file is skipped and named, as
    every command does; none found, or none readable, is an error naming the fix."""
    if folder is not None:
        from ..data.folder import scan_images

        where = f"images from {folder}"
        return _decoded(_spread(scan_images([folder])), src.info, where), where
    try:
        paths = [f for f, _ in src.info.recorded_samples(src.path, "val")]
    except DataError:
        paths = []
    if paths:
        where = f"validation images of {src.info.recorded_split(src.path).parent}"
        return _decoded(_spread(paths), src.info, where), where
    raise ConfigError(f"no validation images of {src.path}'s run were found (its split.csv or data folder moved) "
                      "to check the export on: give a folder of images with --images DIR")


def _spread(paths: list[str]) -> list[str]:
    step = max(1, len(paths) // PARITY_IMAGES)
    return sorted(paths)[::step][:PARITY_IMAGES]


def _decoded(files: list[str], info: ModelInfo, where: str) -> list[torch.Tensor]:
    """The readable ones of `files`, decoded before anything is converted."""
    images = []
    for f in files:
        try:
            images.append(decode_image(f, info.pre))
        except DataError as e:
            log.warning("skipped for the parity check: %s", e)
    if not images:
        raise ConfigError(f"none of the {len(files)} {where} could be read to check the export on: give a folder "
                          "of readable images with --images DIR")
    return images


def _reference_and_candidate(src: Source, info: ModelInfo, written: Path, format: str, decoded: list[torch.Tensor]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the PyTorch model (fp32) and of the written file, on the same decoded images."""
    torch_model = Predictor(TorchRunner(src.model, torch.device("cpu"), "fp32"), src.info, str(src.path))
    run = _Program(written) if format == "pt2" else _file_runner(info, written, format)
    # one by one: a fixed-batch graph takes one image, a pixel graph each image at its own size
    return torch_model.logits(decoded, 32), Predictor(run, info, str(written)).logits(decoded, 1)


def _file_runner(info: ModelInfo, written: Path, format: str) -> Runner:
    """The written ONNX file or IR on its own engine, on the CPU."""
    backend, kind = ("onnxruntime", "onnx") if format == "onnx" else ("openvino", "openvino")
    precision = "auto" if backend == "onnxruntime" else "fp32"  # ORT: the file's own; OpenVINO: no bf16 hint
    return build_runner(Source(kind, written, info), backend, torch.device("cpu"), precision)


class _Program(Runner):
    """A written .pt2 program, run as the parity check runs the other formats."""

    backend, precision = "torch.export", "fp32"

    def __init__(self, path: Path):
        self.module = torch.export.load(str(path)).module()

    @torch.inference_mode()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).float()


def check_parity(src: Source, info: ModelInfo, written: Path, format: str, images: list[torch.Tensor], where: str
                 ) -> Parity:
    reference, candidate = _reference_and_candidate(src, info, written, format, images)
    agree = candidate.argmax(1) == reference.argmax(1)
    top2 = reference.topk(min(2, reference.shape[1]), dim=1).values
    tolerance = LOGIT_TOLERANCE[info.export.get("dtype", "fp32")] * max(1.0, float(reference.abs().max()))
    prob_diff = (candidate.softmax(1) - reference.softmax(1)).abs()
    return Parity(images=len(images), where=where, max_abs_diff=float((candidate - reference).abs().max()),
                  tolerance=tolerance, top1_agreement=float(agree.float().mean()),
                  max_prob_diff=float(prob_diff.max()), mean_prob_diff=float(prob_diff.mean()),
                  decided=int((~agree & (top2[:, 0] - top2[:, -1] > 2 * tolerance)).sum()))


def check_map_parity(src: Source, info: ModelInfo, written: Path, format: str, images: list[torch.Tensor],
                     where: str) -> MapParity:
    """Both models through the segmenter's own inference (one pass at the trained size, or sliced windows), on
    the same images at their own sizes."""
    from ..tasks.segment_infer import LoadedSegmenter

    reference = LoadedSegmenter.from_info(TorchRunner(src.model, torch.device("cpu"), "fp32"), info)
    candidate = LoadedSegmenter.from_info(_Program(written) if format == "pt2" else _file_runner(info, written, format),
                                          info)
    same, pixels, diff = 0, 0, 0.0
    for image in images:
        p, q = reference.probabilities(image.float() / 255), candidate.probabilities(image.float() / 255)
        same += int((p.argmax(0) == q.argmax(0)).sum())
        pixels += p[0].numel()
        diff = max(diff, float((p - q).abs().max()))
    return MapParity(images=len(images), where=where, pixels=pixels, agreement=same / pixels, max_prob_diff=diff,
                     tolerance=MAP_PROB_TOLERANCE[info.export.get("dtype", "fp32")])


def check_box_parity(src: Source, info: ModelInfo, written: Path, format: str, images: list[torch.Tensor],
                     where: str) -> BoxParity:
    """Both detectors through the same inference (one call, or sliced tiles), on the same images at their own sizes;
    detections within SCORE_TOLERANCE of the score threshold may fall on either side of it and are not counted."""
    from torchvision.ops import box_iou

    from ..tasks.detect_infer import ExportedDetector, LoadedDetector

    tile = info.task_record.get("tile")
    reference = LoadedDetector(src.model.eval(), info.classes, tile)
    candidate = LoadedDetector(ExportedDetector(_file_runner(info, written, format), info.name), info.classes, tile)
    floor = float(getattr(getattr(src.model, "roi_heads", src.model), "score_thresh", 0.05)) + SCORE_TOLERANCE
    counted = unmatched = 0
    score_diff, same_pixels, pixels = 0.0, 0, 0
    for image in images:
        a, b = (m.detect([image.float() / 255])[0] for m in (reference, candidate))
        keep_a, keep_b = a["scores"] >= floor, b["scores"] >= floor
        counted += int(keep_a.sum())
        iou = box_iou(a["boxes"], b["boxes"])
        near = (iou >= BOX_IOU) & (a["labels"][:, None] == b["labels"][None, :])
        unmatched += int((keep_a & ~near.any(1)).sum()) + int((keep_b & ~near.any(0)).sum())
        for i, j in near.nonzero().tolist():
            if keep_a[i] or keep_b[j]:
                score_diff = max(score_diff, abs(float(a["scores"][i] - b["scores"][j])))
                if "masks" in a:
                    inside = (a["masks"][i] >= 0.5) == (b["masks"][j] >= 0.5)
                    same_pixels, pixels = same_pixels + int(inside.sum()), pixels + inside.numel()
    return BoxParity(images=len(images), where=where, detections=counted, unmatched=unmatched,
                     max_score_diff=score_diff, mask_agreement=same_pixels / pixels if pixels else None)


def _gate_boxes(parity: BoxParity, path: Path) -> None:
    if parity.unmatched:
        what = f"{parity.unmatched} detection(s) without a match (IoU >= {BOX_IOU}, the same class)"
    elif parity.max_score_diff > SCORE_TOLERANCE:
        what = f"scores differing by up to {parity.max_score_diff:.3g} (at most {SCORE_TOLERANCE:g})"
    elif parity.mask_agreement is not None and parity.mask_agreement < MAP_AGREEMENT:
        what = f"{parity.mask_agreement:.3%} of mask pixels agreeing (at least {MAP_AGREEMENT:.1%})"
    else:
        return
    raise ExportError(f"the export disagrees with the PyTorch model: {what}; {path} was not written")


def _gate_maps(parity: MapParity, path: Path) -> None:
    if parity.agreement < MAP_AGREEMENT:
        what = f"{parity.agreement:.3%} of pixels given the same class (at least {MAP_AGREEMENT:.1%})"
    elif parity.max_prob_diff > parity.tolerance:
        what = f"max probability difference {parity.max_prob_diff:.3g} over the tolerance {parity.tolerance:g}"
    else:
        return
    raise ExportError(f"the export disagrees with the PyTorch model: {what}; {path} was not written")


def _gate(parity: Parity, pixels: bool, path: Path) -> None:
    """fp32 and fp16: every logit within the tolerance, and no top-1 disagreement outside near-ties. A
    graph resizing pixels itself (a grey level off torchvision at most): 99.5% agreement, and probabilities
    that differ by less than PIXELS_PROB_DIFF on average (a wrong normalisation moves them all)."""
    if pixels:
        ok = parity.top1_agreement >= PIXELS_AGREEMENT and parity.mean_prob_diff <= PIXELS_PROB_DIFF
        what = (f"top-1 agreement {parity.top1_agreement:.2%} (at least {PIXELS_AGREEMENT:.1%}) or mean probability "
                f"difference {parity.mean_prob_diff:.3g} (at most {PIXELS_PROB_DIFF:g})")
    else:
        ok = parity.max_abs_diff <= parity.tolerance and parity.decided == 0
        what = (f"max |logit diff| {parity.max_abs_diff:.3g} over the tolerance {parity.tolerance:.3g}" if
                parity.max_abs_diff > parity.tolerance else f"{parity.decided} clear top-1 disagreement(s)")
    if not ok:
        raise ExportError(f"the export disagrees with the PyTorch model: {what}; {path} was not written")


def _size(path: Path, format: str) -> int:
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if format == "openvino" else 0)


def read_pt2_info(path: str | os.PathLike) -> ModelInfo:
    """The record inside a .pt2 export."""
    extra = {PT2_FILE: ""}
    torch.export.load(str(path), extra_files=extra)
    return ModelInfo.from_json(extra[PT2_FILE], str(path))
