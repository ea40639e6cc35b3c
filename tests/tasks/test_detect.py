"""Detection as a task on the seam: a COCO folder is recognised and trained through the same loop, run directory,
checkpoint and report as classification; a kill -9 resumes; bad options for the task are refused."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DETECT_TINY as TINY
from helpers import make_detection_folder, train_logged

import resforge
from resforge.models import load_model
from resforge.models.detection import FasterRCNN



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_detection_folder(tmp_path_factory.mktemp("detect") / "shapes", n=20)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    return train_logged(shapes, progress=False, project=str(tmp_path_factory.mktemp("runs")), name="det", epochs=2,
                        **TINY)


def test_a_coco_folder_trains_as_detection_through_the_one_loop(trained):
    run, log_text = trained
    assert "task detect: annotations/instances.json is COCO JSON" in log_text
    run_dir = Path(run["run_dir"])
    assert run["metric"] == "val_map50"
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "val_map", "val_map50", "val_map75"} <= set(header) and "val_top1" not in header
    model, meta = load_model(run_dir)
    assert isinstance(model, FasterRCNN) and meta["classes"] == ["square", "disc"]
    assert model.spec()["min_size"] == 64 and model.spec()["backbone_options"]["width"] == 0.25
    results = json.loads((run_dir / "results.json").read_text())
    val = [row for row in (run_dir / "split.csv").read_text().splitlines() if row.startswith("val,")]
    assert results["val"]["num_images"] == len(val) > 0
    assert set(results["val"]["metrics"]["per_class"]) == {"square", "disc"}
    report = (run_dir / "report.md").read_text()
    assert "COCO JSON" in report and "### val\n\n| images | objects | AP | AP50 |" in report and "| square |" in report
    for plot in ("pr_val.png", "predictions_val.png", "history.png"):
        assert (run_dir / "plots" / plot).stat().st_size > 5_000 and f"plots/{plot}" in report + "plots/history.png"
    config = (run_dir / "config.yaml").read_text()
    assert "task: detect" in config  # the resolved task, so a resume needs no second look
    split = (run_dir / "split.csv").read_text().splitlines()
    assert split[0] == "split,path" and len(split) == 21


def test_the_detector_learns_the_shapes(shapes, tmp_path):
    """Not a benchmark: enough epochs on 16 tiny images that a detector which learns at all finds squares and
    discs (one that does not learn stays near 0)."""
    torch.manual_seed(0)
    run = resforge.train(shapes, progress=False, project=str(tmp_path), name="learn", epochs=12,
                         lr=2e-3, **TINY)
    curve = [round(row["val_map50"], 3) for row in run["history"]]
    assert max(curve) > 0.2 and max(curve) > 3 * curve[0], curve  # it learns: AP50 climbs from near nothing


def test_a_killed_detection_run_resumes_where_it_stopped(shapes, tmp_path):
    project = tmp_path / "runs"
    script = textwrap.dedent(f"""
        import os, signal, resforge
        def kill(event, trainer):
            if event == "epoch_end" and trainer.epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        resforge.train({shapes!r}, progress=False, project={str(project)!r}, name="k", epochs=2, callbacks=[kill],
                       **{TINY!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    run_dir = project / "k"
    assert (run_dir / "last.ckpt").is_file() and not (run_dir / "results.json").exists()
    first = (run_dir / "metrics.csv").read_text().splitlines()
    run = resforge.train(resume=str(run_dir), progress=False)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[:2] == first and [row.split(",")[0] for row in rows[1:]] == ["1", "2"]  # epoch 2 only was added
    assert run["epochs"] == 2 and (run_dir / "results.json").is_file()


@pytest.mark.parametrize("options,message", [
    ({"mixup": 0.2}, "mixup"),
    ({"label_smoothing": 0.1}, "label_smoothing"),
    ({"detector": "retinanet", "heads": "v2"}, "v1 heads only"),
    ({"metric": "val_top1"}, "train.metric val_top1 is not a figure of detect: val_map50 or val_map"),
])
def test_classification_options_are_refused_for_detection_by_name(shapes, tmp_path, options, message):
    with pytest.raises(resforge.ConfigError, match=message):
        resforge.train(shapes, progress=False, project=str(tmp_path), name="bad", epochs=1, **{**TINY, **options})
    assert not (tmp_path / "bad" / "last.ckpt").exists()


def test_task_classify_overrides_what_the_folder_looks_like(shapes, tmp_path):
    # the COCO folder read as class folders: "annotations" holds no images, so it is a class without any
    with pytest.raises(resforge.DataError, match="class folder.* no readable images .*annotations"):
        resforge.train(shapes, progress=False, project=str(tmp_path), name="c", epochs=1, task="classify", **{
            k: v for k, v in TINY.items() if k != "fpn_channels"})


def test_the_cli_trains_a_detection_folder_and_says_which_task(shapes, tmp_path, caplog):
    from helpers import cli_flags

    from resforge.cli import main

    caplog.set_level("INFO", logger="resforge")
    assert main(["train", shapes, "--epochs", "1", "--project", str(tmp_path), "--name", "cli",
                 "--detector", "fcos", "--anchor-sizes", "8", "16", "32", "64", "128",
                 *cli_flags({**TINY, "fpn_channels": 64})]) == 0  # fcos's heads: 32 groups of 2 channels
    assert "task detect: annotations/instances.json is COCO JSON (--task overrides)" in caplog.text
    model, _ = load_model(tmp_path / "cli")
    assert type(model).__name__ == "FCOS" and model.anchor_generator.sizes[0] == (8,)


def test_eval_measures_a_detection_run_on_an_annotated_folder(trained, tmp_path):
    run, _ = trained
    # another folder whose classes come in another order: matched by name, not by index
    other = make_detection_folder(tmp_path / "other", n=6, seed=5, classes=("square", "disc"))
    coco = json.loads((Path(other) / "annotations" / "instances.json").read_text())
    coco["categories"] = [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}]  # ids swapped
    for a in coco["annotations"]:
        a["category_id"] = 3 - a["category_id"]
    (Path(other) / "annotations" / "instances.json").write_text(json.dumps(coco))
    report = resforge.evaluate(run["run_dir"], other, out=str(tmp_path / "eval"))
    assert report.num_images == 6 and set(report.metrics["per_class"]) == {"square", "disc"}
    written = json.loads((tmp_path / "eval" / "metrics_other.json").read_text())
    assert written["metrics"]["map50"] == report.metrics["map50"]
    # perfect predictions, through the same path, score 1: the folder's boxes and the model's labels line up
    from resforge.data.annotations import scan_detection
    from resforge.tasks.detect import Detection, _as_model_classes
    from resforge.tasks.detect_infer import LoadedDetector, load_detector

    loaded = load_detector(run["run_dir"], "cpu")
    samples = _as_model_classes(scan_detection(other, val_split=0.0), loaded.classes)
    first = next(a for a in coco["annotations"] if a["image_id"] == 1)
    assert loaded.classes[samples[0].labels[0]] == ("disc", "square")[first["category_id"] - 1]
    queue = list(samples)  # evaluation reads the images in order

    class Oracle(torch.nn.Module):
        detector = "fasterrcnn"

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # where evaluation finds the device

        def forward(self, images):
            truths = [queue.pop(0) for _ in images]
            return [{"boxes": torch.tensor(t.boxes).reshape(-1, 4), "scores": torch.ones(len(t.labels)),
                     "labels": torch.tensor(t.labels, dtype=torch.int64) + 1} for t in truths]

    perfect = Detection().evaluate(LoadedDetector(Oracle(), loaded.classes), samples, tmp_path / "o", "o", 2, 0)
    assert perfect.metrics["map"] == pytest.approx(1.0)
    unknown = make_detection_folder(tmp_path / "unknown", n=3, classes=("square", "star"))
    with pytest.raises(resforge.DataError, match="not trained on: star"):
        resforge.evaluate(run["run_dir"], unknown)


def test_predict_gives_boxes_as_json_csv_and_drawn_images(trained, shapes, tmp_path):
    from resforge.cli import main

    run, _ = trained
    images = sorted(str(p) for p in (Path(shapes) / "images").glob("*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    rows = resforge.predict(run["run_dir"], images + [str(broken)], conf=0.0, save_images=str(tmp_path / "drawn"))
    assert [r["path"] for r in rows] == images + [str(broken)] and "not an image" in rows[-1]["error"]
    for r in rows[:3]:
        assert r["objects"] and all(o["class"] in ("square", "disc") and 0 <= o["score"] <= 1 for o in r["objects"])
        assert all(0 <= v <= 64 for o in r["objects"] for v in o["box"])
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["000.png", "001.png", "002.png"]
    high = resforge.predict(run["run_dir"], images, conf=0.99)
    assert sum(len(r["objects"]) for r in high) < sum(len(r["objects"]) for r in rows[:3])
    out = tmp_path / "p.csv"
    assert main(["predict", run["run_dir"], *images, "--conf", "0", "--format", "csv", "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "path,class,score,x1,y1,x2,y2,error"
    assert len(lines) == 1 + sum(len(r["objects"]) for r in rows[:3])


def test_init_starts_the_backbone_from_a_classification_run(shapes, tmp_path):
    from helpers import make_image_folder

    classes = make_image_folder(tmp_path / "classes", classes=("a", "b"), per_class=6, size=32)
    cls_run = resforge.train(classes, progress=False, project=str(tmp_path), name="cls", epochs=1, model="resnet18",
                             width=0.25, variant="d", img_size=32, batch_size=4, workers=0, amp="off")
    det = resforge.train(shapes, progress=False, project=str(tmp_path), name="from-cls", epochs=1,
                         init=cls_run["run_dir"], **{k: v for k, v in TINY.items() if k not in ("model", "width")})
    detector, _ = load_model(det["run_dir"])
    assert detector.spec()["backbone_options"]["variant"] == "d"  # the classifier's architecture, adopted
    assert detector.spec()["min_size"] == 64  # but not its 32-px input size
    classifier, _ = load_model(cls_run["run_dir"])
    config = (Path(det["run_dir"]) / "config.yaml").read_text()
    assert "init_from" in config
    # the backbone trained on from the classifier's weights: the stem's first filters moved little from them
    start = classifier.stem_conv.weight
    assert not torch.equal(detector.stem_conv.weight, start)
    fresh = FasterRCNN(num_classes=3, backbone="resnet18d", backbone_options={"width": 0.25}).stem_conv.weight
    assert (detector.stem_conv.weight - start).abs().mean() < (fresh - start).abs().mean() / 5
    # a detector run goes on from itself, as a compression run's fine-tune does: its architecture is fixed
    with pytest.raises(resforge.ConfigError, match=r"fixes the architecture \(model.width 0.25\)"):
        resforge.train(shapes, progress=False, project=str(tmp_path), name="x", epochs=1, init=det["run_dir"],
                       **{**TINY, "width": 0.5})
    again = resforge.train(shapes, progress=False, project=str(tmp_path), name="again", epochs=1,
                           init=det["run_dir"], **TINY)
    assert load_model(again["run_dir"])[0].spec() == detector.spec()
    assert "variant: d" in (Path(again["run_dir"]) / "config.yaml").read_text()


def test_pretrained_takes_a_torchvision_detection_checkpoint_or_a_classifiers(tmp_path, caplog):
    from torchvision.models import resnet18
    from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    from resforge.config import config_for
    from resforge.tasks import Detection

    caplog.set_level("INFO", logger="resforge")
    theirs = TorchvisionFasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5),
                                   num_classes=91)
    torch.save(theirs.state_dict(), tmp_path / "coco.pth")
    cfg = config_for(str(tmp_path), "resnet18", None, None, {"model.pretrained": str(tmp_path / "coco.pth")})
    ours = Detection().build_model(cfg, 2)
    assert "its class layers (roi_heads.box_predictor) were replaced" in caplog.text
    assert torch.equal(ours.backbone.fpn.layer_blocks[0][0].weight, theirs.backbone.fpn.layer_blocks[0][0].weight)
    classifier = resnet18(num_classes=10)
    torch.save(classifier.state_dict(), tmp_path / "cls.pth")
    cfg = config_for(str(tmp_path), "resnet18", None, None, {"model.pretrained": str(tmp_path / "cls.pth")})
    ours = Detection().build_model(cfg, 2)
    assert torch.equal(ours.body.layer4[1].conv2.weight, classifier.layer4[1].conv2.weight)
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pth")
    cfg = config_for(str(tmp_path), "resnet18", None, None, {"model.pretrained": str(tmp_path / "other.pth")})
    with pytest.raises(resforge.ConfigError, match="neither a detection checkpoint"):
        Detection().build_model(cfg, 2)


def test_mask_rcnn_trains_on_polygons_and_is_measured_in_mask_ap(shapes, tmp_path):
    run = resforge.train(shapes, progress=False, project=str(tmp_path), name="masks", epochs=1,
                         detector="maskrcnn", **TINY)
    header = (Path(run["run_dir"]) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_mask_map" in header
    results = json.loads((Path(run["run_dir"]) / "results.json").read_text())["val"]["metrics"]
    assert {"mask_map", "mask_map50", "mask_per_class"} <= set(results)
    # the dataset's masks are the polygons, filled: a square's mask is its box
    from resforge.data.annotations import scan_detection
    from resforge.data.objects import ObjectsDataset, detection_transform

    scan = scan_detection(shapes)
    ds = ObjectsDataset(scan.train, detection_transform(None), masks=True)
    i = next(k for k, o in enumerate(scan.train) if 0 in o.labels)
    _, target = ds[i]
    k = target["labels"].tolist().index(1)
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][k])
    mask = target["masks"][k]
    assert mask[y1:y2, x1:x2].float().mean() > 0.9 and mask.sum() < 1.2 * (x2 - x1) * (y2 - y1)


def test_a_yolo_folder_with_split_folders_trains_the_same_way(tmp_path):
    from PIL import Image, ImageDraw

    root = tmp_path / "yolo"
    for split, n in (("train", 8), ("val", 3)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            im = Image.new("RGB", (64, 48), (20, 20, 20))
            ImageDraw.Draw(im).rectangle([10 + i, 8, 30 + i, 28], fill=(200, 200, 50))
            im.save(root / "images" / split / f"{i}.jpg")
            (root / "labels" / split / f"{i}.txt").write_text(f"0 {(20 + i) / 64} {18 / 48} {20 / 64} {20 / 48}\n")
    (root / "data.yaml").write_text("names: [box]\n")
    run = resforge.train(str(root), progress=False, project=str(tmp_path), name="y", epochs=1, **TINY)
    _, meta = load_model(run["run_dir"])
    assert meta["classes"] == ["box"] and meta["task"] == "detect"
    split = (Path(run["run_dir"]) / "split.csv").read_text().splitlines()
    assert sum(row.startswith("val,") for row in split) == 3  # the given split, not a drawn one


def test_tiles_train_on_crops_and_the_run_evaluates_and_predicts_by_slices(tmp_path):
    big = make_detection_folder(tmp_path / "big", n=6, size=160, negatives=0)
    run = resforge.train(big, progress=False, project=str(tmp_path), name="tiled", epochs=1, tile=64, overlap=0.25,
                         **{k: v for k, v in TINY.items() if k != "img_size"})
    loaded_spec, meta = load_model(run["run_dir"])
    assert meta["tile"] == {"size": 64, "overlap": 0.25} and loaded_spec.spec()["min_size"] == 64
    assert "img-size 64: tiles are seen at their full resolution" in (Path(run["run_dir"]) / "report.md").read_text()
    # the run's evaluation and predict both slice: a detector called on 64-px tiles only (and once whole)
    from resforge.tasks.detect_infer import load_detector

    loaded = load_detector(run["run_dir"], "cpu")
    seen = []
    real = loaded.model.forward
    loaded.model.forward = lambda images, targets=None: seen.extend(i.shape[-2:] for i in images) or real(images)
    loaded.detect([torch.rand(3, 160, 160)])
    assert sorted(set(seen)) == [(64, 64), (160, 160)] and seen.count((64, 64)) == 9
    rows = resforge.predict(run["run_dir"], [str(Path(big) / "images" / "000.png")], conf=0.0)
    assert all(0 <= v <= 160 for o in rows[0]["objects"] for v in o["box"])
    with pytest.raises(resforge.ConfigError, match="data.tile cuts detection images"):
        from helpers import make_image_folder

        resforge.train(make_image_folder(tmp_path / "cls"), progress=False, project=str(tmp_path), name="c",
                       epochs=1, tile=64, model="resnet18", width=0.25, img_size=32, workers=0)


def test_data_inspect_reads_a_detection_folder(shapes, tmp_path):
    from resforge.cli import main

    assert main(["data", "inspect", shapes, "--out", str(tmp_path / "inspect")]) == 0
    report = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    assert report["format"] == "coco" and report["classes"] == ["square", "disc"]
    assert report["negatives"]["train"] == 1 and report["images"]["train"] == 20
    assert {p.name for p in (tmp_path / "inspect").glob("*.png")} == {"box_sizes.png", "objects_per_class.png",
                                                                       "samples.png"}


def test_two_processes_validate_on_every_image_as_one(shapes, tmp_path):
    """Each process validates its share of the images; COCO AP does not add up, so the shares are gathered and
    measured once: the figures are one process's on the same weights."""
    from resforge.tasks.detect import Detection
    from resforge.tasks.detect_infer import load_detector
    from resforge.data.annotations import read_recorded_split

    run = resforge.train(shapes, progress=False, devices=2, project=str(tmp_path), name="ddp", epochs=1, **TINY)
    run_dir = Path(run["run_dir"])
    recorded = float((run_dir / "metrics.csv").read_text().splitlines()[1].split(",")[
        (run_dir / "metrics.csv").read_text().splitlines()[0].split(",").index("val_map50")])
    scan = read_recorded_split(shapes, run_dir / "split.csv")
    again = Detection().evaluate(load_detector(run_dir, "cpu"), scan.val, tmp_path / "again", "val", 4, 0)
    assert scan.val and again.metrics["map50"] == pytest.approx(recorded, abs=1e-6)


def test_mask_rcnn_predictions_carry_their_masks_as_rle(shapes, tmp_path):
    from pycocotools import mask as coco_mask

    run = resforge.train(shapes, progress=False, project=str(tmp_path), name="m", epochs=1, detector="maskrcnn",
                         **TINY)
    image = str(Path(shapes) / "images" / "000.png")
    rows = resforge.predict(run["run_dir"], [image], conf=0.0, save_images=str(tmp_path / "drawn"), tile=32,
                            overlap=0.5)
    objects = rows[0]["objects"]
    assert objects and all(o["mask"]["size"] == [64, 64] for o in objects)
    decoded = coco_mask.decode(objects[0]["mask"])
    assert decoded.shape == (64, 64) and set(np.unique(decoded)) <= {0, 1}
    assert (tmp_path / "drawn" / "000.png").is_file()


def test_classification_augmentation_is_refused_for_detection_by_name(shapes, tmp_path):
    with pytest.raises(resforge.ConfigError, match="augment.random_erasing.*detection does not do"):
        resforge.train(shapes, progress=False, project=str(tmp_path), name="x", epochs=1, random_erasing=0.2,
                       **TINY)


def test_the_recipe_tiles_large_images_whose_objects_would_vanish(tmp_path, caplog):
    caplog.set_level("INFO", logger="resforge")
    big = make_detection_folder(tmp_path / "big", n=4, size=800, negatives=0)
    coco = json.loads((Path(big) / "annotations" / "instances.json").read_text())
    for a in coco["annotations"]:  # 20-px objects: 13 px once the image is resized to 512
        a["bbox"] = [a["bbox"][0], a["bbox"][1], 20, 20]
    (Path(big) / "annotations" / "instances.json").write_text(json.dumps(coco))
    from resforge.config import config_for
    from resforge.data.annotations import scan_detection
    from resforge.tasks import Detection

    cfg = config_for(big, None, None, None, {})
    reasons = Detection().fit_recipe(cfg, scan_detection(big), pace=lambda c: 1.0)
    assert cfg.data.tile == 512 and cfg.data.img_size == 512
    assert "the median object, 20 px in a 800-px image, would shrink to 13 px" in reasons["data.tile"]
    small = make_detection_folder(tmp_path / "small", n=4)  # 64-px images: resized up, never tiled
    cfg = config_for(small, None, None, None, {})
    Detection().fit_recipe(cfg, scan_detection(small), pace=lambda c: 1.0)
    assert cfg.data.tile is None and cfg.data.img_size == 128


def _recipe_on(folder, shape, classes=None):
    """The recipe's choices for `folder` with every box reshaped by `shape(k) -> (w, h)` (its classes renamed)."""
    coco_file = Path(folder) / "annotations" / "instances.json"
    coco = json.loads(coco_file.read_text())
    for k, a in enumerate(coco["annotations"]):
        a["bbox"] = [a["bbox"][0], a["bbox"][1], *shape(k)]
    for c, name in zip(coco["categories"], classes or []):
        c["name"] = name
    coco_file.write_text(json.dumps(coco))
    from resforge.config import config_for
    from resforge.data.annotations import scan_detection
    from resforge.tasks import Detection

    cfg = config_for(folder, None, None, None, {})
    return cfg, Detection().fit_recipe(cfg, scan_detection(folder), pace=lambda c: 1.0)


def test_the_recipe_turns_objects_seen_from_above_and_keeps_upright_ones_upright(tmp_path):
    above = make_detection_folder(tmp_path / "above", n=30)
    cfg, reasons = _recipe_on(above, lambda k: (20, 12) if k % 2 else (12, 20))  # as often wide as tall
    assert cfg.augment.vflip == 0.5 and cfg.augment.rotation == 90 and cfg.augment.hflip == 0.5
    assert "no class has a side up" in reasons["augment.rotation"]
    upright = make_detection_folder(tmp_path / "upright", n=30)
    cfg, reasons = _recipe_on(upright, lambda k: (12, 24) if k % 5 else (24, 12))  # a fifth wide: people
    assert cfg.augment.vflip == 0 and cfg.augment.rotation == 0 and cfg.augment.hflip == 0.5
    assert "augment.rotation" not in reasons
    sided = make_detection_folder(tmp_path / "sided", n=30)
    cfg, reasons = _recipe_on(sided, lambda k: (20, 12) if k % 2 else (12, 20), ["left hand", "right hand"])
    assert cfg.augment.hflip == 0 and cfg.augment.rotation == 0 and "left hand" in reasons["augment.hflip"]


def test_the_recipe_keeps_the_last_epoch_when_validation_is_too_small_to_rate_epochs(shapes, tmp_path):
    from resforge.config import config_for
    from resforge.data.annotations import scan_detection
    from resforge.tasks import Detection

    cfg = config_for(shapes, None, None, None, {})
    scan = scan_detection(shapes)
    reasons = Detection().fit_recipe(cfg, scan, pace=lambda c: 1.0)
    held = sum(len(o.boxes) for o in scan.val)
    assert cfg.train.keep == "last" and f"validation holds {held} objects" in reasons["train.keep"]
    assert cfg.detect.fpn_channels == 128 and cfg.detect.rois == 256
    many = scan.__class__(**{**vars(scan), "val": scan.val * 300})  # the same images, now over 500 objects
    cfg = config_for(shapes, None, None, None, {})
    Detection().fit_recipe(cfg, many, pace=lambda c: 1.0)
    assert cfg.train.keep == "best"
