"""Semantic segmentation: a folder of images beside class masks in, a class for every pixel out, measured in mIoU.

The network is a DeepLabV3(+) or FCN over a resforge ResNet (`models.segmentation`). Samples are normalised
images with H x W masks of class values; the loss is cross-entropy that skips the ignored value (with the
auxiliary head's at 0.5, as torchvision's reference weighs it). The figures come from one confusion matrix over
the split (`evaluation.segmentation`). Large images are trained on windows at full resolution and predicted on
by sliced inference, the windows' class probabilities blended where they overlap.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data.masks import (MaskDataset, MaskSample, MaskScan, collate_masks, overlay, palette, read_recorded_masks,
                          scan_masks)
from ..data.profile import flip_hazard
from ..data.transforms import Preprocess
from ..errors import ConfigError, DataError
from ..evaluation.plots import plot_image_grid
from ..evaluation.segmentation import confusion, segmentation_metrics
from ..io import atomic_path, write_json
from ..models import load_model
from ..models.segmentation import SEGMENTER_CLASSES, Segmenter, SegmenterSpec
from ..models.spec import given_options
from ..models.weights import load_into, read_checkpoint
from ..report import markdown_table
from ..training.auto import Chooser
from .base import Datasets, Forward, Task
from .classify import adopt_backbone, adopt_dense
from .segment_infer import LoadedSegmenter, load_segmenter

log = logging.getLogger("resforge")

AUX_WEIGHT = 0.5  # torchvision's reference
BATCH = 8  # at least 2: ASPP's image-pooling branch normalises a 1 x 1 map over the batch
MAX_AUTO_SIZE = 384  # the largest input the recipe picks: a CPU budget affords no more
GRID_IMAGES = 6  # images in each figure of predictions


class SegmentationLoss(nn.Module):
    """Cross-entropy over the pixels not ignored (class-weighted when `weight` is given), plus the soft Dice loss
    with `dice`, plus the auxiliary head's at `AUX_WEIGHT`."""

    def __init__(self, ignore_index: int, weight: torch.Tensor | None = None, dice: bool = False):
        super().__init__()
        self.ignore_index, self.dice = ignore_index, dice
        self.register_buffer("weight", weight, persistent=False)

    def _one(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = F.cross_entropy(logits, targets, self.weight, ignore_index=self.ignore_index)
        if self.dice:
            loss = loss + soft_dice(logits, targets, self.ignore_index)
        return loss

    def forward(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor, images: Any) -> torch.Tensor:
        loss = self._one(outputs["out"], targets)
        if "aux" in outputs:
            loss = loss + AUX_WEIGHT * self._one(outputs["aux"], targets)
        return loss


def soft_dice(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, eps: float = 1.0) -> torch.Tensor:
    """1 - the mean over classes of 2|P∩T| / (|P| + |T|), with P the softmax probabilities, over the pixels not
    ignored (Milletari et al. 2016, multi-class); a class absent from both the batch's truth and its predictions
    adds nothing but `eps`'s smoothing."""
    keep = (targets != ignore_index).unsqueeze(1)
    probs = logits.softmax(1) * keep
    truth = F.one_hot(torch.where(keep[:, 0], targets, 0), logits.shape[1]).permute(0, 3, 1, 2) * keep
    inter = (probs * truth).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + truth.sum((0, 2, 3))
    return 1 - ((2 * inter + eps) / (total + eps)).mean()


@dataclass
class SegmentationReport:
    """A split's figures: mIoU, pixel accuracy, mean Dice, IoU and Dice per class, the pixel confusion matrix."""

    num_images: int
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        m = self.metrics
        table = markdown_table(["images", "pixels", "mIoU", "pixel accuracy", "mean Dice"],
                               [[self.num_images, m["pixels"], f"{m['miou']:.3f}", f"{m['pixel_acc']:.3f}",
                                 f"{m['dice']:.3f}"]])
        classes = markdown_table(["class", "IoU", "Dice"],
                                 [[c, "-" if iou is None else f"{iou:.3f}",
                                   "-" if m["dice_per_class"][c] is None else f"{m['dice_per_class'][c]:.3f}"]
                                  for c, iou in m["iou"].items()])
        return f"{table}\n\n{classes}"


class Segmentation(Task):
    name: ClassVar[str] = "segment"
    train_figures: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[str, ...]] = ("val_miou",)
    counts: list[int] | None = None  # the training split's pixels per class (class weights): set by datasets()
    colors: list[tuple[int, int, int]] | None = None  # the folder's class colours, for the record: the same

    def build_model(self, cfg: Config, num_classes: int, pretrained: bool = True) -> nn.Module:
        m, s = cfg.model, cfg.segment
        spec = {k: v for k, v in asdict(s).items() if k in ("output_stride", "aux", "head_channels")}
        model = SEGMENTER_CLASSES[s.segmenter](num_classes=num_classes, backbone=m.name,
                                               backbone_options={**given_options(m), "in_chans": cfg.data.in_chans},
                                               **spec)
        if pretrained and m.pretrained:
            for note in load_segmentation_weights(model, m.pretrained):
                log.info(note)
        if pretrained and m.init_from:
            classifier, _ = load_model(m.init_from)
            try:
                model.body.load_state_dict(classifier.state_dict(), strict=False)
            except RuntimeError:
                raise ConfigError(f"--init {m.init_from}: its network has other widths than a {m.name} (pruned or "
                                  "factorised?): start from an unchanged classifier") from None
            log.info("backbone from the classifier %s; the head starts fresh", m.init_from)
        return model

    def adopt_init(self, cfg: Config) -> tuple[Segmenter, dict[str, Any]] | None:
        """A segmenter to go on from (a compression run's start: pruned, say), whose architecture, input size and
        windows become the run's; else a classification run whose network becomes the backbone."""
        model, meta = load_model(cfg.model.init_from)
        if not isinstance(model, Segmenter):
            adopt_backbone(cfg, "a segmenter")
            return None
        adopt_dense(cfg, model, meta, "segment", "segmenter", SegmenterSpec, meta["preprocess"]["img_size"])
        return model, meta

    def scan(self, cfg: Config, split_csv: str | os.PathLike | None) -> MaskScan:
        d, ignore = cfg.data, cfg.segment.ignore_index
        if split_csv is None:
            return scan_masks(d.root, ignore_index=ignore, val_split=d.val_split, seed=d.split_seed,
                              max_pixels=d.max_pixels)
        return read_recorded_masks(d.root, split_csv, ignore_index=ignore, max_pixels=d.max_pixels)

    def datasets(self, cfg: Config, scan: MaskScan, pre: Preprocess, device: torch.device) -> Datasets:
        d, a = cfg.data, cfg.augment
        if d.decode == "gpu":
            raise ConfigError("data.decode gpu decodes classification batches; segmentation decodes on the CPU")
        unused = [name for name, given in (("augment.auto_augment", a.auto_augment not in (None, "none")),
                                           ("augment.random_erasing", bool(a.random_erasing)),
                                           ("augment.noise", bool(a.noise))) if given]
        if unused:
            raise ConfigError(f"{', '.join(unused)}: classification augmentation that segmentation does not do "
                              "(it rescales, crops, flips, turns and jitters colours: augment.hflip, vflip, "
                              "rotation 90, color_jitter)")
        options = {"colors": scan.colors, "ignore_index": scan.ignore_index, "max_pixels": d.max_pixels,
                   "mode": pre.mode, "tile": d.tile}
        train = MaskDataset(scan.train, d.img_size, pre.mean, pre.std, augment=a, overlap=d.overlap,
                            seed=cfg.train.seed, **options)
        val = MaskDataset(scan.val, d.img_size, pre.mean, pre.std, **options)  # windows side by side, or whole
        collate = functools.partial(collate_masks, ignore_index=scan.ignore_index)
        self.counts, self.colors = scan.pixel_counts("train"), scan.colors  # for the criterion and the record
        return Datasets(train, val, train_collate=collate, val_collate=collate)

    def record(self, cfg: Config) -> dict[str, Any]:
        d = cfg.data
        out: dict[str, Any] = {"ignore_index": cfg.segment.ignore_index, "colors": self.colors}
        if d.tile:
            out["tile"] = {"size": d.tile, "overlap": d.overlap}
        return out

    def random_batch(self, cfg: Config, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        d, g = cfg.data, torch.Generator().manual_seed(0)
        size = d.tile or d.img_size
        x = torch.randn(d.batch_size, d.in_chans, size, size, generator=g)
        y = torch.randint(0, num_classes, (d.batch_size, size, size), generator=g)
        return x.to(device), y.to(device)

    def fit_recipe(self, cfg: Config, scan: MaskScan, pace: Callable[[Config], float]) -> dict[str, str]:
        choose = Chooser(cfg)
        started = bool(cfg.model.pretrained or cfg.model.init_from)
        if not started:
            choose("model.name", "resnet18", "trained from scratch on a CPU budget: ResNet-18 takes a fifth of "
                                             "ResNet-50's time a step")
        images = scan.train + scan.val
        short = median(min(s.width, s.height) for s in images)
        size = int(min(MAX_AUTO_SIZE, max(128, 32 * round(short / 32))))
        if not cfg.data.tile and short > 2 * size:
            choose("data.tile", size, f"the images' median shorter side is {short:g} px: {size}-px windows at full "
                                      "resolution keep fine structures a downscaled pass would lose")
        if cfg.data.tile:
            choose("data.img_size", cfg.data.tile, "windows are seen at their full resolution")
        else:
            choose("data.img_size", size, f"the images' median shorter side ({short:g} px), a multiple of 32 within "
                                          f"128-{MAX_AUTO_SIZE}: images are scaled to it, then jittered 0.5-2x")
        choose("segment.output_stride", 16, "a third of stride 8's cost, ASPP's rates halved")
        units = len(MaskDataset(scan.train, cfg.data.img_size, [0.0], [1.0], tile=cfg.data.tile,
                                overlap=cfg.data.overlap))
        batch = max(2, min(BATCH, units))
        choose("data.batch_size", batch, f"{batch} {'windows' if cfg.data.tile else 'images'} a step (of {units}; "
                                         "at least 2: ASPP normalises its pooled branch over the batch)")
        choose("optim.optimizer", "adamw", "AdamW converges faster than SGD in short budgets")
        choose("optim.lr", 1e-3 if not started else 1e-4,
               "1e-3 from scratch" if not started else "1e-4: the starting weights are kept close")
        choose("optim.weight_decay", 1e-4, "weight decay 1e-4")
        choose("optim.schedule", "cosine", "cosine decay to zero at the end of the budget")
        warm = cfg.train.epochs > 4
        choose("optim.warmup_epochs", 1.0 if warm else 0.0,
               "a warm-up epoch" if warm else "no warm-up in a run of 4 epochs or fewer")
        hazard = flip_hazard(scan.classes, {})
        choose("augment.hflip", 0.0 if hazard else 0.5, f"no flips: {hazard}" if hazard else
               "horizontal flips: a mirrored scene keeps its classes")
        choose("augment.color_jitter", 0.5, "photometric distortion half the time: scenes differ in light and colour")
        return choose.reasons

    def batch_transform(self, cfg: Config, num_classes: int) -> Callable[[Any, Any], tuple[Any, Any]]:
        if cfg.augment.mixup or cfg.augment.cutmix:
            raise ConfigError("augment.mixup and augment.cutmix mix classification batches; segmentation has neither")
        return lambda x, y: (x, y)

    def criterion(self, cfg: Config, classes: list[str], pre: Preprocess | None, device: torch.device,
                  amp_dtype: torch.dtype | None, memory_format: torch.memory_format) -> nn.Module:
        if cfg.train.teacher:
            raise ConfigError("train.teacher distils classifiers; segmentation has no distillation yet")
        if cfg.train.label_smoothing:
            raise ConfigError("train.label_smoothing smooths classification targets; use it with --task classify")
        weight = None
        if cfg.segment.class_weights and self.counts is not None:
            weight = class_weights(self.counts).to(device)
        return SegmentationLoss(cfg.segment.ignore_index, weight, dice=cfg.segment.loss == "ce+dice")

    def batch_figures(self, outputs: Any, targets: Any) -> torch.Tensor:
        return torch.zeros(0)

    def validate(self, forward: Forward, loader: Any, prefix: str, world: Any) -> dict[str, float]:
        matrix = None
        ignore = loader.dataset.ignore_index
        for x, y in loader:
            out = forward(x)["out"]
            if matrix is None:
                matrix = torch.zeros(out.shape[1], out.shape[1], dtype=torch.int64)
            matrix += confusion(out.argmax(1).cpu(), y, out.shape[1], ignore)
        total = sum(world.gather(matrix))
        m = segmentation_metrics(total, [str(k) for k in range(total.shape[0])])
        return {f"{prefix}_miou": m["miou"], f"{prefix}_pixel_acc": m["pixel_acc"]}

    def epoch_line(self, row: dict[str, float], num_classes: int) -> str:
        parts = [f"train loss {row['train_loss']:.3f}",
                 f"val mIoU {row['val_miou']:.3f} pixel acc {row['val_pixel_acc']:.3f}"]
        if "ema_val_miou" in row:
            parts.append(f"ema mIoU {row['ema_val_miou']:.3f}")
        return "  ".join(parts)

    def load_best(self, path: Path, device: torch.device, precision: str) -> LoadedSegmenter:
        return load_segmenter(path, str(device))

    def evaluate(self, predictor: LoadedSegmenter, samples: list[MaskSample], out_dir: Path, name: str,
                 batch_size: int, workers: int) -> SegmentationReport:
        k, ignore = len(predictor.classes), predictor.ignore_index
        dataset = MaskDataset(samples, predictor.pre.img_size, [0.0], [1.0], colors=predictor.colors,
                              ignore_index=ignore, mode=predictor.pre.mode)
        total = torch.zeros(k, k, dtype=torch.int64)
        per_image = []
        for i in range(len(samples)):
            image, mask = dataset.raw(i)
            matrix = confusion(predictor.segment(image.float() / 255), mask.as_subclass(torch.Tensor), k, ignore)
            total += matrix
            per_image.append(segmentation_metrics(matrix, predictor.classes)["miou"])
        m = segmentation_metrics(total, predictor.classes)
        report = SegmentationReport(len(samples), m)
        write_json(Path(out_dir) / f"metrics_{name}.json", report.to_dict())
        plots = Path(out_dir) / "plots"
        colors = palette(k, predictor.colors)
        _plot_iou(m["iou"], plots / f"iou_{name}.png")
        shown = sorted(np.random.default_rng(0).permutation(len(samples))[:GRID_IMAGES].tolist())
        _plot_overlays(predictor, dataset, shown, [Path(samples[i].path).name for i in shown], colors,
                       plots / f"predictions_{name}.png", f"{name}: image, ground truth, prediction")
        if len(samples) > GRID_IMAGES:
            worst = np.argsort(per_image, kind="stable")[:GRID_IMAGES].tolist()
            _plot_overlays(predictor, dataset, worst, [f"{Path(samples[i].path).name}: mIoU {per_image[i]:.2f}"
                                                       for i in worst],
                           colors, plots / f"worst_{name}.png", f"{name}: the images with the lowest mIoU")
        return report

    def report_data(self, cfg: Config, scan: MaskScan) -> list[str]:
        splits = [s for s in ("train", "val", "test") if getattr(scan, s)]
        shown = scan.classes[:12] + (["..."] if len(scan.classes) > 12 else [])

        def shares(split: str) -> list[str]:
            counts = scan.pixel_counts(split)
            total = max(sum(counts), 1)
            return [f"{100 * c / total:.1f}%" for c in counts[:12]]
        out = [f"- folder `{cfg.data.root}`: {scan.reason}; {len(scan.classes)} classes; validation: "
               f"{scan.val_source}; value {scan.ignore_index} ignored", "",
               markdown_table(["split", "images"] + [f"{c} (pixels)" for c in shown],
                              [[s, len(getattr(scan, s))] + shares(s) for s in splits]), ""]
        if scan.skipped:
            out += [f"- {len(scan.skipped)} image(s) skipped: see `skipped.csv` for each reason", ""]
        return out

    def report_results(self, results: dict[str, SegmentationReport], run_dir: Path) -> list[str]:
        out = []
        for name, r in results.items():
            out += [f"### {name}", "", r.to_markdown(), "", f"![IoU per class](plots/iou_{name}.png)", "",
                    f"![predictions](plots/predictions_{name}.png)", ""]
            if (run_dir / "plots" / f"worst_{name}.png").exists():
                out += [f"![worst](plots/worst_{name}.png)", ""]
        return out

    def result_line(self, name: str, report: SegmentationReport) -> str:
        m = report.metrics
        return (f"{name:<5} mIoU {m['miou']:.3f}  pixel acc {m['pixel_acc']:.3f}  Dice {m['dice']:.3f}  "
                f"({report.num_images} images)")


def class_weights(counts: list[int]) -> torch.Tensor:
    """Median-frequency balancing (Eigen and Fergus 2015): a class's weight is the median class frequency over
    its own, so rare classes count more; a class without pixels weighs 0."""
    freq = torch.tensor(counts, dtype=torch.float64)
    freq = freq / freq.sum().clamp(min=1)
    present = freq > 0
    weight = torch.zeros_like(freq)
    weight[present] = freq[present].median() / freq[present]
    return weight.float()


def load_segmentation_weights(model: Segmenter, source: str) -> list[str]:
    """A torchvision segmentation checkpoint (or a classifier's, for the backbone alone) into `model`; what does
    not fit is named (weights_only reading, safetensors or .pth)."""
    state, _ = read_checkpoint(source)
    if any(k.startswith("classifier.") for k in state) and any(k.startswith("backbone.") for k in state):
        return load_into(model, state, source)
    body = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    own = model.body.state_dict()
    problems = [k for k in own if k not in body and not k.endswith("num_batches_tracked")]
    problems += [k for k in body if k not in own or body[k].shape != own[k].shape]
    if problems:
        raise ConfigError(f"{source} is neither a segmentation checkpoint (backbone.* and classifier.* keys) nor "
                          f"one of this backbone ({model.spec()['backbone']}): e.g. {', '.join(problems[:3])} do "
                          "not match")
    model.body.load_state_dict(body, strict=False)
    return [f"backbone weights from {source}; the head starts fresh"]


def _plot_iou(iou: dict[str, float | None], path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(iou)
    values = [v or 0.0 for v in iou.values()]
    fig = Figure(figsize=(max(4.0, 0.5 * len(names) + 2), 3), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _plot_overlays(predictor: LoadedSegmenter, dataset: MaskDataset, shown: list[int], names: list[str],
                   colors: np.ndarray, path: Path, title: str) -> None:
    """Rows of image, ground truth and prediction, the classes laid over the image."""
    images, titles = [], []
    for i, name in zip(shown, names):
        image, truth = dataset.raw(i)
        pred = predictor.segment(image.float() / 255).numpy()
        hwc = image.permute(1, 2, 0).numpy()
        images += [hwc if hwc.shape[2] == 3 else hwc[..., 0], overlay(hwc, truth.numpy(), colors, dataset.ignore_index),
                   overlay(hwc, pred, colors, dataset.ignore_index)]
        titles += [name, "ground truth", "prediction"]
    plot_image_grid(images, titles, path, ncols=3, suptitle=title)


def _as_model_classes(scan: MaskScan, classes: list[str]) -> list[MaskSample]:
    """The images to evaluate (the test split, a given val split, else every image); the folder's classes must
    be the model's, in order (a mask's values are the class indices)."""
    if scan.classes[:len(classes)] != classes[:len(scan.classes)] or len(scan.classes) > len(classes):
        raise DataError(f"{scan.root} names its classes {', '.join(scan.classes)}; the model was trained on "
                        f"{', '.join(classes)}: mask values mean other classes")
    return scan.test or (scan.val if scan.val_source == "folder" else []) or scan.train


def evaluate_segmenter(source: str | os.PathLike, data: str | os.PathLike, *, out: str | os.PathLike | None = None,
                       device: str = "auto", tile: dict[str, Any] | None = None, backend: str = "auto",
                       precision: str = "fp32") -> SegmentationReport:
    """mIoU and the rest of a saved segmenter on a mask folder (its test split, else a given val split, else all
    of it), written to `out` (default `<run>/eval-<folder>`) with `skipped.csv` when something was skipped;
    `backend` and `precision` as for `load_segmenter`."""
    loaded = load_segmenter(source, device, tile, backend, precision)
    scan = scan_masks(data, ignore_index=loaded.ignore_index, val_split=0.0)
    samples = _as_model_classes(scan, loaded.classes)
    name = Path(data).resolve().name
    out = Path(out) if out else (Path(source) if Path(source).is_dir() else Path("runs")) / f"eval-{name}"
    if scan.skipped:
        scan.write_skipped_csv(out / "skipped.csv")
        log.warning("skipped %d image(s) in %s; see %s", len(scan.skipped), data, out / "skipped.csv")
    report = Segmentation().evaluate(loaded, samples, out, name, 1, 0)
    log.info("%s on %s: %s; details in %s", source, data, Segmentation().result_line(name, report), out)
    return report


