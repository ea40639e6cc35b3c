"""COCO detection metrics of predictions against targets, computed by pycocotools (the reference every
published box and mask AP is measured with): AP@[.5:.95], AP@.5, AP@.75, AP by object size, AR, and AP per class.

Targets and predictions are torchvision's dicts (boxes x1, y1, x2, y2 in pixels, labels 1..K, masks); they
are turned into a COCO dataset in memory, so no annotation file is needed and any folder format is measured
the same way.
"""

from __future__ import annotations

import collections
import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# COCOeval.stats, in its order
STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar1", "mar10", "mar100", "mar_small",
         "mar_medium", "mar_large")


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.double().reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1).tolist()


def mask_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Binary masks (N x H x W, or N x 1 x H x W probabilities cut at 0.5) as COCO's compressed RLE."""
    from pycocotools import mask as coco_mask

    m = masks.reshape(-1, *masks.shape[-2:])
    m = (m > 0.5) if m.is_floating_point() else m.bool()
    out = coco_mask.encode(np.asfortranarray(m.cpu().numpy().transpose(1, 2, 0).astype(np.uint8)))
    for r in out:
        r["counts"] = r["counts"].decode("ascii")
    return out


def coco_dataset(targets: Sequence[dict[str, torch.Tensor]], sizes: Sequence[tuple[int, int]], num_classes: int,
                 masks: bool = False) -> dict[str, Any]:
    """The ground truth as a COCO dataset: image i of height, width `sizes[i]`, categories 1..num_classes."""
    images, annotations = [], []
    for i, (t, (h, w)) in enumerate(zip(targets, sizes)):
        images.append({"id": i, "height": int(h), "width": int(w)})
        rles = mask_rle(t["masks"]) if masks else None
        crowd = t.get("iscrowd", torch.zeros(len(t["labels"]), dtype=torch.int64)).tolist()
        for k, (box, label) in enumerate(zip(_xywh(t["boxes"]), t["labels"].tolist())):
            ann = {"id": len(annotations) + 1, "image_id": i, "category_id": int(label), "bbox": box,
                   "area": box[2] * box[3], "iscrowd": int(crowd[k])}
            if rles is not None:
                from pycocotools import mask as coco_mask

                ann["segmentation"] = rles[k]
                ann["area"] = float(coco_mask.area(rles[k]))
            annotations.append(ann)
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c} for c in range(1, num_classes + 1)]}


def coco_results(predictions: Sequence[dict[str, torch.Tensor]], masks: bool = False) -> list[dict[str, Any]]:
    """The predictions as COCO's result list."""
    out = []
    for i, p in enumerate(predictions):
        rles = mask_rle(p["masks"]) if masks else None
        for k, (box, label, score) in enumerate(zip(_xywh(p["boxes"]), p["labels"].tolist(), p["scores"].tolist())):
            r = {"image_id": i, "category_id": int(label), "bbox": box, "score": float(score)}
            if rles is not None:
                r["segmentation"] = rles[k]
            out.append(r)
    return out


def evaluate_coco(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str = "bbox") -> dict[str, Any]:
    """COCOeval's twelve figures (named as STATS; 0 where there is nothing to measure) and AP@[.5:.95] per
    category id (None for a category without ground truth). AP and AR count up to 100 detections an image, as
    COCO does, or as many as the most crowded image holds objects (an aerial scene of 500 trees): "map" and
    "mar100" are at that count."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports by printing
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        detections = coco.loadRes(results) if results else COCO()
        if not results:
            detections.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            detections.createIndex()
        e = COCOeval(coco, detections, iou_type)
        crowded = max(collections.Counter(a["image_id"] for a in gt["annotations"]).values(), default=0)
        e.params.maxDets = [1, 10, max(100, crowded)]
        e.evaluate()
        e.accumulate()
        e.summarize()
    figures = {name: max(float(v), 0.0) for name, v in zip(STATS, e.stats)}
    precision = e.eval["precision"][:, :, :, 0, -1]  # IoU x recall x category, all areas, the most detections
    figures["map"] = mean_ap(e)
    per_class, curves = {}, {}
    for k, cat in enumerate(e.params.catIds):
        p = precision[:, :, k]
        per_class[cat] = float(p[p > -1].mean()) if (p > -1).any() else None
        if (p[0] > -1).any():  # precision at each of COCO's 101 recall points, at IoU 0.5
            curves[cat] = np.maximum(p[0], 0.0).round(4).tolist()
    return {**figures, "per_class": per_class, "pr50": curves}


def mean_ap(e: Any) -> float:
    """An accumulated COCOeval's AP@[.5:.95] at its last maxDets, all areas (summarize() reads it at 100
    detections whatever maxDets holds: -1 when 100 is not among them)."""
    precision = e.eval["precision"][:, :, :, 0, -1]
    return float(precision[precision > -1].mean()) if (precision > -1).any() else 0.0


def detection_metrics(predictions: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
                      sizes: Sequence[tuple[int, int]], num_classes: int, masks: bool = False) -> dict[str, Any]:
    """Box metrics (and `mask_`-prefixed mask metrics) of torchvision-style predictions against targets."""
    gt = coco_dataset(targets, sizes, num_classes, masks)
    out = evaluate_coco(gt, coco_results(predictions), "bbox")
    if masks:
        m = evaluate_coco(gt, coco_results(predictions, masks=True), "segm")
        out.update({f"mask_{k}": v for k, v in m.items()})
    return out


def missed_objects(prediction: dict[str, torch.Tensor], target: dict[str, torch.Tensor], score: float = 0.5,
                   iou: float = 0.5) -> int:
    """Objects of the target that no prediction of its class scoring `score` or more covers at `iou`."""
    from torchvision.ops import box_iou

    keep = prediction["scores"] >= score
    boxes, labels = prediction["boxes"][keep], prediction["labels"][keep]
    if not len(target["labels"]):
        return 0
    if not len(labels):
        return len(target["labels"])
    overlap = box_iou(target["boxes"].float(), boxes.float())
    same = target["labels"][:, None] == labels[None, :]
    return int((~((overlap >= iou) & same).any(1)).sum())
