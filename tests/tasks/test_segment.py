"""Semantic segmentation as a task on the seam: a mask folder is recognised and trained through the one loop,
run directory, checkpoint and report; the figures come from one confusion matrix; a kill -9 resumes; eval and
predict read the run; sliced inference blends windows."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SEGMENT_TINY as TINY
from helpers import make_mask_folder, train_logged
from PIL import Image

import resforge
from resforge.data.transforms import Preprocess
from resforge.evaluation.segmentation import confusion, segmentation_metrics
from resforge.models import load_model
from resforge.models.segmentation import DeepLabV3Plus
from resforge.tasks.segment import class_weights
from resforge.tasks.segment_infer import LoadedSegmenter, load_segmenter, predict_masks



@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return make_mask_folder(tmp_path_factory.mktemp("segment") / "shapes", n=16)


@pytest.fixture(scope="module")
def trained(masks, tmp_path_factory):
    return train_logged(masks, progress=False, project=str(tmp_path_factory.mktemp("runs")), name="seg", epochs=2,
                        **TINY)


def test_a_mask_folder_trains_as_segmentation_through_the_one_loop(trained):
    run, log_text = trained
    assert "task segment: images/ beside masks/: images with class masks" in log_text
    run_dir = Path(run["run_dir"])
    assert run["metric"] == "val_miou"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "val_miou", "val_pixel_acc"} <= set(header) and "val_top1" not in header
    model, meta = load_model(run_dir)
    assert isinstance(model, DeepLabV3Plus) and meta["classes"] == ["background", "square", "disc"]
    assert meta["task"] == "segment" and meta["ignore_index"] == 255 and meta["preprocess"]["img_size"] == 64
    results = json.loads((run_dir / "results.json").read_text())
    val = [row for row in (run_dir / "split.csv").read_text().splitlines() if row.startswith("val,")]
    assert results["val"]["num_images"] == len(val) > 0
    assert set(results["val"]["metrics"]["iou"]) == {"background", "square", "disc"}
    report = (run_dir / "report.md").read_text()
    assert "### val\n\n| images | pixels | mIoU |" in report and "| square |" in report
    assert "class names from classes.txt" in report
    for plot in ("iou_val.png", "predictions_val.png", "history.png"):
        assert (run_dir / "plots" / plot).stat().st_size > 3_000 and f"plots/{plot}" in report
    assert "task: segment" in (run_dir / "config.yaml").read_text()


def test_the_segmenter_learns_the_shapes(masks, tmp_path):
    """Not a benchmark: enough epochs on 13 tiny images that a segmenter which learns at all starts telling shapes
    from the background (one that does not learn predicts background everywhere: mIoU about 0.29)."""
    torch.manual_seed(0)
    run = resforge.train(masks, progress=False, project=str(tmp_path), name="learn", epochs=10, lr=3e-3, **TINY)
    curve = [round(row["val_miou"], 3) for row in run["history"]]
    assert max(curve) > 0.38 and max(curve) > curve[0] + 0.08, curve


def test_a_killed_segmentation_run_resumes_where_it_stopped(masks, tmp_path):
    project = tmp_path / "runs"
    script = textwrap.dedent(f"""
        import os, signal, resforge
        def kill(event, trainer):
            if event == "epoch_end" and trainer.epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        resforge.train({masks!r}, progress=False, project={str(project)!r}, name="k", epochs=2, callbacks=[kill],
                       **{TINY!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run_dir = project / "k"
    assert (run_dir / "last.ckpt").is_file() and not (run_dir / "results.json").exists()
    first = (run_dir / "metrics.csv").read_text().splitlines()
    run = resforge.train(resume=str(run_dir), progress=False)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[:2] == first and [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    assert run["epochs"] == 2 and (run_dir / "results.json").is_file()


@pytest.mark.parametrize("options,message", [
    ({"mixup": 0.2}, "mixup"),
    ({"label_smoothing": 0.1}, "label_smoothing"),
    ({"auto_augment": "rand"}, "augment.auto_augment: classification augmentation that segmentation does not do"),
    ({"metric": "val_map"}, "train.metric val_map is not a figure of segment: val_miou"),
    ({"output_stride": 4}, "output_stride must be one of 8, 16, 32"),
])
def test_options_of_other_tasks_are_refused_for_segmentation_by_name(masks, tmp_path, options, message):
    with pytest.raises(resforge.ConfigError, match=message):
        resforge.train(masks, progress=False, project=str(tmp_path), name="bad", epochs=1, **{**TINY, **options})
    assert not (tmp_path / "bad" / "last.ckpt").exists()


def test_eval_and_predict_read_a_segmentation_run(trained, masks, tmp_path):
    run_dir = Path(trained[0]["run_dir"])
    report = resforge.evaluate(run_dir, masks, out=str(tmp_path / "eval"))
    assert report.num_images == 16 and 0 <= report.metrics["miou"] <= 1
    assert json.loads((tmp_path / "eval" / "metrics_shapes.json").read_text())["metrics"]["miou"] == \
        report.metrics["miou"]
    files = sorted(str(p) for p in Path(masks, "images").glob("*.jpg"))[:2] + [str(tmp_path / "missing.png")]
    rows = predict_masks(run_dir, files, tmp_path / "pred", save_images=tmp_path / "drawn")
    assert rows[2] == {"path": files[2], "error": f"{files[2]}: no such file"}
    png = Image.open(rows[0]["mask"])
    assert png.mode == "P" and png.size == (64, 64)
    assert set(np.unique(np.asarray(png)).tolist()) <= {0, 1, 2}
    assert abs(sum(rows[0]["pixels"].values()) - 1) < 1e-3 and set(rows[0]["pixels"]) <= {"background", "square",
                                                                                           "disc"}
    assert (tmp_path / "drawn" / Path(files[0]).with_suffix(".png").name).is_file()


def test_the_cli_evaluates_and_predicts_a_segmentation_run(trained, masks, tmp_path, capsys):
    from resforge.cli import main

    run_dir = trained[0]["run_dir"]
    assert main(["eval", run_dir, masks, "--out", str(tmp_path / "e")]) == 0
    image = sorted(Path(masks, "images").glob("*.jpg"))[0]
    assert main(["predict", run_dir, str(image), "-o", str(tmp_path / "p.json"), "--format", "json",
                 "--masks", str(tmp_path / "pm")]) == 0
    row = json.loads((tmp_path / "p.json").read_text())[0]
    assert row["mask"] == str(tmp_path / "pm" / "000.png") and Path(row["mask"]).is_file()


def test_figures_come_from_one_confusion_matrix_as_computed_by_hand_and_by_torchmetrics():
    from torchmetrics.functional.segmentation import mean_iou

    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255], [1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2], [1, 1, 2, 0]])
    m = segmentation_metrics(confusion(pred, target, 3, 255), ["a", "b", "c"])
    # class a: tp 2 (of truth 3, predicted 3) -> 2/4; b: tp 4 (truth 4, predicted 5) -> 4/5; c: tp 2 (truth 3,
    # predicted 2) -> 2/3
    assert m["iou"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 2 / 3})
    assert m["miou"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3) and m["pixel_acc"] == pytest.approx(8 / 10)
    assert m["dice_per_class"]["b"] == pytest.approx(8 / 9) and m["pixels"] == 10
    keep = target != 255
    theirs = mean_iou(torch.nn.functional.one_hot(pred[keep], 3).T[None, :, :, None],
                      torch.nn.functional.one_hot(target[keep], 3).T[None, :, :, None], num_classes=3,
                      input_format="one-hot", per_class=True)
    assert torch.allclose(theirs.double().flatten(), torch.tensor([0.5, 0.8, 2 / 3], dtype=torch.float64))


def test_a_class_absent_from_truth_and_prediction_has_no_iou_and_leaves_the_mean():
    m = segmentation_metrics(confusion(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), 3, 255), ["a", "b", "c"])
    assert m["iou"]["c"] is None and m["miou"] == 1.0


def test_median_frequency_weights_favour_rare_classes():
    w = class_weights([900, 90, 10, 0])
    assert w[1] == 1.0 and w[2] > w[1] > w[0] and w[3] == 0


class PixelWise(torch.nn.Module):
    """A segmenter whose output at a pixel depends on that pixel only: sliced and whole inference must agree."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)


def test_sliced_inference_blends_windows_into_what_one_pass_gives():
    image = torch.rand(3, 70, 95)
    pre = Preprocess(70, 70, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25])
    whole = LoadedSegmenter(PixelWise().eval(), ["a", "b", "c"], pre)
    sliced = LoadedSegmenter(PixelWise().eval(), ["a", "b", "c"], pre, tile={"size": 32, "overlap": 0.25})
    p = sliced.probabilities(image)
    assert p.shape == (3, 70, 95)
    assert torch.allclose(p, whole.probabilities(image), atol=1e-5)
    assert torch.allclose(p.sum(0), torch.ones(70, 95), atol=1e-5)


def test_init_starts_the_backbone_from_a_classification_run(masks, tmp_path):
    from helpers import make_image_folder

    classifier = resforge.train(make_image_folder(tmp_path / "cls", per_class=4, size=32), progress=False,
                                project=str(tmp_path), name="cls", epochs=1, model="resnet18", width=0.25,
                                img_size=32, batch_size=4, workers=0, amp="off")
    run = resforge.train(masks, progress=False, project=str(tmp_path), name="seg", epochs=1, init=classifier[
        "run_dir"], **{k: v for k, v in TINY.items() if k not in ("model", "width")})
    model, _ = load_model(run["run_dir"])
    assert model.spec()["backbone"] == "resnet18" and model.spec()["backbone_options"]["width"] == 0.25


def test_task_segment_trains_on_a_coco_folders_polygons_and_resumes_its_split(tmp_path):
    from helpers import make_detection_folder

    from resforge.data.masks import read_recorded_masks

    root = make_detection_folder(tmp_path / "coco", n=10)
    run = resforge.train(root, progress=False, project=str(tmp_path), name="c", epochs=1, task="segment", **TINY)
    _, meta = load_model(run["run_dir"])
    assert meta["task"] == "segment" and meta["classes"] == ["background", "square", "disc"]
    rows = (Path(run["run_dir"]) / "split.csv").read_text().splitlines()
    recorded = [str(Path(root, row.split(",", 1)[1])) for row in rows if row.startswith("val,")]
    again = read_recorded_masks(root, Path(run["run_dir"]) / "split.csv")
    assert recorded and [s.path for s in again.val] == recorded


def test_a_run_on_windows_records_them_and_predicts_by_slices(tmp_path):
    root = make_mask_folder(tmp_path / "big", n=6, size=96)
    run = resforge.train(root, progress=False, project=str(tmp_path), name="t", epochs=1, tile=48,
                         **{**TINY, "img_size": 48})
    _, meta = load_model(run["run_dir"])
    assert meta["tile"] == {"size": 48, "overlap": 0.2}
    loaded = load_segmenter(run["run_dir"], "cpu")
    calls = []
    loaded.net.model.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)) and None)
    assert loaded.segment(torch.rand(3, 96, 96)).shape == (96, 96)
    assert calls == [(8, 3, 48, 48), (1, 3, 48, 48)]  # a 3 x 3 grid of overlapping 48-px windows, 8 a call


def test_the_dice_loss_is_zero_for_a_perfect_prediction_and_skips_ignored_pixels():
    from resforge.tasks.segment import SegmentationLoss, soft_dice

    target = torch.tensor([[[0, 1], [1, 255]]])
    perfect = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [1, 0]]]), 2).permute(0, 3, 1, 2).float() * 50
    assert soft_dice(perfect, target, 255) < 1e-6  # the ignored pixel's prediction does not count
    wrong = perfect.flip(1)
    assert soft_dice(wrong, target, 255) > 0.6
    ce = SegmentationLoss(255)({"out": wrong}, target, None)
    both = SegmentationLoss(255, dice=True)({"out": wrong}, target, None)
    assert both == pytest.approx(ce + soft_dice(wrong, target, 255))
