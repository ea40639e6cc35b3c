"""A segmenter out of the lab: ONNX, OpenVINO IR and torch.export files that take images of any size, gated on the
class maps PyTorch gives, read back by eval and predict as the run itself is; int8 files measured in mIoU; bench
timing files to class maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SEGMENT_TINY as TINY
from helpers import make_mask_folder
from PIL import Image

import resforge
from resforge.errors import ExportError
from resforge.models import load_model
from resforge.models.segmentation import SegmenterLogits
from resforge.tasks import recorded_task
from resforge.tasks.segment_infer import load_segmenter, predict_masks



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


@pytest.mark.parametrize("segmenter, options", [("deeplabv3", {"aux": True}), ("fcn", {"output_stride": 8})])
@pytest.mark.parametrize("format, suffix", [("onnx", ".onnx"), ("openvino", ".xml")])
def test_every_segmenter_family_exports_through_the_map_gate(masks, tmp_path, segmenter, options, format, suffix):
    """DeepLabV3 (with the auxiliary head, left out of the graph) and FCN, untrained, saved as spec + weights."""
    from resforge.data.transforms import make_preprocess
    from resforge.models import save_model
    from resforge.models.segmentation import SEGMENTER_CLASSES

    torch.manual_seed(0)
    model = SEGMENTER_CLASSES[segmenter](num_classes=3, backbone="resnet18", backbone_options={"width": 0.25},
                                         **{"output_stride": 16, "head_channels": 32, **options}).eval()
    pre = make_preprocess(64, 1.0, 3, "bilinear", [0.5] * 3, [0.25] * 3)
    saved = save_model(model, tmp_path / f"{segmenter}.safetensors",
                       {"task": "segment", "classes": ["background", "square", "disc"], "preprocess": pre.to_dict()})
    exported = resforge.export(saved, format, out=str(tmp_path / f"{segmenter}{suffix}"),
                               images=str(Path(masks, "images")))
    assert exported.parity.images == 10 and exported.parity.agreement >= 0.999
    assert exported.parity.max_prob_diff < 1e-3


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


@pytest.mark.parametrize("backend, suffix", [("onnxruntime", ".onnx"), ("openvino", ".xml")])
def test_quantize_makes_an_int8_segmenter_measured_in_miou_against_fp32(run_dir, masks, tmp_path, backend, suffix):
    from resforge.compress.quantize import quantize
    from resforge.runtime.source import open_source

    q = quantize(run_dir, backend, out=str(tmp_path / f"int8{suffix}"), calib=4)
    assert q.metric == "mIoU" and q.images == 2 and 0 < q.agreement <= 1
    info = open_source(q.path).info
    assert info.task == "segment" and info.export["dtype"] == "int8"
    assert info.export["quantized"]["int8_miou"] == q.int8_score
    graph_ops = (set(n.op_type for n in __import__("onnx").load(str(q.path)).graph.node) if backend == "onnxruntime"
                 else {op.get_type_name() for op in __import__("openvino").Core().read_model(str(q.path)).get_ops()})
    assert graph_ops & {"QuantizeLinear", "FakeQuantize"}
    # the file is a segmenter every command reads: eval measures it on the same pixels as the run
    report = resforge.evaluate(q.path, masks, out=str(tmp_path / "e"))
    assert report.num_images == 10 and report.metrics["pixels"] == resforge.evaluate(
        run_dir, masks, out=str(tmp_path / "r")).metrics["pixels"]


def test_bench_times_a_segmenter_from_files_to_class_maps(run_dir, masks, tmp_path):
    from resforge.deploy.bench import _answers, measure
    from resforge.runtime.predictor import Predictor

    files = sorted(str(p) for p in Path(masks, "images").glob("*.jpg"))[:2]
    row = measure(str(run_dir), "onnxruntime", batch_sizes=(1,), duration=0.2, warmup=1, images=str(Path(masks,
                                                                                                        "images")))
    assert row["backend"] == "onnxruntime" and row["end_to_end"]["1"] > 0 and row["latency_ms"]["p50"] > 0
    predictor = Predictor.load(run_dir, "onnxruntime")
    maps = _answers(predictor, 1)(files)
    assert [m.shape for m in maps] == [(64, 64)] * 2 and maps[0].max() <= 2
    with pytest.raises(resforge.ConfigError, match="is a segment model: its answers are class maps"):
        predictor.predict(files)


def test_a_segmenters_backbone_prunes_fine_tunes_and_exports(run_dir, masks, tmp_path):
    """Half the backbone's MACs gone with the head attached (its widths kept: ASPP and the decoder read fewer
    channels), fine-tuned, rebuilt from spec + weights, exported through the map gate, evaluated alike."""
    from resforge.models.summary import summarize

    out = resforge.prune(run_dir, macs=0.5, epochs=1, progress=False, project=str(tmp_path), workers=0, batch_size=4)
    before, after = out["pruned"]["macs"]
    pruned, meta = load_model(out["run_dir"])
    original, _ = load_model(run_dir)
    assert after <= 0.5 * before and summarize(pruned.backbone, 64).macs == after
    assert meta["task"] == "segment" and pruned.spec()["head_channels"] == original.spec()["head_channels"]
    exported = resforge.export(out["run_dir"], "onnx", out=str(tmp_path / "pruned.onnx"))
    assert exported.parity.agreement >= 0.999
    by_file = resforge.evaluate(exported.path, masks, out=str(tmp_path / "file"))
    by_run = resforge.evaluate(out["run_dir"], masks, out=str(tmp_path / "run"))
    assert by_file.metrics["miou"] == pytest.approx(by_run.metrics["miou"], abs=1e-3)


@pytest.mark.parametrize("kind, options", [("fcn", {}), ("deeplabv3", {"aux": True})])
def test_pruning_refuses_a_segmenter_whose_fcn_head_follows_the_backbone(kind, options):
    from resforge.compress.prune import prune_model
    from resforge.models.segmentation import SEGMENTER_CLASSES

    model = SEGMENTER_CLASSES[kind](num_classes=3, backbone="resnet18", backbone_options={"width": 0.25},
                                    output_stride=16, head_channels=32, **options)
    with pytest.raises(resforge.ConfigError, match="an FCN head .* takes its width from the backbone"):
        prune_model(model, 64, macs=0.5)
