"""A segmenter exported: ONNX, OpenVINO IR and torch.export files that take images of any size, gated on the class
maps PyTorch gives, and read back by eval and predict as the run itself is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_mask_folder
from PIL import Image

import resforge
from resforge.errors import ExportError
from resforge.models import load_model
from resforge.models.segmentation import SegmenterLogits
from resforge.tasks import recorded_task
from resforge.tasks.segment import load_segmenter, predict_masks

TINY = {"model": "resnet18", "width": 0.25, "img_size": 64, "batch_size": 4, "workers": 0, "amp": "off",
        "head_channels": 32, "output_stride": 16}


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return make_mask_folder(tmp_path_factory.mktemp("segment") / "shapes", n=10)


@pytest.fixture(scope="module")
def run_dir(masks, tmp_path_factory):
    run = resforge.train(masks, progress=False, project=str(tmp_path_factory.mktemp("runs")), name="seg", epochs=1,
                         **TINY)
    return Path(run["run_dir"])


@pytest.mark.parametrize("format, suffix", [("onnx", ".onnx"), ("openvino", ".xml"), ("pt2", ".pt2")])
def test_a_segmenter_exports_and_passes_the_map_parity_gate(run_dir, tmp_path, format, suffix):
    exported = resforge.export(run_dir, format, out=str(tmp_path / f"seg{suffix}"))
    p = exported.parity
    assert exported.path.is_file() and p.images == 2 and p.pixels == 2 * 64 * 64
    assert p.agreement == 1.0 and p.max_prob_diff < 1e-4
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary left behind


@pytest.mark.parametrize("format", ["onnx", "openvino"])
def test_an_exported_segmenter_takes_images_of_any_size_and_is_measured_as_the_run(run_dir, masks, tmp_path, format):
    path = resforge.export(run_dir, format, out=str(tmp_path / ("seg.onnx" if format == "onnx" else "seg.xml"))).path
    assert recorded_task(path) == "segment"
    loaded = load_segmenter(path, "cpu")
    assert loaded.net.backend == ("onnxruntime" if format == "onnx" else "openvino")
    assert loaded.classes == ["background", "square", "disc"] and loaded.pre.img_size == 64
    model, _ = load_model(run_dir)
    logits = SegmenterLogits(model).eval()
    torch.manual_seed(0)
    for h, w in [(67, 93), (128, 40), (64, 64)]:  # sizes the graph was not traced at
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            want = logits(x)
        got = loaded.net(x)
        assert got.shape == (2, 3, h, w) and torch.allclose(got, want, atol=1e-4)
    by_file = resforge.evaluate(path, masks, out=str(tmp_path / "e-file"))
    by_run = resforge.evaluate(run_dir, masks, out=str(tmp_path / "e-run"))
    assert by_file.metrics["confusion"] == by_run.metrics["confusion"]


def test_predict_with_an_exported_segmenter_writes_the_runs_masks(run_dir, masks, tmp_path):
    path = resforge.export(run_dir, "onnx", out=str(tmp_path / "seg.onnx")).path
    files = sorted(str(p) for p in Path(masks, "images").glob("*.jpg"))[:3]
    from_file = predict_masks(path, files, tmp_path / "file")
    from_run = predict_masks(run_dir, files, tmp_path / "run")
    for a, b in zip(from_file, from_run):
        assert np.array_equal(np.asarray(Image.open(a["mask"])), np.asarray(Image.open(b["mask"])))


def test_a_segmenter_export_that_disagrees_with_pytorch_is_not_written(run_dir, tmp_path, monkeypatch):
    from resforge.deploy import export as export_module

    real = export_module._file_runner

    def off_by_a_class(info, written, format):
        runner = real(info, written, format)
        run = runner.run
        runner.run = lambda x: run(x).roll(1, dims=1)  # every pixel's scores moved to the next class
        return runner

    monkeypatch.setattr(export_module, "_file_runner", off_by_a_class)
    with pytest.raises(ExportError, match="of pixels given the same class"):
        resforge.export(run_dir, "onnx", out=str(tmp_path / "seg.onnx"))
    assert list(tmp_path.iterdir()) == []


def test_a_segmenter_refuses_a_graph_with_its_preprocessing_by_name(run_dir, tmp_path):
    with pytest.raises(resforge.ConfigError, match="segmenter's graph takes normalised images of any size"):
        resforge.export(run_dir, "onnx", out=str(tmp_path / "seg.onnx"), embed_preprocessing=True)
    assert list(tmp_path.iterdir()) == []
