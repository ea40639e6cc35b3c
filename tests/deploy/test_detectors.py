"""A detector exported: ONNX and OpenVINO graphs that take one float image of any size and do their own resize,
normalisation and NMS, gated on matching PyTorch's detections, and read back by eval and predict."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DETECT_TINY as TINY
from helpers import make_detection_folder

import resforge
from resforge.errors import ExportError
from resforge.tasks import recorded_task



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_detection_folder(tmp_path_factory.mktemp("detect") / "shapes", n=12)


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory):
    project = tmp_path_factory.mktemp("runs")
    return {d: Path(resforge.train(shapes, progress=False, project=str(project), name=d, epochs=1, detector=d,
                                   **TINY)["run_dir"]) for d in ("fasterrcnn", "maskrcnn")}


@pytest.mark.parametrize("detector", ["fasterrcnn", "maskrcnn"])
@pytest.mark.parametrize("format, suffix", [("onnx", ".onnx"), ("openvino", ".xml")])
def test_a_detector_exports_with_nms_inside_and_answers_as_its_run(runs, shapes, tmp_path, detector, format, suffix):
    run_dir = runs[detector]
    exported = resforge.export(run_dir, format, out=str(tmp_path / f"det{suffix}"))
    p = exported.parity
    assert p.detections > 0 and p.unmatched == 0 and p.max_score_diff < 1e-3
    assert (p.mask_agreement is not None) == (detector == "maskrcnn")
    assert recorded_task(exported.path) == "detect"
    by_file = resforge.evaluate(exported.path, shapes, out=str(tmp_path / "file"))
    by_run = resforge.evaluate(run_dir, shapes, out=str(tmp_path / "run"))
    assert by_file.metrics["map"] == pytest.approx(by_run.metrics["map"], abs=1e-6)
    image = str(sorted(Path(shapes, "images").glob("*"))[0])
    from_file, from_run = (resforge.predict(s, [image], conf=0.0)[0]["objects"] for s in (exported.path, run_dir))
    assert len(from_file) == len(from_run) > 0
    assert [o["class"] for o in from_file] == [o["class"] for o in from_run]


@pytest.mark.parametrize("format, suffix, sizes", [
    ("onnx", ".onnx", [(64, 200), (200, 64), (49, 70), (70, 49), (300, 40), (37, 53)]),
    ("openvino", ".xml", [(64, 200), (200, 64), (300, 40), (40, 300)])])
def test_an_exported_detector_sizes_images_of_any_shape_as_its_run(runs, shapes, tmp_path, format, suffix, sizes):
    """Portrait, landscape and sizes where float32 floors the resized side a pixel short of PyTorch's float64
    (64 x 200 against a max_size of 107; 49 px against a min_size of 64: on ONNX Runtime only), checked by the
    export's own gate on those images."""
    from PIL import Image

    folder = tmp_path / "odd"
    folder.mkdir()
    for k, (path, (h, w)) in enumerate(zip(sorted(Path(shapes, "images").glob("*")), sizes)):
        Image.open(path).resize((w, h)).save(folder / f"{k}.png")
    exported = resforge.export(runs["fasterrcnn"], format, out=str(tmp_path / f"det{suffix}"), images=str(folder))
    assert exported.parity.images == len(sizes)
    assert exported.parity.detections > 0 and exported.parity.unmatched == 0


def test_a_detector_export_that_disagrees_with_pytorch_is_not_written(runs, tmp_path, monkeypatch):
    from resforge.tasks import detect_infer as detect

    real = detect.ExportedDetector.__call__

    def shifted(self, images):
        out = real(self, images)
        for o in out:
            o["boxes"] = o["boxes"] + 3.0  # every box 3 px off
        return out

    monkeypatch.setattr(detect.ExportedDetector, "__call__", shifted)
    with pytest.raises(ExportError, match="without a match .IoU >= 0.99, the same class.*det.onnx was not written"):
        resforge.export(runs["fasterrcnn"], "onnx", out=str(tmp_path / "det.onnx"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options", [{"format": "pt2"}, {"format": "onnx", "dtype": "fp16"},
                                     {"format": "onnx", "embed_preprocessing": True}])
def test_what_a_detector_cannot_export_is_refused_by_name(runs, tmp_path, options):
    with pytest.raises(resforge.ConfigError, match="a detector exports as an fp32 ONNX or OpenVINO graph"):
        resforge.export(runs["fasterrcnn"], out=str(tmp_path / ("d.pt2" if options["format"] == "pt2" else "d.onnx")),
                        **options)
    assert list(tmp_path.iterdir()) == []


def test_a_detectors_backbone_prunes_fine_tunes_and_exports(runs, shapes, tmp_path):
    """Half the backbone's MACs gone through Torch-Pruning with the pyramid attached (its outputs, read by the
    heads, keep their width), fine-tuned, saved as spec + weights, exported through the gate and evaluated."""
    from resforge.models import load_model
    from resforge.models.summary import summarize

    out = resforge.prune(runs["fasterrcnn"], macs=0.5, epochs=1, progress=False, project=str(tmp_path), workers=0,
                         batch_size=4)
    before, after = out["pruned"]["macs"]
    assert after <= 0.5 * before
    pruned, meta = load_model(out["run_dir"])
    original, _ = load_model(runs["fasterrcnn"])
    assert meta["task"] == "detect"
    assert summarize(pruned.resnet, 64).macs == after and summarize(original.resnet, 64).macs == before
    assert pruned.spec()["fpn_channels"] == original.spec()["fpn_channels"]
    exported = resforge.export(out["run_dir"], "onnx", out=str(tmp_path / "pruned.onnx"))
    assert exported.parity.detections > 0 and exported.parity.unmatched == 0
    by_file = resforge.evaluate(exported.path, shapes, out=str(tmp_path / "file"))
    by_run = resforge.evaluate(out["run_dir"], shapes, out=str(tmp_path / "run"))
    assert by_file.metrics["map"] == pytest.approx(by_run.metrics["map"], abs=1e-6)


def test_pruning_refuses_what_it_cannot_cut_in_a_detector():
    from resforge.compress.prune import prune_model
    from resforge.models.detection import FasterRCNN

    frozen = FasterRCNN(num_classes=3, backbone="resnet18", backbone_options={"width": 0.25}, min_size=64,
                        max_size=106, fpn_channels=32, box_width=64, frozen_bn=True)
    with pytest.raises(resforge.ConfigError, match="frozen batch norm"):
        prune_model(frozen, 64, macs=0.5)
    plain = FasterRCNN(num_classes=3, backbone="resnet18", backbone_options={"width": 0.25}, min_size=64,
                       max_size=106, fpn_channels=32, box_width=64)
    with pytest.raises(resforge.ConfigError, match="taylor importance takes gradients of a classifier"):
        prune_model(plain, 64, macs=0.5, importance="taylor", gradients=lambda m: None)


def test_bench_times_a_detector_on_its_engine_from_files(runs, shapes, tmp_path):
    from resforge.deploy.bench import bench, table

    exported = resforge.export(runs["fasterrcnn"], "openvino", out=str(tmp_path / "det.xml"))
    rows = bench([runs["fasterrcnn"], exported.path], ["auto"], batch_sizes=[1, 2], duration=0.1, warmup=1,
                 images=str(Path(shapes, "images")), isolate=False, progress=False)
    assert [r["backend"] for r in rows] == ["torch", "openvino"]
    for r in rows:
        assert r["latency_ms"]["p50"] > 0 and set(r["throughput"]) == set(r["end_to_end"]) == {"1", "2"}
        assert all(v > 0 for v in r["end_to_end"].values())
    assert "| det.xml | auto: b1 openvino fp32, b2 openvino fp32 | fp32 |" in table(rows, [1, 2])


def test_a_detector_quantizes_to_int8_with_its_heads_left_in_float(runs, shapes, tmp_path):
    """NNCF on the exported graph: the backbone, pyramid and box head int8, the layers giving scores and box
    offsets (whose int8 box regression snaps coordinates to its grid) and post-processing in float; AP@.5
    measured against fp32 on the validation split."""
    import openvino as ov

    from resforge.compress.quantize import quantize

    q = quantize(runs["fasterrcnn"], "openvino", tmp_path / "det-int8.xml", calib=8)
    assert (q.metric, q.kept_fp32, q.images) == ("AP50", ["heads and post-processing"], 2)
    assert set(q.timings) == {"fp32", "int8"} and 0 <= q.agreement <= 1
    fq = [op.get_friendly_name() for op in ov.Core().read_model(str(q.path)).get_ordered_ops()
          if op.get_type_name() == "FakeQuantize"]
    assert any("/backbone/body/" in n for n in fq) and any("/backbone/fpn/" in n for n in fq)
    assert any("/roi_heads/box_head/" in n for n in fq)  # the box head's fully connected layers: int8 too
    assert not any("/rpn/head/" in n or "/box_predictor/" in n for n in fq)
    from resforge.runtime.source import open_source

    record = open_source(q.path).info
    assert record.task == "detect" and record.export["dtype"] == "int8"
    assert (record.export["quantized"]["fp32_map50"], record.export["quantized"]["int8_map50"]) == \
        (q.fp32_score, q.int8_score)
    assert resforge.evaluate(q.path, shapes, out=str(tmp_path / "eval")).num_images == 12


def test_a_detector_int8_over_the_allowed_drop_is_not_written(runs, tmp_path, monkeypatch):
    """Over --max-drop, the box head and then the pyramid return to float; still over it, nothing is written (the
    measurement faked to lose 10 points: the tiny detector's AP is too low to lose any)."""
    from dataclasses import replace

    from resforge.compress import quantize_detector
    from resforge.compress.quantize import quantize

    real, levels = quantize_detector._measure, []

    def losing(fp32, int8, info, val):
        levels.append(int8.name)
        return replace(real(fp32, int8, info, val), fp32_score=0.5, int8_score=0.4)

    monkeypatch.setattr(quantize_detector, "_measure", losing)
    # NNCF itself is test_a_detector_quantizes_...'s: here each level's graph is the fp32 one, copied
    monkeypatch.setattr(quantize_detector, "_nncf", lambda fp32, inputs, ignored, out: [
        shutil.copy(fp32.with_suffix(s), out.with_suffix(s)) for s in (".xml", ".bin")])
    with pytest.raises(resforge.ConfigError, match="loses 10.00 points of AP@.5 even with only the backbone in int8 "
                                                   r"\(at most 1 asked\)"):
        quantize(runs["fasterrcnn"], "openvino", tmp_path / "det-int8.xml", calib=4, max_drop=1)
    assert levels == ["raw0.xml", "raw1.xml", "raw2.xml"]
    with pytest.raises(resforge.ConfigError, match="a detector quantises with NNCF on its OpenVINO graph"):
        quantize(runs["fasterrcnn"], "onnxruntime", tmp_path / "det-int8.onnx", calib=4)
    with pytest.raises(resforge.ConfigError, match="drop --method, --activations and --baseline"):
        quantize(runs["fasterrcnn"], "openvino", tmp_path / "det-int8.xml", calib=4, baseline=runs["fasterrcnn"])
    assert list(tmp_path.iterdir()) == []


def test_a_tiled_detector_calibrates_on_what_sliced_inference_feeds_its_graph(shapes):
    """Each image whole and each of its tiles: the two kinds of call sliced inference makes."""
    from types import SimpleNamespace

    from resforge.compress.quantize_detector import _calibration_inputs, _calibration_windows
    from resforge.data.transforms import make_preprocess

    files = [str(p) for p in sorted(Path(shapes, "images").glob("*"))[:2]]
    info = SimpleNamespace(task_record={"tile": {"size": 32, "overlap": 0.0}},
                           pre=make_preprocess(64, 1.0, 3, "bilinear", [0.5] * 3, [0.5] * 3))
    src, scan = SimpleNamespace(info=info), SimpleNamespace(train=[SimpleNamespace(path=f, width=64, height=64)
                                                                   for f in files])
    inputs = _calibration_inputs(_calibration_windows(src, scan, None, 10), info)
    assert [x.shape for x in inputs] == [(3, 64, 64)] + [(3, 32, 32)] * 4 + [(3, 64, 64)] + [(3, 32, 32)] * 4
    whole = inputs[0]
    assert np.array_equal(inputs[4], whole[:, 32:, 32:])  # the last tile: the bottom-right quarter
    with pytest.raises(resforge.ConfigError, match="give the detector's graph 10 input.s., fewer than the 11 asked"):
        _calibration_windows(src, scan, None, 11)


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
@pytest.mark.parametrize("format, suffix", [("onnx", ".onnx"), ("openvino", ".xml")])
def test_one_stage_detectors_export_through_the_same_gate(shapes, tmp_path, detector, format, suffix):
    """RetinaNet and FCOS, untrained, saved as spec + weights and exported on both engines. Their classifiers are
    drawn wider than torchvision's initialisation (std 0.01 about the focal-loss prior of 0.01: every score
    below the threshold, or all tied), so that detections with distinct scores pass the threshold; FCOS's box
    distances start at half its anchors' size rather than at 0 (boxes without area, which match nothing)."""
    from resforge.data.transforms import make_preprocess
    from resforge.models import save_model
    from resforge.models.detection import DETECTOR_CLASSES, IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    model = DETECTOR_CLASSES[detector](num_classes=3, backbone="resnet18", backbone_options={"width": 0.25},
                                       min_size=64, max_size=106, fpn_channels=64).eval()
    torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.5)
    torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)
    if detector == "fcos":
        torch.nn.init.constant_(model.head.regression_head.bbox_reg.bias, 0.5)
    pre = make_preprocess(64, 1.0, 3, "bilinear", list(IMAGENET_MEAN), list(IMAGENET_STD))
    saved = save_model(model, tmp_path / f"{detector}.safetensors",
                       {"task": "detect", "classes": ["square", "disc"], "preprocess": pre.to_dict()})
    exported = resforge.export(saved, format, out=str(tmp_path / f"{detector}{suffix}"),
                               images=str(Path(shapes, "images")))
    p = exported.parity
    assert p.detections > 50 and p.unmatched == 0 and p.max_score_diff < 1e-3


def test_a_detector_that_finds_nothing_answers_nothing_on_openvino(shapes, tmp_path):
    """torchvision's NMS scripts a branch for no boxes; traced, OpenVINO answered that branch with one row of
    uninitialised memory (a box of label 0 and score 1e-19, or above the threshold). The graph is traced
    without it."""
    from resforge.data.transforms import make_preprocess
    from resforge.models import save_model
    from resforge.models.detection import IMAGENET_MEAN, IMAGENET_STD, FCOS
    from resforge.tasks.detect_infer import load_detector

    torch.manual_seed(0)
    model = FCOS(num_classes=3, backbone="resnet18", backbone_options={"width": 0.25}, min_size=64, max_size=106,
                 fpn_channels=64).eval()  # the focal-loss prior: every score far below the threshold
    pre = make_preprocess(64, 1.0, 3, "bilinear", list(IMAGENET_MEAN), list(IMAGENET_STD))
    saved = save_model(model, tmp_path / "fcos.safetensors",
                       {"task": "detect", "classes": ["square", "disc"], "preprocess": pre.to_dict()})
    exported = resforge.export(saved, "openvino", out=str(tmp_path / "fcos.xml"), images=str(Path(shapes, "images")))
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0))
    found = load_detector(exported.path).detect([image])[0]
    assert len(load_detector(saved).detect([image])[0]["boxes"]) == 0
    assert {k: tuple(v.shape) for k, v in found.items()} == {"boxes": (0, 4), "labels": (0,), "scores": (0,)}
