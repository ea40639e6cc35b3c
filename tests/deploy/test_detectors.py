"""A detector exported: ONNX and OpenVINO graphs that take one float image of any size and do their own resize,
normalisation and NMS, gated on matching PyTorch's detections, and read back by eval and predict."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    from resforge.tasks import detect

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
