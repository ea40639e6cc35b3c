"""The public Python API; the CLI calls exactly these functions.

    import resforge
    run = resforge.train("data/birds", model="resnet50", recipe="finetune", pretrained="r50.pth", epochs=5)
    resforge.evaluate(run["run_dir"], "data/birds-test")
    resforge.predict(run["run_dir"], ["photo.jpg"])
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .compress import qat as _qat
from .compress import runs
from .compress.finetune import compression_run
from .compress.optimize import optimize as _optimize
from .compress.quantize import Quantized, check_calibration
from .compress.quantize import quantize as _quantize
from .commands import (BenchOptions, EnsembleOptions, EvalOptions, ExportOptions, InfoOptions, InspectOptions,
                       LowrankOptions, LrFindOptions, MonitorOptions, OptimizeOptions, PredictOptions, PruneOptions,
                       QuantizeOptions, TrainOptions, TuneOptions)
from .config import config_for
from .data.folder import scan_images, thumbnail
from .data.inspect import FolderReport, inspect_folder
from .data.inspect_masks import MasksReport, inspect_masks
from .data.inspect_objects import ObjectsReport, inspect_objects
from .deploy.bench import bench as _bench
from .deploy.export import Exported
from .deploy.export import export as _export
from .deploy.monitor import make_profile, monitor_folder
from .runtime.predictor import Predictor
from .runtime.profile import Profile
from .errors import ConfigError, DataError
from .evaluation.evaluate import evaluate_samples, labelled_samples
from .evaluation.metrics import ClassificationReport
from .evaluation.plots import plot_image_grid, plot_lr_find
from .io import write_json
from .models import create_model
from .models.summary import ModelSummary, summarize
from .options import from_keywords, take_keywords
from .tasks import Detection, Segmentation, recognize_task, recorded_task
from .tasks.detect import DetectionReport, evaluate_detector
from .tasks.detect_infer import check_detector_precision, predict_boxes
from .tasks.segment import SegmentationReport, evaluate_segmenter
from .tasks.segment_infer import predict_masks
from .training.lr_find import LRFindResult, check_range
from .training.lr_find import lr_find as _lr_find
from .training.run import RunResult, complete, run
from .training.trainer import Callback, Trainer

log = logging.getLogger("resforge")

__all__ = ["info", "train", "prune", "lowrank", "quantize", "optimize", "evaluate", "predict", "lr_find", "inspect_data",
           "export", "bench", "serve", "ensemble", "tune", "Predictor"]


def _given(**keywords: Any) -> dict[str, Any]:
    """The positional options given (None: the option's default)."""
    return {k: v for k, v in keywords.items() if v is not None}


def train(data: str | os.PathLike | None = None, *, model: str | None = None, recipe: str | None = None,
          config: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          callbacks: list[Callback] = (), progress: bool = True, devices: int = TrainOptions.devices, **options: Any
          ) -> dict[str, Any]:
    """Train on an image folder and write a run directory; return the run's summary and results.

    Options are config fields, bare (`epochs=5`) or dotted (`**{"optim.lr": 0.01}`). With
    `resume=RUN_DIR`, the run continues from its `last.ckpt` (only epochs, patience, time_limit,
    device and workers may be given). `devices=N` trains in N processes (DDP, one per GPU, or
    sharing the CPU cores) on the same global batches; under torchrun the launcher's processes are used.
    """
    if resume is not None:
        if data is not None or model or recipe or config:
            raise ConfigError("resuming continues a run as it was configured: give no data folder, model, recipe "
                              "or config")
        result = run(resume=resume, overrides=options, callbacks=callbacks, progress=progress, devices=devices)
    else:
        result = run(config_for(data, model, recipe, config, options), callbacks=callbacks, progress=progress,
                     devices=devices)
    return result.to_dict() if isinstance(result, RunResult) else result


def tune(data: str | os.PathLike | None = None, **options: Any) -> dict[str, Any]:
    """Search hyperparameters with Optuna (`training.tune.run_search`): `trials` training runs (each with the
    training options among `options`, e.g. epochs=5) over `space` for the best `metric`, TPE-sampled, weak ones
    pruned per epoch. The search's own options are `commands.TuneOptions`' fields."""
    from .training.tune import run_search

    o, options = take_keywords(TuneOptions, options)
    return run_search(data, options, trials=o.trials, space=o.space, storage=o.storage, study=o.study,
                      pruner=o.pruner, time_limit=o.time_limit, name=o.name, project=o.project, resume=o.resume,
                      model=o.model, recipe=o.recipe, config=o.config, seed=o.search_seed)


def prune(source: str | os.PathLike, *, callbacks: list[Callback] = (), progress: bool = True,
          **options: Any) -> dict[str, Any]:
    """Prune a trained model and fine-tune it, distilled from the original; write a run directory
    (`compress.runs.prune`). Options are `commands.PruneOptions`' fields and the fine-tune's training options
    (epochs, time_limit, name, ...)."""
    o, options = take_keywords(PruneOptions, options)
    return runs.prune(source, o, callbacks=callbacks, progress=progress, **options)


def lowrank(source: str | os.PathLike, *, callbacks: list[Callback] = (), progress: bool = True,
            **options: Any) -> dict[str, Any]:
    """Factorise a trained model's layers and fine-tune it, distilled from the original; write a run directory
    (`compress.runs.lowrank`). Options are `commands.LowrankOptions`' fields, the rest training options as for
    `prune`."""
    o, options = take_keywords(LowrankOptions, options)
    return runs.lowrank(source, o, callbacks=callbacks, progress=progress, **options)


def quantize(source: str | os.PathLike, backend: str | None = None, out: str | os.PathLike | None = None, *,
             callbacks: list[Callback] = (), progress: bool = True, **options: Any) -> Quantized:
    """An int8 model file of a trained model (`compress.quantize.quantize`; `commands.QuantizeOptions`' fields).
    With `qat`, first a quantisation-aware fine-tune (a run directory, taking training options as `prune` does),
    whose learned scales the int8 file keeps (default file: `<qat run>/best-int8.onnx`); it is measured against
    `source`'s fp32."""
    o, options = take_keywords(QuantizeOptions, {**options, **_given(backend=backend, out=out)})
    backend, out, calib, method, activations, images, max_drop = (o.backend, o.out, o.calib, o.method,
                                                                  o.activations, o.images, o.max_drop)
    data, distill, recipe, config = o.data, o.distill, o.recipe, o.config
    if not o.qat:
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
    complete(trainer)
    return _quantize(trainer.run_dir / "best.safetensors", backend, out or trainer.run_dir / "best-int8.onnx",
                     calib=calib, method=method, activations=activations, images=images, max_drop=max_drop,
                     baseline=source)


def optimize(source: str | os.PathLike, target: str, *, progress: bool = True, **options: Any) -> dict[str, Any]:
    """The compression chain on a run, every variant measured alike; the best that meets `target`
    (`latency=5ms`, `size=10MB`, `macs=1G` or `accuracy-drop=1.0`). Writes `<project>/<name>/report.md`
    and `report.html` (default: beside the run, `<run>-optimize`); run again with the same name, it
    resumes. `budget`: minutes of fine-tuning in all (else `epochs` per fine-tune). Options are
    `commands.OptimizeOptions`' fields."""
    o = from_keywords(OptimizeOptions, {**options, "target": target})
    run = Path(source)
    out = Path(o.project or run.parent) / (o.name or f"{run.name}-optimize")
    return _optimize(source, o.target, out=out, macs=o.macs, energy=o.energy,
                     calib=o.calib, duration=o.duration, budget=o.budget, epochs=o.epochs,
                     progress=progress)


def export(source: str | os.PathLike, format: str | None = None, out: str | os.PathLike | None = None,
           **options: Any) -> Exported:
    """A run's model as an ONNX, OpenVINO or torch.export file, gated on parity with PyTorch
    (`deploy.export.export`; options are `commands.ExportOptions`' fields)."""
    o = from_keywords(ExportOptions, {**options, **_given(format=format, out=out)})
    return _export(source, o.format, o.out, opset=o.opset, dynamic_batch=o.dynamic_batch, dtype=o.dtype,
                   embed_preprocessing=o.embed_preprocessing, images=o.images)


def bench(models: list[str | os.PathLike], backends: list[str] | None = None, *, progress: bool = True,
          **options: Any) -> list[dict[str, Any]]:
    """Every model on every backend, a row each (`deploy.bench.bench`; options are `commands.BenchOptions`'
    fields)."""
    o = from_keywords(BenchOptions, {**options, **_given(backends=backends)})
    return _bench(models, o.backends, precision=o.precision, batch_sizes=o.batch_sizes, threads=o.threads,
                  duration=o.duration, warmup=o.warmup, images=o.images, isolate=o.isolate, progress=progress,
                  metadata=o.metadata, device=o.device, compile=o.compile, cuda_graph=o.cuda_graph)


def evaluate(source: str | os.PathLike, data: str | os.PathLike,
             **options: Any) -> ClassificationReport | DetectionReport | SegmentationReport:
    """Evaluate a model (a run, a .safetensors, an .onnx or an OpenVINO .xml) on a labelled folder; write
    metrics and plots. A detector is measured in COCO AP on an annotated folder (`tasks.detect`), a segmenter in
    mIoU on a mask folder (`tasks.segment`).

    `data` is a class-folder tree, or a split layout (its test split, else val, is used). Results go
    to `out` (default: `<run>/eval-<folder>` or `runs/eval-<folder>`). `metadata` supplies what a
    model file without resforge's record lacks (classes, img_size, ...). Options are `commands.EvalOptions`'
    fields.
    """
    o = from_keywords(EvalOptions, options)
    tta, out, batch_size, workers, backend, device, precision, metadata = (
        o.tta, o.out, o.batch_size, o.workers, o.backend, o.device, o.precision, o.metadata)
    _check_batching(batch_size, workers)
    tile = {"size": o.tile, "overlap": o.overlap} if o.tile else None
    task = recorded_task(source)
    if task == Detection.name:
        check_detector_precision(precision)
        return evaluate_detector(source, data, out=out, batch_size=batch_size, workers=workers, device=device,
                                 tile=tile, backend=backend)
    if task == Segmentation.name:
        return evaluate_segmenter(source, data, out=out, device=device, tile=tile, backend=backend,
                                  precision="fp32" if precision == "auto" else precision)
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


def ensemble(sources: list[str | os.PathLike], data: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Average several models' probabilities, evaluate the ensemble beside each member on a labelled folder, and
    export it as one ONNX model (`deploy.ensemble.build_ensemble`; options are `commands.EnsembleOptions`'
    fields)."""
    from .deploy.ensemble import build_ensemble

    o = from_keywords(EnsembleOptions, {**options, "data": data})
    _check_batching(o.batch_size, o.workers)
    return build_ensemble(sources, data, weights=o.weights, fit=o.fit, out=o.out, batch_size=o.batch_size,
                          workers=o.workers)


def _check_batching(batch_size: int, workers: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ConfigError(f"workers must be -1 (automatic) or a count, got {workers!r}")


def predict(source: str | os.PathLike, paths: list[str | os.PathLike], **options: Any) -> list[dict[str, Any]]:
    """Top-k classes for image files, folders or glob patterns, as rows {"path", "top"} or {"path", "error"}; a
    detector's boxes as rows {"path", "objects"}; a segmenter's class-index PNGs as rows {"path", "mask",
    "pixels"} (options: `commands.PredictOptions`' fields).

    An unreadable file gets an error entry; when no file at all can be read, that is an error.
    """
    o = from_keywords(PredictOptions, options)
    topk, batch_size, backend, device, precision, metadata = (o.topk, o.batch_size, o.backend, o.device,
                                                              o.precision, o.metadata)
    if topk < 1 or batch_size < 1:
        raise ConfigError("topk and batch_size must be at least 1")
    files = scan_images(list(paths))
    tile = {"size": o.tile, "overlap": o.overlap} if o.tile else None
    task = recorded_task(source)
    if task in (Detection.name, Segmentation.name):
        if task == Detection.name:
            check_detector_precision(precision)
        rows = (predict_boxes(source, files, conf=o.conf, batch_size=batch_size, device=device,
                              save_images=o.save_images, tile=tile, backend=backend) if task == Detection.name else
                predict_masks(source, files, o.masks, device=device, save_images=o.save_images, tile=tile,
                              backend=backend, precision="fp32" if precision == "auto" else precision))
        _check_some_read(rows)
        return rows
    predictor = Predictor.load(source, backend, device, precision, batch_size=min(batch_size, len(files)),
                               metadata=metadata)
    rows = [{"path": p, **r} for p, r in zip(files, predictor.predict(files, topk, batch_size, names=files))]
    _check_some_read(rows)
    return rows


def _check_some_read(rows: list[dict[str, Any]]) -> None:
    if all("error" in r for r in rows):
        first = rows[0]
        raise DataError(f"none of the {len(rows)} image(s) could be read (first: {first['path']}: {first['error']})"
                        if len(rows) > 1 else f"{first['path']}: {first['error']}")


def monitor(source: str | os.PathLike, folder: str | os.PathLike | None = None, **options: Any
            ) -> dict[str, Any] | Profile:
    """The images of `folder` against the classifier's profile (`deploy.monitor`): the drift signals, the alarms
    and the report's path; or, with `profile=DATA`, the profile of a saved model made from its recorded
    validation split in DATA and written into its record. Options are `commands.MonitorOptions`' fields."""
    o, defaults = from_keywords(MonitorOptions, options), MonitorOptions()
    if (folder is None) == (o.profile is None):
        raise ConfigError("give a folder of images to judge, or --profile DATA to make the model's profile")
    _check_batching(o.batch_size, 0)
    if o.profile is not None:
        ignored = [k for k in ("out", "backend", "precision", "metadata") if getattr(o, k) != getattr(defaults, k)]
        if ignored:
            raise ConfigError(f"--profile runs the saved model in PyTorch and writes into its record: "
                              f"{', '.join(ignored)} do not apply")
        return make_profile(source, o.profile, o.batch_size, o.device)
    return monitor_folder(source, folder, o.out, backend=o.backend, device=o.device, precision=o.precision,
                          batch_size=o.batch_size, metadata=o.metadata).to_dict()


def serve(source: str | os.PathLike, *, metadata: dict[str, Any] | None = None, **options: Any) -> None:
    """Serve a model over HTTP (FastAPI on uvicorn) until SIGINT or SIGTERM: `POST /v1/predict`, `/health`,
    `/ready`, `/v1/metadata`, `/metrics`, the page at `/`. Options are `ServeOptions`' fields (host, port,
    backend, max_batch, max_wait_ms, queue, timeout, max_bytes, max_images, max_pixels, api_key, ...)."""
    from .deploy.serve import ServeOptions
    from .deploy.serve import serve as _serve

    try:
        settings = ServeOptions(**options)
    except TypeError as e:
        raise ConfigError(f"serve: {e}") from None
    _serve(source, settings, metadata)


def lr_find(data: str | os.PathLike | None = None, *, model: str | None = None, progress: bool = True,
            **options: Any) -> LRFindResult:
    """The learning-rate range test with the recipe's model, data and optimiser; writes a plot. Options are
    `commands.LrFindOptions`' fields and training options."""
    o, options = take_keywords(LrFindOptions, options)
    check_range(o.start_lr, o.end_lr, o.steps)  # before the folder is decoded
    trainer = Trainer(config_for(data, model, o.recipe, o.config, options), progress=progress)
    result = _lr_find(trainer, start_lr=o.start_lr, end_lr=o.end_lr, steps=o.steps)
    out = Path(o.out) if o.out else Path(trainer.cfg.train.project) / "lr_find"
    plot_lr_find(result.lrs, result.losses, result.suggestion, out / "lr_find.png")
    write_json(out / "lr_find.json", {"lrs": result.lrs, "losses": result.losses, "suggestion": result.suggestion})
    log.info("suggested learning rate: %s (plot: %s)",
             f"{result.suggestion:.3g}" if result.suggestion else f"none ({result.reason})", out / "lr_find.png")
    return result


def info(model: str, **options: Any) -> ModelSummary:
    """Parameters, MACs and per-stage output shapes of a model at an input size (`commands.InfoOptions`' fields
    and the model spec's options). Without weights to load it is counted on the meta device, instantly."""
    o, spec = take_keywords(InfoOptions, options)
    if o.img_size < 1:
        raise ConfigError(f"--img-size must be a positive number of pixels, got {o.img_size}")
    kwargs = dict(num_classes=o.num_classes, in_chans=o.in_chans, pretrained=o.pretrained, **spec)
    with torch.device("meta") if o.pretrained is None else contextlib.nullcontext():
        net = create_model(model, **kwargs)
    return summarize(net, o.img_size, model)


def inspect_data(root: str | os.PathLike, **options: Any) -> FolderReport | ObjectsReport | MasksReport:
    """Counts, sizes, balance, duplicates and unreadable files of a folder, plus a grid of samples; of a detection
    folder, its objects, box sizes and problems, with its images' boxes drawn; of a segmentation folder, its pixels
    per class, with masks laid over images (options: `commands.InspectOptions`' fields)."""
    o = from_keywords(InspectOptions, options)
    out, per_class = o.out, o.per_class
    if per_class < 1:
        raise ConfigError("per_class must be at least 1")
    task = recognize_task(root)[0]
    if task == Segmentation.name:
        out = Path(out) if out else Path("runs") / f"inspect-{Path(root).resolve().name}"
        masks = inspect_masks(root, out, ignore_index=o.ignore_index,
                              **({"max_pixels": o.max_pixels} if o.max_pixels else {}))
        log.info("%s\nwritten: %s (inspect.json, pixels_per_class.png, samples.png)", masks.to_text(), out)
        return masks
    if task == Detection.name:
        out = Path(out) if out else Path("runs") / f"inspect-{Path(root).resolve().name}"
        objects = inspect_objects(root, out, **({"max_pixels": o.max_pixels} if o.max_pixels else {}))
        log.info("%s\nwritten: %s (inspect.json, box_sizes.png, objects_per_class.png, samples.png)",
                 objects.to_text(), out)
        return objects
    report, scan = inspect_folder(root, max_pixels=o.max_pixels)
    out = Path(out) if out else Path("runs") / f"inspect-{Path(root).resolve().name}"
    write_json(out / "inspect.json", report.to_dict())
    everything = scan.train + scan.val + scan.test
    picks = [s for c in range(len(scan.classes)) for s in [s for s in everything if s[1] == c][:per_class]]
    images = [thumbnail(path, "RGB") for path, _ in picks]
    plot_image_grid(images, [scan.classes[c] for _, c in picks], out / "samples.png", ncols=per_class,
                    suptitle=f"{Path(root).name}: {per_class} images per class")
    log.info("%s\nwritten: %s, %s", report.to_text(), out / "inspect.json", out / "samples.png")
    return report
