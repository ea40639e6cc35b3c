"""Classification: a folder of class folders in, class probabilities out, measured in top-k accuracy."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, get_option, set_option
from ..data.folder import ImageFolderScan, scan_folder, scan_recorded_split
from ..data.gpu_decode import BatchDecoder, EncodedDataset, collate
from ..data.loader import ImageDataset
from ..data.transforms import BatchMix, Preprocess, eval_transform, train_transform
from ..device import autocast
from ..errors import ConfigError, ResforgeError
from ..evaluation.evaluate import evaluate_samples
from ..evaluation.metrics import ClassificationReport, topk_correct, topk_hits
from ..models import create_model, load_model
from ..models.weights import update_sidecar
from ..models.resnet import ResNet
from ..models.spec import ARCHITECTURE, given_options
from ..report import markdown_table
from ..runtime.inference import infer
from ..runtime.predictor import Predictor
from ..runtime.profile import MIN_PROFILE, profile_model
from ..training.auto import fit_recipe
from ..training.losses import ClassificationLoss, DistillationLoss
from .base import Datasets, Forward, Task

log = logging.getLogger("resforge")


class Classification(Task):
    name: ClassVar[str] = "classify"
    train_figures: ClassVar[tuple[str, ...]] = ("top1",)
    metrics: ClassVar[tuple[str, ...]] = ("val_top1", "val_loss")

    def build_model(self, cfg: Config, num_classes: int, pretrained: bool = True) -> nn.Module:
        m, d = cfg.model, cfg.data
        small_input = m.small_input if m.small_input is not None else d.img_size <= 64
        return create_model(m.name, num_classes=num_classes, pretrained=m.pretrained if pretrained else None,
                            **{**given_options(m), "small_input": small_input, "in_chans": d.in_chans})

    def adopt_init(self, cfg: Config) -> tuple[nn.Module, dict[str, Any]]:
        model, meta = load_model(cfg.model.init_from)
        pre = meta["preprocess"]
        inputs = {"data.img_size": pre["img_size"], "data.in_chans": pre["in_chans"],
                  "data.interpolation": pre["interpolation"],
                  "data.crop_pct": round(pre["img_size"] / pre["resize_size"], 4)}
        adopt_options(cfg, {**architecture_of(cfg, meta), **inputs})
        return model, meta

    def scan(self, cfg: Config, split_csv: str | os.PathLike | None) -> ImageFolderScan:
        d = cfg.data
        if split_csv is None:
            return scan_folder(d.root, val_split=d.val_split, seed=d.split_seed, max_pixels=d.max_pixels)
        scan = scan_recorded_split(d.root, split_csv, max_pixels=d.max_pixels)
        if scan.new_files:
            log.warning("%d file(s) were added to %s since the run started; they are left out (listed in "
                        "skipped.csv), so the recorded split stays as it was (start a new run to use them)",
                        len(scan.new_files), d.root)
        return scan

    def datasets(self, cfg: Config, scan: ImageFolderScan, pre: Preprocess, device: torch.device) -> Datasets:
        d, seed = cfg.data, cfg.train.seed
        if d.tile:
            raise ConfigError("data.tile cuts detection images into tiles; a classifier sees each image whole")
        val = ImageDataset(scan.val, eval_transform(pre), pre, max_pixels=d.max_pixels)
        if d.decode == "gpu":  # training images decoded on the device: only the validation set is cached
            train = EncodedDataset(scan.train, pre, cfg.augment, seed=seed, max_pixels=d.max_pixels)
            return Datasets(train, val, BatchDecoder(pre, device, [path for path, _ in scan.train], d.max_pixels),
                            train_collate=collate, cacheable=[val])
        train = ImageDataset(scan.train, train_transform(pre, cfg.augment), pre, seed=seed, max_pixels=d.max_pixels)
        return Datasets(train, val, cacheable=[train, val])

    def random_batch(self, cfg: Config, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        d = cfg.data
        return (torch.randn(d.batch_size, d.in_chans, d.img_size, d.img_size, device=device),
                torch.randint(0, num_classes, (d.batch_size,), device=device))

    def fit_recipe(self, cfg: Config, scan: ImageFolderScan, pace: Callable[[Config], float]) -> dict[str, str]:
        return fit_recipe(cfg, scan, pace=pace)

    def batch_transform(self, cfg: Config, num_classes: int) -> BatchMix:
        return BatchMix(cfg.augment, num_classes)

    def criterion(self, cfg: Config, classes: list[str], pre: Preprocess | None, device: torch.device,
                  amp_dtype: torch.dtype | None, memory_format: torch.memory_format) -> nn.Module:
        t = cfg.train
        if not t.teacher:
            return ClassificationLoss(t.label_smoothing)
        teacher, meta = load_model(t.teacher)
        if meta["classes"] != classes:
            raise ConfigError(f"the teacher {t.teacher} knows other classes ({', '.join(meta['classes'][:6])}) than "
                              f"{cfg.data.root} ({', '.join(classes[:6])}): distil from a model trained "
                              "on these classes")
        if pre is not None:
            _check_teacher_input(t.teacher, meta["preprocess"], pre.to_dict())
        teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)

        def teach(x: torch.Tensor) -> torch.Tensor:
            with autocast(device, amp_dtype):
                return teacher(x)
        return DistillationLoss(teach, t.kd_alpha, t.kd_temperature, t.label_smoothing)

    def batch_figures(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return topk_hits(outputs.detach(), targets, (1,))

    def validate(self, forward: Forward, loader: Any, prefix: str, world: Any) -> dict[str, float]:
        logits, targets = infer(forward, loader)
        k = topk_correct(logits, targets, (1, 5)) if len(targets) else {1: 0, 5: 0}
        loss = F.cross_entropy(logits, targets, reduction="sum").item() if len(targets) else 0.0
        loss, top1, top5, n = world.sum([loss, k[1], k[5], len(targets)])
        return {f"{prefix}_loss": loss / n, f"{prefix}_top1": top1 / n, f"{prefix}_top5": top5 / n}

    def epoch_line(self, row: dict[str, float], num_classes: int) -> str:
        parts = [f"train loss {row['train_loss']:.3f} acc {row['train_top1']:.1%}",
                 f"val loss {row['val_loss']:.3f} top1 {row['val_top1']:.1%} "
                 f"top{min(5, num_classes)} {row['val_top5']:.1%}"]
        if "ema_val_top1" in row:
            parts.append(f"ema top1 {row['ema_val_top1']:.1%}")
        return "  ".join(parts)

    def load_best(self, path: Path, device: torch.device, precision: str) -> Predictor:
        return Predictor.load(path, "torch", str(device), precision)

    def evaluate(self, predictor: Any, samples: list, out_dir: Path, name: str, batch_size: int,
                 workers: int) -> ClassificationReport:
        return evaluate_samples(predictor, samples, out_dir, name=name, batch_size=batch_size, workers=workers)

    def profile(self, predictor: Predictor, scan: ImageFolderScan, best: Path, batch_size: int) -> None:
        if len(scan.val) < MIN_PROFILE:
            log.info("no monitoring profile: %d validation images, under the %d it needs", len(scan.val),
                     MIN_PROFILE)
            return
        try:
            profile = profile_model(predictor, [path for path, _ in scan.val], batch_size)
        except (ResforgeError, ValueError, np.linalg.LinAlgError) as e:  # the trained run stands without one
            log.warning("no monitoring profile: %s (resforge monitor RUN --profile DATA tries again)", e)
            return
        update_sidecar(best, profile=profile.to_dict())

    def report_data(self, cfg: Config, scan: ImageFolderScan) -> list[str]:
        out = [f"- folder `{cfg.data.root}`, {len(scan.classes)} classes, layout `{scan.layout}`; validation: "
               f"{scan.val_source}", "",
               markdown_table(["split", "images"] + scan.classes[:12] + (["..."] if len(scan.classes) > 12 else []),
                              [[s, sum(scan.counts(s))] + scan.counts(s)[:12] for s in ("train", "val", "test")
                               if getattr(scan, s)]), ""]
        if scan.skipped:
            out += [f"- {len(scan.skipped)} file(s) skipped as unreadable or not images: see `skipped.csv`", ""]
        return out

    def report_results(self, results: dict[str, ClassificationReport], run_dir: Path) -> list[str]:
        k = next(iter(results.values())).k if results else 5
        out = [markdown_table(["split", "images", "top-1", f"top-{k}", "macro F1"],
                              [[name, r.num_samples, f"{r.top1:.2%}", f"{r.top5:.2%}", f"{r.macro['f1']:.3f}"]
                               for name, r in results.items()]), ""]
        for name, r in results.items():
            out += [f"### {name}", "", r.to_markdown(), "",
                    f"![confusion](plots/confusion_{name}.png)", "",
                    f"![predictions](plots/predictions_{name}.png)", ""]
            if (run_dir / "plots" / f"mistakes_{name}.png").exists():
                out += [f"![mistakes](plots/mistakes_{name}.png)", ""]
        return out

    def result_line(self, name: str, report: ClassificationReport) -> str:
        return (f"{name:<5} top-1 {100 * report.top1:.2f}%  top-{report.k} {100 * report.top5:.2f}%  "
                f"macro F1 {report.macro['f1']:.3f}  ({report.num_samples} images)")


def _check_teacher_input(teacher: str, theirs: dict[str, Any], ours: dict[str, Any]) -> None:
    """The teacher sees the student's batches: the same channels and normalisation (a size may differ)."""
    differ = [k for k in ("in_chans", "mean", "std") if theirs[k] != ours[k]]
    if differ:
        raise ConfigError(f"the teacher {teacher} expects other input ({', '.join(differ)}: "
                          f"{', '.join(str(theirs[k]) for k in differ)}; the student gets "
                          f"{', '.join(str(ours[k]) for k in differ)}): it must see the student's batches")
    if theirs["img_size"] != ours["img_size"]:
        log.warning("the teacher was trained at %d px and now sees the student's %d px", theirs["img_size"],
                    ours["img_size"])


def architecture_of(cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    """The model options a saved model's record fixes, as dotted keys; ConfigError when the user set them
    otherwise."""
    spec = meta["arch"]["kwargs"]
    arch = {"model.name": meta["arch"]["name"] or cfg.model.name,
            **{f"model.{k}": spec[k] for k in ARCHITECTURE if k in spec}}
    check_fixed(cfg, arch)
    return arch


def check_fixed(cfg: Config, fixed: dict[str, Any]) -> None:
    """ConfigError when the user set an option the --init model fixes (dotted keys) to another value."""
    clash = [k for k in fixed if k in cfg.user_set and get_option(cfg, k) != fixed[k]]
    if clash:
        named = ", ".join(f"{k} {fixed[k]}" for k in clash)
        raise ConfigError(f"{cfg.model.init_from} fixes the architecture ({named}): drop those options, or "
                          "start from weights with --pretrained")


def adopt_backbone(cfg: Config, role: str) -> None:
    """A classification run's network becomes the backbone of a `role` (transfer learning): its architecture and
    input channels are adopted here, its weights loaded when the task builds the model. Its input size is not:
    dense tasks size images their own way."""
    classifier, meta = load_model(cfg.model.init_from)
    if meta.get("task", "classify") != "classify" or not isinstance(classifier, ResNet):
        raise ConfigError(f"--init {cfg.model.init_from}: {role}'s backbone starts from a ResNet classification "
                          "run")
    adopt_options(cfg, {**architecture_of(cfg, meta), "data.in_chans": meta["preprocess"]["in_chans"]})


def adopt_dense(cfg: Config, model: nn.Module, meta: dict[str, Any], section: str, kind: str, spec_fields: Any,
                img_size: int) -> None:
    """A detector or segmenter to go on from (a compression run's start: pruned, say): its kind (`section.kind`),
    backbone, head options (`spec_fields`, a dataclass of them), input size and tiles become the run's, and an
    option the user set otherwise is named."""
    spec = model.spec()
    fixed = {f"{section}.{kind}": model.model_name, "model.name": spec["backbone"], "data.img_size": img_size,
             "data.in_chans": meta["preprocess"]["in_chans"],
             **{f"{section}.{f.name}": spec[f.name] for f in dataclasses.fields(spec_fields)},
             **{f"model.{k}": v for k, v in spec["backbone_options"].items() if k in ARCHITECTURE},
             **({"data.tile": meta["tile"]["size"], "data.overlap": meta["tile"]["overlap"]} if meta.get("tile")
                else {})}
    check_fixed(cfg, fixed)
    adopt_options(cfg, fixed)


def adopt_options(cfg: Config, options: dict[str, Any]) -> None:
    """Set what the user did not, marked as set (the auto recipe leaves it alone)."""
    for key, value in options.items():
        if key not in cfg.user_set:
            set_option(cfg, key, value)
            cfg.user_set.append(key)
