"""Detection: a folder of images with box annotations (COCO, VOC or YOLO) in, boxes (and instance masks) out,
measured in COCO AP by pycocotools.

The network is one of torchvision's detectors over a resforge ResNet (`models.detection`); it resizes and
normalises inside, so samples are images at their own size with torchvision's target dicts, and its training
forward pass takes the targets and returns its losses, which the criterion adds up.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data.annotations import DetectionScan, Objects, read_recorded_split, scan_detection
from ..data.objects import ObjectsDataset, collate_objects, detection_transform
from ..data.profile import flip_hazard
from ..data.tiles import TiledDataset, tile_grid, tile_samples
from ..data.transforms import Preprocess, imagenet_stats
from ..device import to_device
from ..errors import ConfigError, DataError
from ..evaluation.coco import detection_metrics, missed_objects
from ..evaluation.plots import plot_image_grid, plot_pr_curves
from ..io import write_json
from ..models import load_model
from ..models.detection import DETECTOR_CLASSES, Detector, DetectorSpec
from ..models.spec import given_options
from ..models.weights import load_into, read_checkpoint
from ..report import markdown_table
from ..training.auto import Chooser
from .base import Datasets, Forward, Task
from .classify import adopt_backbone, adopt_dense
from .detect_infer import LoadedDetector, detection_figures, load_detector

log = logging.getLogger("resforge")

MAX_SIZE_RATIO = 1333 / 800  # torchvision's longer-side cap against the shorter side
GRID_IMAGES = 8  # images in each figure of detections
MAX_AUTO_SIZE = 512  # the largest input the recipe picks: a CPU budget affords no more
BATCH = 4  # the recipe's batch (torchvision's references train 2 images per GPU)
TURN_EVIDENCE = 20  # boxes of a class that rate its shape for any_way_up
TURN_BALANCE = (0.3, 0.7)  # share of wide boxes a class without an up side has (people: 0.1; aerial trees: 0.34)
RATED_OBJECTS = 500  # validation objects below which the recipe keeps the last epoch rather than the best
REPORTED = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar100")


class DetectionLoss(nn.Module):
    """The detector's own losses (classification, box regression, objectness, masks), added up."""

    def forward(self, outputs: dict[str, torch.Tensor], targets: Any, images: Any) -> torch.Tensor:
        return sum(outputs.values())


@dataclass
class DetectionReport:
    """A split's COCO figures: AP@[.5:.95] (`map`), AP@.5, AP@.75, by size, AR, and AP per class."""

    num_images: int
    num_objects: int
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        m = self.metrics
        table = markdown_table(["images", "objects", "AP", "AP50", "AP75", "AP small", "AP medium", "AP large",
                                "AR100"], [[self.num_images, self.num_objects] + [f"{m[k]:.3f}" for k in REPORTED]])
        classes = markdown_table(["class", "AP"], [[c, "-" if ap is None else f"{ap:.3f}"]
                                                   for c, ap in m["per_class"].items()])
        return f"{table}\n\n{classes}"


def detector_options(cfg: Config, num_classes: int, pre_mean: list[float], pre_std: list[float]) -> dict[str, Any]:
    """The constructor keywords of the detector `cfg` describes, for `num_classes` object classes."""
    m, d = cfg.model, cfg.data
    spec = {k: v for k, v in asdict(cfg.detect).items() if k != "detector"}
    return {"num_classes": num_classes + 1, "backbone": m.name,
            "backbone_options": {**given_options(m), "in_chans": d.in_chans},
            "image_mean": pre_mean, "image_std": pre_std, "min_size": d.img_size,
            "max_size": round(d.img_size * MAX_SIZE_RATIO), **spec}


def load_detection_weights(model: Detector, source: str) -> list[str]:
    """A torchvision detection checkpoint (or one of a classifier, for the backbone alone) into `model`; what
    does not fit is named (weights_only reading, safetensors or .pth)."""
    state, _ = read_checkpoint(source)
    if any(k.startswith("backbone.body.") for k in state):
        return load_into(model, state, source)
    body = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    own = model.body.state_dict()
    problems = [k for k in own if k not in body and not k.endswith("num_batches_tracked")]
    problems += [k for k in body if k not in own or body[k].shape != own[k].shape]
    if problems:
        raise ConfigError(f"{source} is neither a detection checkpoint (backbone.body.* keys) nor one of this "
                          f"backbone ({model.spec()['backbone']}): e.g. {', '.join(problems[:3])} do not match")
    model.body.load_state_dict(body, strict=False)
    return [f"backbone weights from {source}; the pyramid and heads start fresh"]


class Detection(Task):
    name: ClassVar[str] = "detect"
    train_figures: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[str, ...]] = ("val_map50", "val_map")

    def build_model(self, cfg: Config, num_classes: int, pretrained: bool = True) -> nn.Module:
        if cfg.data.normalize == "dataset":
            raise ConfigError("data.normalize dataset: a detector normalises inside with fixed statistics; use "
                              "imagenet (the default) or none")
        chans = cfg.data.in_chans
        mean, std = ([0.0] * chans, [1.0] * chans) if cfg.data.normalize == "none" else imagenet_stats(chans)
        model = DETECTOR_CLASSES[cfg.detect.detector](**detector_options(cfg, num_classes, mean, std))
        if pretrained and cfg.model.pretrained:
            for note in load_detection_weights(model, cfg.model.pretrained):
                log.info(note)
        if pretrained and cfg.model.init_from:
            classifier, _ = load_model(cfg.model.init_from)
            body = {k: v for k, v in classifier.state_dict().items() if k in model.body.state_dict()}
            try:
                model.body.load_state_dict(body)  # every key: the architecture was adopted from it
            except RuntimeError:
                raise ConfigError(f"--init {cfg.model.init_from}: its network has other widths than a "
                                  f"{cfg.model.name} (pruned or factorised?): start from an unchanged classifier"
                                  ) from None
            log.info("backbone from the classifier %s; the pyramid and heads start fresh", cfg.model.init_from)
        return model

    def adopt_init(self, cfg: Config) -> tuple[Detector, dict[str, Any]] | None:
        """A detector to go on from (a compression run's start: pruned, say), whose architecture, input size
        and tiles become the run's; else a classification run whose network becomes the backbone."""
        model, meta = load_model(cfg.model.init_from)
        if not isinstance(model, Detector):
            adopt_backbone(cfg, "a detector")
            return None
        adopt_dense(cfg, model, meta, "detect", "detector", DetectorSpec, model.spec()["min_size"])
        return model, meta

    def scan(self, cfg: Config, split_csv: str | os.PathLike | None) -> DetectionScan:
        d = cfg.data
        if split_csv is None:
            return scan_detection(d.root, val_split=d.val_split, seed=d.split_seed, max_pixels=d.max_pixels)
        return read_recorded_split(d.root, split_csv, max_pixels=d.max_pixels)

    def datasets(self, cfg: Config, scan: DetectionScan, pre: Preprocess, device: torch.device) -> Datasets:
        d, masks = cfg.data, cfg.detect.detector == "maskrcnn"
        if d.decode == "gpu":
            raise ConfigError("data.decode gpu decodes classification batches; detection decodes on the CPU")
        a = cfg.augment
        unused = [name for name, given in (("augment.auto_augment", a.auto_augment not in (None, "none")),
                                           ("augment.random_erasing", bool(a.random_erasing)),
                                           ("augment.noise", bool(a.noise))) if given]
        if unused:
            raise ConfigError(f"{', '.join(unused)}: classification augmentation that detection does not do "
                              "(it flips, turns, jitters colours and zooms out: augment.hflip, vflip, rotation 90, "
                              "color_jitter, scale)")
        options = {"masks": masks, "max_pixels": d.max_pixels, "mode": "L" if d.in_chans == 1 else "RGB"}
        if d.tile:  # validated on every tile of the val images: the epochs' figures; the run's end slices
            tiles = tile_samples(scan.train, d.tile, d.overlap, seed=cfg.train.seed)
            train = TiledDataset(tiles, detection_transform(cfg.augment), seed=cfg.train.seed, **options)
            val = TiledDataset(tile_samples(scan.val, d.tile, d.overlap, keep_empty=1.0), detection_transform(None),
                               **options)
        else:
            train = ObjectsDataset(scan.train, detection_transform(cfg.augment), seed=cfg.train.seed, **options)
            val = ObjectsDataset(scan.val, detection_transform(None), **options)
        return Datasets(train, val, train_collate=collate_objects, val_collate=collate_objects)

    def record(self, cfg: Config) -> dict[str, Any]:
        d = cfg.data
        return {"tile": {"size": d.tile, "overlap": d.overlap}} if d.tile else {}

    def random_batch(self, cfg: Config, num_classes: int, device: torch.device) -> tuple[list, list]:
        d, g = cfg.data, torch.Generator().manual_seed(0)
        size = d.img_size
        images, targets = [], []
        for _ in range(d.batch_size):
            xy = torch.rand(2, generator=g) * size / 2
            box = torch.cat([xy, xy + size / 4]).unsqueeze(0)
            target = {"boxes": box, "labels": torch.randint(1, num_classes + 1, (1,), generator=g)}
            if cfg.detect.detector == "maskrcnn":
                target["masks"] = torch.zeros(1, size, size, dtype=torch.uint8)
                target["masks"][0, int(xy[1]):int(xy[1] + size / 4), int(xy[0]):int(xy[0] + size / 4)] = 1
            images.append(torch.rand(d.in_chans, size, size, generator=g))
            targets.append(target)
        return to_device(images, device), to_device(targets, device)

    def fit_recipe(self, cfg: Config, scan: DetectionScan, pace: Callable[[Config], float]) -> dict[str, str]:
        choose = Chooser(cfg)
        started = bool(cfg.model.pretrained or cfg.model.init_from)
        if not started:
            choose("model.name", "resnet18", "trained from scratch: torchvision's own recipe reached AP50 0.115 with "
                                             "R18-FPN against 0.060 with R50-FPN in 10 CPU minutes on aerial trees")
        images = scan.train + scan.val
        short = median(min(o.width, o.height) for o in images)
        size = int(min(MAX_AUTO_SIZE, max(128, 32 * round(short / 32))))
        objects = [(min(o.width, o.height), min(b[2] - b[0], b[3] - b[1])) for o in images for b in o.boxes]
        if objects and not cfg.data.tile:
            scene, box = median(s for s, _ in objects), median(b for _, b in objects)
            if scene > 1.5 * size and box * size / scene < 32:
                choose("data.tile", size, f"the median object, {box:.0f} px in a {scene:.0f}-px image, would shrink "
                                          f"to {box * size / scene:.0f} px in one {size}-px pass: tiles keep it whole")
        tile = cfg.data.tile
        if tile:
            choose("data.img_size", tile, "tiles are seen at their full resolution")
        else:
            choose("data.img_size", size, f"the images' median shorter side ({short:g} px), a multiple of 32 within "
                                          f"128-{MAX_AUTO_SIZE} (the detector resizes each image to it)")
        size = cfg.data.img_size
        boxes = [min(b[2] - b[0], b[3] - b[1]) * (size / tile if tile else size / min(o.width, o.height))
                 for o in images for b in o.boxes]
        if cfg.detect.detector in ("fasterrcnn", "maskrcnn"):
            choose("detect.fpn_channels", 128, "a 128-channel pyramid: its finest level and the box head cost most of "
                                               "a step at 256 (a step at 128 takes a third of the time on a CPU)")
            choose("detect.rois", 256, "256 sampled proposals an image train the box head at half its cost")
        if boxes and cfg.detect.detector != "fcos":
            small = sorted(boxes)[len(boxes) // 10]
            base = max(8, 2 ** math.floor(math.log2(max(small, 1))))
            sizes = [base * 2 ** k for k in range(5)]
            choose("detect.anchor_sizes", sizes, f"the smallest tenth of the boxes are {small:.0f} px at this size, "
                                                 "the smallest anchors a power of two below")
        units = (sum(len(tile_grid(o.width, o.height, tile, cfg.data.overlap)) for o in scan.train) if tile
                 else len(scan.train))
        batch = min(BATCH, units)
        choose("data.batch_size", batch, f"{batch} {'tiles' if tile else 'images'} a step (of {units}): detection "
                                         "steps are costly, and a budget gives more of them with small batches")
        choose("optim.optimizer", "adamw", "AdamW converges faster than SGD in short detection budgets")
        base, why = (1e-4, "starting weights are kept close") if started else \
            (1e-3, "from scratch: on unseen aerial trees 1e-3 reached AP50 0.15 where 1.4e-4 reached 0.11")
        choose("optim.lr", float(f"{base * math.sqrt(cfg.data.batch_size / BATCH):.3g}"),
               f"{base:g} at batch {BATCH}, x sqrt(batch/{BATCH}): {why}")
        choose("optim.weight_decay", 1e-4, "weight decay 1e-4")
        choose("optim.schedule", "cosine", "cosine decay to zero at the end of the budget")
        held = sum(len(o.boxes) for o in scan.val)
        if held < RATED_OBJECTS:
            choose("train.keep", "last", f"validation holds {held} objects, too few to rate epochs by (AP over so "
                                         "few moves more from epoch to epoch than training changes it): the last, "
                                         "annealed epoch is kept")
        warm = cfg.train.epochs > 4
        choose("optim.warmup_epochs", 1.0 if warm else 0.0,
               "a warm-up epoch" if warm else "no warm-up in a run of 4 epochs or fewer")
        choose("detect.frozen_bn", started, "frozen batch norm: the starting weights' statistics hold (small "
                                            "detection batches estimate them poorly)" if started else
               "batch norm trained: a backbone from scratch has no statistics to keep")
        hazard = flip_hazard(scan.classes, {})
        if hazard:
            choose("augment.hflip", 0.0, f"no flips: {hazard}")
        else:
            choose("augment.hflip", 0.5, "horizontal flips: objects keep their class mirrored")
        turned = any_way_up(scan)
        if turned and not hazard:
            choose("augment.vflip", 0.5, f"vertical flips: {turned}")
            choose("augment.rotation", 90.0, f"90-degree turns: {turned}")
        choose("augment.color_jitter", 0.5, "photometric distortion half the time: scenes differ in light and colour "
                                            "(with the turns, it took unseen aerial trees from AP50 0.060 to 0.111)")
        choose("augment.scale", [1.0, 1.0], "no zoom-out: objects keep the size they are found at (--scale 0.25 1 "
                                            "zooms out up to twice)")
        return choose.reasons

    def batch_transform(self, cfg: Config, num_classes: int) -> Callable[[Any, Any], tuple[Any, Any]]:
        if cfg.augment.mixup or cfg.augment.cutmix:
            raise ConfigError("augment.mixup and augment.cutmix mix classification batches; detection has neither")
        return lambda x, y: (x, y)

    def criterion(self, cfg: Config, classes: list[str], pre: Preprocess | None, device: torch.device,
                  amp_dtype: torch.dtype | None, memory_format: torch.memory_format) -> nn.Module:
        if cfg.train.teacher:
            raise ConfigError("train.teacher distils classifiers; detection has no distillation yet")
        if cfg.train.label_smoothing:
            raise ConfigError("train.label_smoothing smooths classification targets; detectors' losses take none")
        return DetectionLoss()

    def train_call(self, forward: nn.Module, x: Any, y: Any) -> Any:
        return forward(x, y)

    def batch_figures(self, outputs: Any, targets: Any) -> torch.Tensor:
        return torch.zeros(0)

    def validate(self, forward: Forward, loader: Any, prefix: str, world: Any) -> dict[str, float]:
        masks = False
        predictions, targets, sizes = [], [], []
        for x, y in loader:
            out = forward(x)
            masks = masks or "masks" in y[0]
            predictions += [{k: v.cpu() for k, v in o.items()} for o in out]
            targets += y
            sizes += [tuple(image.shape[-2:]) for image in x]
        shares = world.gather((predictions, targets, sizes))
        predictions, targets, sizes = ([item for share in shares for item in share[i]] for i in range(3))
        # categories without ground truth do not count in COCO's means: the largest label seen is enough
        num_classes = max([int(t["labels"].max()) for t in targets + predictions if len(t["labels"])] + [1])
        m = detection_metrics(predictions, targets, sizes, num_classes, masks=masks)
        row = {f"{prefix}_map": m["map"], f"{prefix}_map50": m["map50"], f"{prefix}_map75": m["map75"]}
        if masks:
            row[f"{prefix}_mask_map"] = m["mask_map"]
        return row

    def epoch_line(self, row: dict[str, float], num_classes: int) -> str:
        parts = [f"train loss {row['train_loss']:.3f}",
                 f"val AP {row['val_map']:.3f} AP50 {row['val_map50']:.3f} AP75 {row['val_map75']:.3f}"]
        if "val_mask_map" in row:
            parts.append(f"mask AP {row['val_mask_map']:.3f}")
        if "ema_val_map" in row:
            parts.append(f"ema AP {row['ema_val_map']:.3f}")
        return "  ".join(parts)

    def load_best(self, path: Path, device: torch.device, precision: str) -> LoadedDetector:
        return load_detector(path, str(device))

    def evaluate(self, predictor: LoadedDetector, samples: list, out_dir: Path, name: str, batch_size: int,
                 workers: int) -> DetectionReport:
        classes, masks = predictor.classes, predictor.model.detector == "maskrcnn"
        m, predictions, targets = detection_figures(predictor, samples, batch_size, workers)
        curves = {classes[c - 1]: p for c, p in m.pop("pr50").items()}
        m.pop("mask_pr50", None)
        m["per_class"] = {classes[c - 1]: ap for c, ap in m["per_class"].items()}
        if masks:
            m["mask_per_class"] = {classes[c - 1]: ap for c, ap in m["mask_per_class"].items()}
        report = DetectionReport(len(samples), sum(len(t["labels"]) for t in targets), m)
        write_json(Path(out_dir) / f"metrics_{name}.json", report.to_dict())
        plots = Path(out_dir) / "plots"
        plot_pr_curves(curves, plots / f"pr_{name}.png")
        dataset = ObjectsDataset(samples, detection_transform(None))
        shown = np.random.default_rng(0).permutation(len(samples))[:GRID_IMAGES].tolist()
        _plot_detections(dataset, predictions, shown, classes, plots / f"predictions_{name}.png",
                         f"{name}: ground truth (green) and detections scoring 0.5 or more (red)")
        missed = [missed_objects(p, t) for p, t in zip(predictions, targets)]
        worst = [i for i in np.argsort(missed, kind="stable")[::-1][:GRID_IMAGES].tolist() if missed[i]]
        if worst:
            _plot_detections(dataset, predictions, worst, classes, plots / f"worst_{name}.png",
                             f"{name}: the images with the most objects missed", missed)
        return report

    def report_data(self, cfg: Config, scan: DetectionScan) -> list[str]:
        splits = [s for s in ("train", "val", "test") if getattr(scan, s)]
        shown = scan.classes[:12] + (["..."] if len(scan.classes) > 12 else [])
        out = [f"- folder `{cfg.data.root}`: {scan.reason}; {len(scan.classes)} classes; validation: "
               f"{scan.val_source}", "",
               markdown_table(["split", "images", "without objects", "objects"] + shown,
                              [[s, len(getattr(scan, s)), sum(not o.labels for o in getattr(scan, s)),
                                sum(scan.box_counts(s))] + scan.box_counts(s)[:12] for s in splits]), ""]
        if scan.clipped:
            out += [f"- {scan.clipped} box(es) reached outside their image and were clipped", ""]
        if scan.skipped:
            out += [f"- {len(scan.skipped)} image(s) or annotation(s) skipped: see `skipped.csv` for each reason", ""]
        return out

    def report_results(self, results: dict[str, DetectionReport], run_dir: Path) -> list[str]:
        out = []
        for name, r in results.items():
            out += [f"### {name}", "", r.to_markdown(), "", f"![precision-recall](plots/pr_{name}.png)", "",
                    f"![predictions](plots/predictions_{name}.png)", ""]
            if (run_dir / "plots" / f"worst_{name}.png").exists():
                out += [f"![worst](plots/worst_{name}.png)", ""]
        return out

    def result_line(self, name: str, report: DetectionReport) -> str:
        m = report.metrics
        mask = f"  mask AP {m['mask_map']:.3f}" if "mask_map" in m else ""
        return (f"{name:<5} AP {m['map']:.3f}  AP50 {m['map50']:.3f}  AP75 {m['map75']:.3f}{mask}  "
                f"({report.num_images} images, {report.num_objects} objects)")


def _plot_detections(dataset: ObjectsDataset, predictions: list[dict[str, torch.Tensor]], shown: list[int],
                     classes: list[str], path: Path, title: str, missed: list[int] | None = None) -> None:
    """A grid of images with their ground truth and confident detections drawn (torchvision's
    `draw_bounding_boxes`), each titled with its counts."""
    from torchvision.utils import draw_bounding_boxes

    images, titles = [], []
    for i in shown:
        image, target = dataset.raw(i)
        p = predictions[i]
        keep = p["scores"] >= 0.5
        drawn = image.expand(3, -1, -1)
        if len(target["boxes"]):
            drawn = draw_bounding_boxes(drawn, target["boxes"], colors="lime", width=1)
        if keep.any():
            drawn = draw_bounding_boxes(drawn, p["boxes"][keep], [classes[int(c) - 1] for c in p["labels"][keep]],
                                        colors="red", width=1)
        images.append(drawn.permute(1, 2, 0).numpy())
        found = f"{int(keep.sum())} found / {len(target['labels'])}"
        titles.append(f"{Path(dataset.samples[i].path).name}: {found}" +
                      (f", {missed[i]} missed" if missed is not None else ""))
    plot_image_grid(images, titles, path, suptitle=title)


def any_way_up(scan: DetectionScan) -> str | None:
    """Why the objects look alike at any right angle (seen from above: aerial, microscopy), or None. Upright
    things have a side up: people and bottles are mostly taller than wide, cars and text lines wider; in a class
    without one, wide and tall boxes are both common (`TURN_BALANCE`)."""
    shapes: dict[int, list[bool]] = {}
    for o in scan.train:
        for (x0, y0, x1, y1), label in zip(o.boxes, o.labels):
            if x1 - x0 != y1 - y0:
                shapes.setdefault(label, []).append(x1 - x0 > y1 - y0)
    rated = {c: sum(wide) / len(wide) for c, wide in shapes.items() if len(wide) >= TURN_EVIDENCE}
    if not rated or len(rated) < len(shapes) / 2 or not all(TURN_BALANCE[0] <= w <= TURN_BALANCE[1]
                                                             for w in rated.values()):
        return None
    shares = ", ".join(f"{scan.classes[c]} {100 * w:.0f}%" for c, w in list(rated.items())[:3])
    return f"no class has a side up, objects seen from above (boxes wider than tall: {shares}; people: about 10%)"


def _as_model_classes(scan: DetectionScan, classes: list[str]) -> list[Objects]:
    """The images to evaluate (the test split, a given val split, else every image), labelled by the model's
    class indices; a class the model does not know is refused by name."""
    present = {scan.classes[i] for o in scan.train + scan.val + scan.test for i in o.labels}
    unknown = sorted(present - set(classes))
    if unknown:
        raise DataError(f"{scan.root} has objects of class(es) the model was not trained on: {', '.join(unknown)} "
                        f"(it knows {', '.join(classes)})")
    samples = scan.test or (scan.val if scan.val_source == "folder" else []) or scan.train
    index = {c: classes.index(c) for c in scan.classes if c in classes}
    return [replace(o, labels=[index[scan.classes[i]] for i in o.labels]) for o in samples]


def evaluate_detector(source: str | os.PathLike, data: str | os.PathLike, *, out: str | os.PathLike | None = None,
                      batch_size: int = 8, workers: int = 0, device: str = "auto",
                      tile: dict[str, Any] | None = None, backend: str = "auto") -> DetectionReport:
    """COCO metrics of a saved detector on an annotated folder (its test split, else a given val split, else all
    of it), written to `out` (default `<run>/eval-<folder>`) with `skipped.csv` when something was skipped;
    `tile` and `backend` as for `load_detector`."""
    loaded = load_detector(source, device, tile, backend)
    scan = scan_detection(data, val_split=0.0)
    samples = _as_model_classes(scan, loaded.classes)
    name = Path(data).resolve().name
    out = Path(out) if out else (Path(source) if Path(source).is_dir() else Path("runs")) / f"eval-{name}"
    if scan.skipped:
        scan.write_skipped_csv(out / "skipped.csv")
        log.warning("skipped %d image(s) or annotation(s) in %s; see %s", len(scan.skipped), data,
                    out / "skipped.csv")
    report = Detection().evaluate(loaded, samples, out, name, batch_size, workers)
    log.info("%s on %s: %s; details in %s", source, data, Detection().result_line(name, report), out)
    return report


