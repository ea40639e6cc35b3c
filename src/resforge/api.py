"""The public Python API; the CLI calls exactly these functions.

    import resforge
    run = resforge.train("data/birds", model="resnet50", recipe="finetune", pretrained="r50.pth", epochs=5)
    resforge.evaluate(run["run_dir"], "data/birds-test")
    resforge.predict(run["run_dir"], ["photo.jpg"])
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .compress.finetune import compression_run
from .compress.lowrank import factorize_model
from .compress.optimize import optimize as _optimize
from .compress.prune import check_target, describe, structured
from .compress import qat as _qat
from .compress.quantize import Quantized, check_calibration
from .compress.quantize import quantize as _quantize
from .config import AUTO_RECIPE, Config, build_config
from .data.folder import scan_images, thumbnail
from .data.inspect import FolderReport, inspect_folder
from .deploy.bench import bench
from .deploy.export import export
from .deploy.predictor import Predictor
from .device import precision_name
from .errors import ConfigError, DataError
from .evaluation.evaluate import evaluate_samples, labelled_samples
from .evaluation.metrics import ClassificationReport
from .evaluation.plots import plot_history, plot_image_grid, plot_lr_find
from .io import write_json
from .models.summary import summarize
from .report import write_run_report
from .training.lr_find import LRFindResult, check_range
from .training.lr_find import lr_find as _lr_find
from .training.sparsity import write_report as write_sparsity_report
from .training.sparsity import zip_bytes
from .training.trainer import Callback, Trainer

log = logging.getLogger("resforge")

__all__ = ["train", "prune", "lowrank", "quantize", "optimize", "evaluate", "predict", "lr_find", "inspect_data",
           "export", "bench", "Predictor"]


def _config(data: str | None, model: str | None, recipe: str | None, config: str | os.PathLike | None,
            options: dict[str, Any]) -> Config:
    overrides = dict(options)
    if data is not None:
        overrides["data.root"] = str(data)
    if model is not None:
        overrides["model.name"] = model
    return build_config(AUTO_RECIPE if recipe is None else recipe, config, overrides)


def train(data: str | os.PathLike | None = None, *, model: str | None = None, recipe: str | None = None,
          config: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          callbacks: list[Callback] = (), progress: bool = True, **options: Any) -> dict[str, Any]:
    """Train on an image folder and write a run directory; return the run's summary and results.

    Options are config fields, bare (`epochs=5`) or dotted (`**{"optim.lr": 0.01}`). With
    `resume=RUN_DIR`, the run continues from its `last.ckpt` (only epochs, patience, time_limit,
    device and workers may be given).
    """
    if resume is not None:
        if data is not None or model or recipe or config:
            raise ConfigError("resuming continues a run as it was configured: give no data folder, model, recipe "
                              "or config")
        trainer = Trainer.resume(resume, options, callbacks=callbacks, progress=progress)
    else:
        trainer = Trainer(_config(data, model, recipe, config, options), callbacks=callbacks, progress=progress)
    summary = trainer.fit()
    return finish_run(trainer, summary)


def prune(source: str | os.PathLike, *, ratio: float | None = None, macs: float | None = None,
          latency: float | None = None, sparsity: float | None = None, importance: str = "l1", round_to: int = 8,
          scope: str = "layer",
          data: str | os.PathLike | None = None, distill: bool = True, recipe: str | None = None,
          config: str | os.PathLike | None = None, callbacks: list[Callback] = (), progress: bool = True,
          **options: Any) -> dict[str, Any]:
    """Prune a trained model and fine-tune it, distilled from the original; write a run directory.

    Structured: `ratio` removes that share of every layer's channels, `macs` keeps at most that share
    of the MACs, `latency` the fewest channels that make batch-1 onnxruntime inference at the run's
    input size take at most that many ms here (`importance`, `round_to`). Unstructured: `sparsity`
    zeroes that share of the weights (by magnitude, within each layer or `scope="global"`), growing
    over the fine-tune. Options are the fine-tune's training options (epochs, time_limit, name, ...).
    """
    check_target(ratio, macs, sparsity, latency)
    if sparsity is not None:
        options.update(sparsity=sparsity, sparsity_scope=scope)
        transform = lambda trainer: {"kind": "sparse", "sparsity": sparsity, "scope": scope}  # noqa: E731
    else:
        transform = structured(ratio=ratio, macs=macs, importance=importance, round_to=round_to, latency=latency)
    trainer, record = compression_run(source, transform, suffix="sparse" if sparsity else "pruned", data=data,
                                      distill=distill, recipe=recipe, config=config, callbacks=callbacks,
                                      progress=progress, **options)
    if record["kind"] == "pruned":
        log.info("%s; fine-tuning in %s", describe(record), trainer.run_dir)
    summary = trainer.fit()
    return {**finish_run(trainer, summary), "pruned": record}


def lowrank(source: str | os.PathLike, *, energy: float = 0.9, data: str | os.PathLike | None = None,
            distill: bool = True, recipe: str | None = None, config: str | os.PathLike | None = None,
            callbacks: list[Callback] = (), progress: bool = True, **options: Any) -> dict[str, Any]:
    """Factorise a trained model's layers (SVD, Tucker-2) at the rank keeping `energy`, then fine-tune it
    distilled from the original; write a run directory (options as for `prune`)."""
    if not 0 < energy < 1:  # before anything is read or written
        raise ConfigError(f"--energy must lie between 0 and 1 (exclusive), got {energy:g}")
    trainer, record = compression_run(
        source, lambda t: factorize_model(t.model, t.pre.img_size, energy), suffix="lowrank", data=data,
        distill=distill, recipe=recipe, config=config, callbacks=callbacks, progress=progress, **options)
    (m0, m1), (p0, p1) = record["macs"], record["params"]
    log.info("factorised %d layers at energy %g: %.1fM MACs of %.1fM (%.0f%%), %s parameters of %s; fine-tuning "
             "in %s", len(record["ranks"]), energy, m1 / 1e6, m0 / 1e6, 100 * m1 / m0, f"{p1:,}", f"{p0:,}",
             trainer.run_dir)
    summary = trainer.fit()
    return {**finish_run(trainer, summary), "lowrank": record}


def quantize(source: str | os.PathLike, backend: str = "onnxruntime", out: str | os.PathLike | None = None, *,
             calib: int = 256, method: str = "minmax", activations: str = "auto",
             images: str | os.PathLike | None = None, max_drop: float | None = None, qat: bool = False,
             data: str | os.PathLike | None = None,
             distill: bool = True, recipe: str | None = None, config: str | os.PathLike | None = None,
             callbacks: list[Callback] = (), progress: bool = True, **options: Any) -> Quantized:
    """An int8 model file of a trained model (`compress.quantize.quantize`). With `qat`, first a
    quantisation-aware fine-tune (a run directory, options as for `prune`), whose learned scales the
    int8 file keeps (default file: `<qat run>/best-int8.onnx`); it is measured against `source`'s fp32."""
    if not qat:
        given = [k for k, v in (("data", data), ("recipe", recipe), ("config", config)) if v is not None]
        if options or given or not distill:
            raise ConfigError(f"training options ({', '.join(given + list(options)) or 'no-distill'}) are for "
                              "quantisation-aware training: add --qat")
        return _quantize(source, backend, out, calib=calib, method=method, activations=activations, images=images,
                         max_drop=max_drop)
    if backend != "onnxruntime" or activations == "s8":
        raise ConfigError("--qat writes an onnxruntime model with uint8 activations (its quantiser takes the "
                          "learned scales); NNCF, for openvino, estimates its own")
    check_calibration(source, backend, calib, method, activations, images, max_drop)
    trainer, record = compression_run(source, _qat.transform(), suffix="qat", data=data, distill=distill,
                                      recipe=recipe, config=config, callbacks=callbacks, progress=progress,
                                      **options)
    log.info("folded %d batch norms into their convolutions; learning %d activation scales; fine-tuning in %s",
             record["folded"], record["learned_scales"], trainer.run_dir)
    finish_run(trainer, trainer.fit())
    return _quantize(trainer.run_dir / "best.safetensors", backend, out or trainer.run_dir / "best-int8.onnx",
                     calib=calib, method=method, activations=activations, images=images, max_drop=max_drop,
                     baseline=source)


def optimize(source: str | os.PathLike, target: str, *, name: str | None = None,
             project: str | os.PathLike | None = None, budget: float | None = None, epochs: int | None = None,
             macs: float = 0.5, energy: float = 0.9, calib: int = 256, duration: float = 2.0, progress: bool = True
             ) -> dict[str, Any]:
    """The compression chain on a run, every variant measured alike; the best that meets `target`
    (`latency=5ms`, `size=10MB`, `macs=1G` or `accuracy-drop=1.0`). Writes `<project>/<name>/report.md`
    and `report.html` (default: beside the run, `<run>-optimize`); run again with the same name, it
    resumes. `budget`: minutes of fine-tuning in all (else `epochs` per fine-tune)."""
    run = Path(source)
    out = Path(project or run.parent) / (name or f"{run.name}-optimize")
    return _optimize(source, target, prune=prune, lowrank=lowrank, resume=train, out=out, macs=macs, energy=energy,
                     calib=calib, duration=duration, budget=budget, epochs=epochs, progress=progress)


def finish_run(trainer: Trainer, summary: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the best model on val (and test), draw the plots, write results.json and report.md."""
    run_dir, cfg = trainer.run_dir, trainer.cfg
    precision = precision_name(trainer.amp_dtype)
    best = Predictor.load(run_dir / "best.safetensors", "torch", str(trainer.device), precision)
    results: dict[str, ClassificationReport] = {}
    for split in ("val", "test"):
        samples = getattr(trainer.scan, split)
        if samples:
            results[split] = evaluate_samples(best, samples, run_dir, name=split, batch_size=cfg.data.batch_size,
                                              workers=cfg.data.workers)
    plot_history(summary["history"], run_dir / "plots" / "history.png", k=min(5, len(trainer.classes)))
    model_summary = summarize(best.model, cfg.data.img_size, cfg.model.name)
    if cfg.train.sparsity:
        rows = write_sparsity_report(best.model, run_dir / "sparsity.csv")
        log.info("sparsity %.1f%% of %s weights (per layer: %s); compressed %.2f MB (dense runtimes run it no "
                 "faster)", 100 * rows[-1]["sparsity"], f"{rows[-1]['weights']:,}", run_dir / "sparsity.csv",
                 zip_bytes(best.model) / 1e6)
    summary = {**summary, "lr": trainer.lr, "device": str(trainer.device),
               "precision": precision}
    write_json(run_dir / "results.json", {"summary": {k: v for k, v in summary.items() if k != "history"},
                                          **{k: r.to_dict() for k, r in results.items()}})
    report = write_run_report(run_dir, cfg, trainer.scan, summary, model_summary, results)
    log.info("")
    log.info("run %s: %d epochs, best epoch %s (%s weights), %.1f min", run_dir, summary["epochs"],
             summary["best_epoch"], summary["best_weights"], summary["train_time_s"] / 60)
    for name, r in results.items():
        log.info("  %-5s top-1 %.2f%%  top-%d %.2f%%  macro F1 %.3f  (%d images)", name, 100 * r.top1, r.k,
                 100 * r.top5, r.macro["f1"], r.num_samples)
    log.info("report: %s", report)
    return {**summary, "report": str(report), "results": {k: r.to_dict() for k, r in results.items()}}


def evaluate(source: str | os.PathLike, data: str | os.PathLike, *, tta: str | None = None,
             out: str | os.PathLike | None = None, batch_size: int = 64, workers: int = -1, backend: str = "auto",
             device: str = "auto", precision: str = "auto", metadata: dict[str, Any] | None = None
             ) -> ClassificationReport:
    """Evaluate a model (a run, a .safetensors, an .onnx or an OpenVINO .xml) on a labelled folder; write
    metrics and plots.

    `data` is a class-folder tree, or a split layout (its test split, else val, is used). Results go
    to `out` (default: `<run>/eval-<folder>` or `runs/eval-<folder>`). `metadata` supplies what a
    model file without resforge's record lacks (classes, img_size, ...).
    """
    _check_batching(batch_size, workers)
    predictor = Predictor.load(source, backend, device, precision, batch_size=batch_size, metadata=metadata)
    samples, scan = labelled_samples(data, predictor.classes)
    name = Path(data).resolve().name
    if out is None:
        base = Path(source) if Path(source).is_dir() else Path("runs")
        out = base / f"eval-{name}"
    if scan.skipped:
        scan.write_skipped_csv(Path(out) / "skipped.csv")
        log.warning("skipped %d unreadable or non-image file(s) in %s; see %s", len(scan.skipped), data,
                    Path(out) / "skipped.csv")
    report = evaluate_samples(predictor, samples, out, name=name, batch_size=batch_size, workers=workers, tta=tta)
    log.info("%s on %s (%d images%s, %s): top-1 %.2f%%, top-%d %.2f%%; details in %s", source, data,
             report.num_samples, f", TTA {tta}" if tta else "", predictor.describe(), 100 * report.top1, report.k,
             100 * report.top5, out)
    return report


def _check_batching(batch_size: int, workers: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ConfigError(f"workers must be -1 (automatic) or a count, got {workers!r}")


def predict(source: str | os.PathLike, paths: list[str | os.PathLike], *, topk: int = 5, batch_size: int = 64,
            backend: str = "auto", device: str = "auto", precision: str = "auto",
            metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Top-k classes for image files, folders or glob patterns, as rows {"path", "top"} or {"path", "error"}.

    An unreadable file gets an error entry; when no file at all can be read, that is an error.
    """
    if topk < 1 or batch_size < 1:
        raise ConfigError("topk and batch_size must be at least 1")
    files = scan_images(list(paths))
    predictor = Predictor.load(source, backend, device, precision, batch_size=min(batch_size, len(files)),
                               metadata=metadata)
    rows = [{"path": p, **r} for p, r in zip(files, predictor.predict(files, topk, batch_size, names=files))]
    if all("error" in r for r in rows):
        first = rows[0]
        raise DataError(f"none of the {len(rows)} image(s) could be read (first: {first['path']}: {first['error']})"
                        if len(rows) > 1 else f"{first['path']}: {first['error']}")
    return rows


def lr_find(data: str | os.PathLike | None = None, *, model: str | None = None, recipe: str | None = None,
            config: str | os.PathLike | None = None, steps: int = 100, start_lr: float = 1e-6, end_lr: float = 10.0,
            out: str | os.PathLike | None = None, progress: bool = True, **options: Any) -> LRFindResult:
    """The learning-rate range test with the recipe's model, data and optimiser; writes a plot."""
    check_range(start_lr, end_lr, steps)  # before the folder is decoded
    trainer = Trainer(_config(data, model, recipe, config, options), progress=progress)
    result = _lr_find(trainer, start_lr=start_lr, end_lr=end_lr, steps=steps)
    out = Path(out) if out else Path(trainer.cfg.train.project) / "lr_find"
    plot_lr_find(result.lrs, result.losses, result.suggestion, out / "lr_find.png")
    write_json(out / "lr_find.json", {"lrs": result.lrs, "losses": result.losses, "suggestion": result.suggestion})
    log.info("suggested learning rate: %s (plot: %s)",
             f"{result.suggestion:.3g}" if result.suggestion else f"none ({result.reason})", out / "lr_find.png")
    return result


def inspect_data(root: str | os.PathLike, *, out: str | os.PathLike | None = None, per_class: int = 4,
                 max_pixels: int | None = None) -> FolderReport:
    """Counts, sizes, balance, duplicates and unreadable files of a folder, plus a grid of samples."""
    if per_class < 1:
        raise ConfigError("per_class must be at least 1")
    report, scan = inspect_folder(root, max_pixels=max_pixels)
    out = Path(out) if out else Path("runs") / f"inspect-{Path(root).resolve().name}"
    write_json(out / "inspect.json", report.to_dict())
    everything = scan.train + scan.val + scan.test
    picks = [s for c in range(len(scan.classes)) for s in [s for s in everything if s[1] == c][:per_class]]
    images = [thumbnail(path, "RGB") for path, _ in picks]
    plot_image_grid(images, [scan.classes[c] for _, c in picks], out / "samples.png", ncols=per_class,
                    suptitle=f"{Path(root).name}: {per_class} images per class")
    log.info("%s\nwritten: %s, %s", report.to_text(), out / "inspect.json", out / "samples.png")
    return report
