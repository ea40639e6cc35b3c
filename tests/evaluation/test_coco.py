"""COCO AP of torchvision-style predictions: the same figures pycocotools gives on annotation files written the
way COCO's own are, perfect predictions score 1, and nothing predicted scores 0 without failing."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from resforge.evaluation.coco import STATS, detection_metrics


def _fixture(seed=0, n=6, size=80):
    g = torch.Generator().manual_seed(seed)
    targets, predictions, sizes = [], [], []
    for _ in range(n):
        k = int(torch.randint(0, 4, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * size / 2
        wh = 4 + torch.rand(k, 2, generator=g) * size / 2
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(1, 4, (k,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
        noisy = boxes + torch.randn(k, 4, generator=g) * 3
        extra = torch.tensor([[1.0, 2.0, 30.0, 40.0]])
        predictions.append({"boxes": torch.cat([noisy, extra]), "labels": torch.cat([labels, torch.tensor([2])]),
                            "scores": torch.rand(k + 1, generator=g)})
        sizes.append((size, size + 10))
    return predictions, targets, sizes


def _reference(tmp_path, predictions, targets, sizes):
    """pycocotools on files: ground truth and results in COCO's own JSON form (x, y, width, height)."""
    images, anns, results = [], [], []
    for i, (t, p, (h, w)) in enumerate(zip(targets, predictions, sizes)):
        images.append({"id": i + 100, "height": h, "width": w})
        for b, c in zip(t["boxes"].tolist(), t["labels"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i + 100, "category_id": c, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b, c, s in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist()):
            results.append({"image_id": i + 100, "category_id": c, "score": s,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                  "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "gt.json"))
        e = COCOeval(gt, gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_the_figures_are_those_of_pycocotools_on_coco_files(tmp_path):
    predictions, targets, sizes = _fixture()
    ours = detection_metrics(predictions, targets, sizes, num_classes=3)
    reference = _reference(tmp_path, predictions, targets, sizes)
    assert [ours[k] for k in STATS] == pytest.approx([max(v, 0.0) for v in reference], abs=1e-9)
    assert 0.1 < ours["map50"] < 1.0  # noisy boxes and a false positive: neither nothing nor everything right
    present = [ap for ap in ours["per_class"].values() if ap is not None]
    assert np.mean(present) == pytest.approx(ours["map"], abs=1e-9)


def test_perfect_predictions_score_one_and_none_score_zero():
    _, targets, sizes = _fixture(seed=1)
    perfect = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    assert detection_metrics(perfect, targets, sizes, 3)["map"] == pytest.approx(1.0)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
             for _ in targets]
    m = detection_metrics(empty, targets, sizes, 3)
    assert m["map"] == 0.0 and m["mar100"] == 0.0


def test_mask_ap_is_measured_on_the_masks_not_the_boxes():
    h, w = 40, 40
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    mask[0, 5:25, 5:25] = 1
    target = {"boxes": torch.tensor([[5.0, 5.0, 25.0, 25.0]]), "labels": torch.tensor([1]), "masks": mask}
    right = {"boxes": target["boxes"], "labels": torch.tensor([1]), "scores": torch.tensor([0.9]),
             "masks": mask[None].float()}
    wrong_mask = torch.zeros(1, 1, h, w)
    wrong_mask[0, 0, 5:25, 5:10] = 1.0  # a quarter of the object: the box is right, the mask is not
    m = detection_metrics([right], [target], [(h, w)], 1, masks=True)
    assert m["map"] == pytest.approx(1.0) and m["mask_map"] == pytest.approx(1.0)
    m = detection_metrics([{**right, "masks": wrong_mask}], [target], [(h, w)], 1, masks=True)
    assert m["map"] == pytest.approx(1.0) and m["mask_map"] == 0.0


def test_missed_objects_counts_what_no_confident_detection_of_its_class_covers():
    from resforge.evaluation.coco import missed_objects

    target = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]),
              "labels": torch.tensor([1, 1, 2])}
    prediction = {"boxes": torch.tensor([[0.0, 0, 10, 11], [20, 20, 30, 30], [40, 40, 50, 50]]),
                  "labels": torch.tensor([1, 2, 2]), "scores": torch.tensor([0.9, 0.9, 0.3])}
    assert missed_objects(prediction, target) == 2  # the second: wrong class; the third: not confident
    assert missed_objects(prediction, target, score=0.2) == 1
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    assert missed_objects(empty, target) == 3 and missed_objects(prediction, {**empty}) == 0


def test_a_crowded_image_is_measured_on_all_its_objects_not_coco_s_first_100():
    xy = torch.arange(150, dtype=torch.float32)[:, None] * torch.tensor([[6.0, 0.0]])
    boxes = torch.cat([xy, xy + 5], 1)  # 150 disjoint 5-px boxes in a row
    target = {"boxes": boxes, "labels": torch.ones(150, dtype=torch.int64)}
    perfect = {**target, "scores": torch.linspace(1, 0.5, 150)}
    m = detection_metrics([perfect], [target], [(10, 900)], 1)
    assert m["map50"] == pytest.approx(1.0) and m["mar100"] == pytest.approx(1.0)  # 100 would cap recall at 2/3
    assert m["map"] == pytest.approx(1.0)
