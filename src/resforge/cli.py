"""The `resforge` command line: argument parsing only; every command calls the public API."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .errors import ConfigError, ResforgeError
from .options import add_flags, flag_type

log = logging.getLogger("resforge")
INT, FLOAT = flag_type(int), flag_type(float)  # argparse types: a whole number; a finite number (no nan or inf)


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one line (raised, so `main` answers them like every other error), and which
    takes -1,2 or -1e-3 as a value, not a flag (as newer Pythons' argparse does)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def _model_options(p: argparse.ArgumentParser) -> None:
    from .models.spec import add_model_flags

    g = p.add_argument_group("model options")
    g.add_argument("--num-classes", type=INT, default=1000, help="classifier outputs (default: 1000)")
    g.add_argument("--in-chans", type=INT, default=3, help="input channels, 1 for grayscale (default: 3)")
    g.add_argument("--pretrained", metavar="PATH_OR_URL",
                   help="weights: torchvision/timm .pth, safetensors or Keras .h5, local or http(s)")
    add_model_flags(g)


def _model_kwargs(args: argparse.Namespace) -> dict:
    from .models.spec import given_options

    return dict(num_classes=args.num_classes, in_chans=args.in_chans, pretrained=args.pretrained,
                **given_options(args))


def _config_options(p: argparse.ArgumentParser) -> None:
    """Where a training config comes from: a recipe, a YAML file, a flag per option, --set."""
    from .config import add_arguments

    p.add_argument("--recipe", help="built-in recipe (see 'resforge recipes')")
    p.add_argument("--config", metavar="FILE", help="YAML config (sections model/data/augment/optim/train)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any option, e.g. --set optim.gamma=0.2")
    add_arguments(p)


def cmd_models(args: argparse.Namespace) -> None:
    from .models import describe_model, list_models

    for name in list_models():
        print(f"{name:<18} {describe_model(name)}")


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from .models import create_model, summarize

    if args.img_size < 1:
        raise ConfigError(f"--img-size must be a positive number of pixels, got {args.img_size}")
    kwargs = _model_kwargs(args)
    if kwargs["pretrained"] is None:  # nothing to load: count on the meta device, instantly
        with torch.device("meta"):
            model = create_model(args.model, **kwargs)
    else:
        model = create_model(args.model, **kwargs)
    print(summarize(model, args.img_size, args.model).table())


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.minutes)


def cmd_train(args: argparse.Namespace) -> None:
    from . import api
    from .config import overrides_from_args

    if not args.data and not args.resume:
        raise ConfigError("give the image folder to train on (or --resume RUN_DIR)")
    api.train(args.data, recipe=args.recipe, config=args.config, resume=args.resume, devices=args.devices,
              **overrides_from_args(args))


def cmd_tune(args: argparse.Namespace) -> None:
    from . import api
    from .config import overrides_from_args

    options = overrides_from_args(args)
    search = {k: options.pop(f"train.{k}", None) for k in ("time_limit", "name", "project")}
    out = api.tune(args.data, trials=args.trials, space=args.space, storage=args.storage,
                   study=args.study, pruner=args.pruner, time_limit=search["time_limit"], name=search["name"],
                   project=search["project"] or "runs", resume=args.resume, recipe=args.recipe, config=args.config,
                   search_seed=args.search_seed, model=options.pop("model.name", None), **options)
    print(out["dir"] / "summary.md")


def cmd_prune(args: argparse.Namespace) -> None:
    from . import api
    from .config import overrides_from_args

    options = overrides_from_args(args)  # --sparsity is the training option, with its scope
    out = api.prune(args.model, ratio=args.ratio, macs=args.macs, latency=args.latency,
                    sparsity=options.pop("train.sparsity", None),
                    scope=options.pop("train.sparsity_scope", "layer"), importance=args.importance,
                    round_to=args.round_to, data=args.data, distill=args.distill, recipe=args.recipe,
                    config=args.config, **options)
    print(out["run_dir"])


def cmd_lowrank(args: argparse.Namespace) -> None:
    from . import api
    from .config import overrides_from_args

    out = api.lowrank(args.model, energy=args.energy, latency=args.latency, data=args.data, distill=args.distill,
                      recipe=args.recipe, config=args.config, **overrides_from_args(args))
    print(out["run_dir"])


def cmd_optimize(args: argparse.Namespace) -> None:
    from . import api

    state = api.optimize(args.model, args.target, name=args.name, project=args.project, budget=args.budget,
                         epochs=args.epochs, macs=args.macs, energy=args.energy, calib=args.calib,
                         duration=args.duration)
    print(state["pick"]["line"])


def cmd_quantize(args: argparse.Namespace) -> None:
    from . import api

    from .config import overrides_from_args

    result = api.quantize(args.model, args.backend, args.output, calib=args.calib, method=args.method,
                          activations=args.activations, images=args.images, max_drop=args.max_drop, qat=args.qat,
                          data=args.data,
                          distill=args.distill, recipe=args.recipe, config=args.config, **overrides_from_args(args))
    print(result.path)


def cmd_lr_find(args: argparse.Namespace) -> None:
    from . import api
    from .config import overrides_from_args

    api.lr_find(args.data, recipe=args.recipe, config=args.config, steps=args.steps, start_lr=args.start_lr,
                end_lr=args.end_lr, out=args.out, **overrides_from_args(args))


def cmd_recipes(args: argparse.Namespace) -> None:
    from .config import list_recipes

    for name, description in list_recipes().items():
        print(f"{name:<16} {description}")


MODEL_HELP = "run directory, .safetensors (with its .json sidecar), .onnx file or OpenVINO .xml"
SAVED_MODEL_HELP = "run directory, or a .safetensors file with its .json sidecar"


def _compression_options(p: argparse.ArgumentParser) -> None:
    """What a compression run takes beside its own target: the source, its data, the teacher, the fine-tune."""
    p.add_argument("model", help=SAVED_MODEL_HELP)
    p.add_argument("--data", help="image folder to fine-tune on (default: the one the model was trained on, "
                                  "split as its run recorded)")
    p.add_argument("--no-distill", dest="distill", action="store_false",
                   help="fine-tune on the labels alone, without the original model as teacher")
    _config_options(p)


def _deploy_options(p: argparse.ArgumentParser) -> None:
    """Where and how a model runs, and what a model file without resforge's metadata lacks."""
    from .runtime.backends import BACKENDS, PRECISIONS

    p.add_argument("--backend", choices=["auto", *BACKENDS], default="auto",
                   help="engine (default: auto, the fastest here by a short measurement, remembered per model)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 where the hardware has it (torch, openvino), else fp32")
    _device_option(p)
    _metadata_options(p)


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then CPU; engines that cannot use it run on the "
                                                     "CPU) | cpu | cuda | cuda:N")


def _metadata_options(p: argparse.ArgumentParser) -> None:
    from .config import CHOICES

    g = p.add_argument_group("for a model file without resforge's metadata (an ONNX file from elsewhere)")
    g.add_argument("--classes", help="class names, comma-separated, or a text file with one per line")
    g.add_argument("--img-size", type=INT, help="input size (default: read from the graph)")
    g.add_argument("--crop-pct", type=FLOAT, help="centre-crop fraction of the resized image (default: 0.875)")
    g.add_argument("--mean", type=FLOAT, nargs="+", help="normalisation mean per channel (default: ImageNet's)")
    g.add_argument("--std", type=FLOAT, nargs="+", help="normalisation std per channel (default: ImageNet's)")
    g.add_argument("--interpolation", choices=CHOICES["data.interpolation"], help="resize interpolation")
    p.add_argument("--formats", type=flag_type(list[str]),
                   help="image formats decoded, comma-separated PIL names (default: the model's record, else "
                        "JPEG,PNG,WEBP,BMP,TIFF,GIF)")


def _metadata(args: argparse.Namespace) -> dict:
    from .runtime.record import OVERRIDES

    return {k: getattr(args, k) for k in OVERRIDES if getattr(args, k, None) is not None}


def _deploy_kwargs(args: argparse.Namespace) -> dict:
    return {"backend": args.backend, "precision": args.precision, "device": args.device, "metadata": _metadata(args)}


def cmd_eval(args: argparse.Namespace) -> None:
    from . import api

    report = api.evaluate(args.model, args.data, tta=args.tta, out=args.out, batch_size=args.batch_size,
                          workers=args.workers, **_deploy_kwargs(args))
    print(report.to_markdown())


def cmd_predict(args: argparse.Namespace) -> None:
    from . import api
    from .evaluation.evaluate import format_predictions
    from .io import write_text

    rows = api.predict(args.model, args.paths, topk=args.topk, batch_size=args.batch_size, **_deploy_kwargs(args))
    text = format_predictions(rows, args.format)
    if args.output:
        write_text(args.output, text + ("" if text.endswith("\n") else "\n"))
    else:
        print(text)


def cmd_export(args: argparse.Namespace) -> None:
    from . import api

    result = api.export(args.model, args.format, args.output, opset=args.opset, dynamic_batch=args.dynamic_batch,
                        dtype=args.dtype, embed_preprocessing=args.embed_preprocessing, images=args.images)
    print(result.path)


def cmd_bench(args: argparse.Namespace) -> None:
    from . import api
    from .deploy.bench import settings_line, table
    from .io import write_json, write_text

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = api.bench(args.models, backends, precision=args.precision, batch_sizes=args.batch_sizes,
                     threads=args.threads, duration=args.duration, warmup=args.warmup, images=args.images,
                     isolate=args.isolate, metadata=_metadata(args), device=args.device, compile=args.compile,
                     cuda_graph=args.cuda_graph)
    text = table(rows, args.batch_sizes) + "\n\n" + settings_line(rows, args.duration, args.warmup)
    print(text)
    if args.json:
        write_json(args.json, rows)
    if args.markdown:
        write_text(args.markdown, text + "\n")


def cmd_serve(args: argparse.Namespace) -> None:
    from . import api
    from .deploy.serve import ServeOptions

    fields = ServeOptions.__dataclass_fields__
    api.serve(args.model, metadata=_metadata(args),
              **{k: getattr(args, k) for k in fields if getattr(args, k, None) is not None})


def cmd_ensemble(args: argparse.Namespace) -> None:
    from . import api

    r = api.ensemble(args.models, args.data, weights=args.weights, fit=args.fit_weights, out=args.out,
                     batch_size=args.batch_size, workers=args.workers)
    lines = [f"{r['images']} images of {r['data']}", "", "| model | weight | top-1 | top-5 | macro F1 |",
             "|---|---:|---:|---:|---:|"]
    for row in [*r["members"], {"model": "**ensemble**", "weight": 1.0, **r["ensemble"]}]:
        lines.append(f"| {row['model']} | {row['weight']:.3f} | {row['top1']:.2%} | {row['top5']:.2%} | "
                     f"{row['macro_f1']:.3f} |")
    print("\n".join(lines + ["", str(r["path"])]))


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from . import api

    api.inspect_data(args.folder, out=args.out, per_class=args.per_class)


def cmd_data_import(args: argparse.Namespace) -> None:
    from .data.sources import import_dataset

    out = import_dataset(args.name, args.out, args.source)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(
        prog="resforge",
        description="Train, evaluate, export, benchmark and use ResNet image classifiers on a folder of images.",
        epilog="Run 'resforge COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"resforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], None], help: str,
            description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help)
        p.set_defaults(func=func)
        return p

    add("models", cmd_models, "list the model names create_model and --model accept")

    p = add("info", cmd_info, "parameters, MACs and per-stage output shapes of a model",
            "Count a model's parameters and multiply-accumulates at an input size, stage by stage. "
            "Counted on the model itself (torch's FlopCounterMode), not looked up.")
    p.add_argument("model", help="model name (see 'resforge models')")
    p.add_argument("--img-size", type=INT, default=224, help="square input size in pixels (default: 224)")
    _model_options(p)

    p = add("train", cmd_train, "train or fine-tune on a folder of images",
            "Train on DATA (root/<class>/* or root/{train,val[,test]}/<class>/*) and write a run directory "
            "with config.yaml, metrics.csv, best.safetensors + best.json, last.ckpt, plots and report.md. "
            "Precedence: defaults < --recipe < --config < flags < --set.")
    p.add_argument("data", nargs="?", help="image folder")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a run from its last.ckpt; with --epochs N a changed length refits the "
                        "remaining lr decay, and a finished run gets a new cosine cycle")
    p.add_argument("--devices", type=INT, default=1, metavar="N",
                   help="train in N processes with DDP (one per GPU, or sharing the CPU cores), launched by torch's "
                        "elastic agent; --batch-size stays the global batch, so N changes the speed, not the run. "
                        "Several machines: torchrun --nnodes ... -m resforge train (README)")
    _config_options(p)

    from .training.tune import DEFAULT_SPACE, PRUNERS, SPACE

    p = add("tune", cmd_tune, "search hyperparameters with Optuna: many short training runs, the best config",
            "Each trial is a training run on DATA with the options given (e.g. --model, --img-size, --epochs) and "
            "the searched ones sampled by TPE; weak trials are stopped early from their per-epoch validation. "
            "--metric is the one searched (and each trial's best). Here --time-limit is the search's minutes and "
            "--name its folder (default: runs/tune-<data>), holding "
            "the study (SQLite), trials/, summary.md, plots/ and best.yaml (for train --config). A killed search "
            "continues with --resume DIR; processes given one --storage URL and --study share the study.")
    p.add_argument("data", nargs="?", help="image folder")
    p.add_argument("--trials", type=INT, help="finished trials the study should hold (default: 20)")
    p.add_argument("--space", type=flag_type(list[str]),
                   help=f"what to search, among {', '.join(SPACE)} (default: {','.join(DEFAULT_SPACE)})")
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="stops weak trials early (default: median)")
    p.add_argument("--storage", help="Optuna storage URL shared by several processes, e.g. "
                                     "postgresql://host/db (default: sqlite in the search's folder)")
    p.add_argument("--study", help="study name within the storage (default: the folder's name)")
    p.add_argument("--search-seed", type=INT, help="seed of the sampler (default: random)")
    p.add_argument("--resume", metavar="DIR", help="continue a search that was stopped")
    _config_options(p)

    from .compress.prune import IMPORTANCE

    p = add("prune", cmd_prune, "remove whole channels from a trained model, then fine-tune it",
            "Structured pruning: channels that meet at a residual add are removed together (Torch-Pruning's "
            "dependency graph), so the result is a plain ResNet of other widths that every backend runs faster. "
            "It is fine-tuned on the source run's own training split, distilled from the unpruned model, and "
            "written as a run directory (start.safetensors: the pruned model before fine-tuning).")
    _compression_options(p)
    target = p.add_argument_group("the target: one of --ratio, --macs, --latency, or (unstructured) --sparsity "
                                  "with --sparsity-scope among the train options")
    target.add_argument("--ratio", type=FLOAT, help="share of each layer's channels to remove, e.g. 0.3")
    target.add_argument("--macs", type=FLOAT, help="share of the MACs to keep, e.g. 0.5")
    target.add_argument("--latency", type=FLOAT, metavar="MS",
                        help="milliseconds at batch 1 to reach, measured here on onnxruntime at the run's input size "
                             "(the channel ratio is searched by bisection)")
    p.add_argument("--importance", choices=IMPORTANCE, default="l1",
                   help="which channels go first: l1/l2 weight norm (default: l1), bn-scale (network slimming; "
                        "train with --l1-bn), taylor (gradients on a few training batches)")
    p.add_argument("--round-to", type=INT, default=8, help="keep widths a multiple of this (default: 8)")

    p = add("lowrank", cmd_lowrank, "factorise a trained model's layers into low-rank products, then fine-tune",
            "The classifier and 1x1 convolutions by truncated SVD, 3x3 convolutions by Tucker-2, each at the smallest "
            "rank that keeps --energy of its squared singular values and only where that costs fewer MACs; then "
            "fine-tuned like prune (the source run's split, distilled from the original model).")
    _compression_options(p)
    target = p.add_argument_group("the target: one of --energy or --latency")
    target.add_argument("--energy", type=FLOAT, help="share of each layer's energy kept (default: 0.9)")
    target.add_argument("--latency", type=FLOAT, metavar="MS",
                        help="milliseconds at batch 1 to reach, measured here on onnxruntime at the run's input size "
                             "(the energy is searched by bisection from 0.99 down to 0.5)")

    p = add("optimize", cmd_optimize, "int8, pruned and low-rank variants of a run, measured; the best for a target",
            "Baseline (fp32 on torch, onnxruntime, openvino) -> int8 -> channel pruning with a distilled fine-tune -> "
            "int8 of the pruned model -> low-rank factorisation; every variant evaluated on the run's validation "
            "split and timed by bench. Writes report.md and a self-contained report.html with Pareto plots, and "
            "names the best variant that meets --target (or by how much the closest misses). Run again with the "
            "same name, it resumes where it stopped.")
    p.add_argument("model", help="run directory")
    p.add_argument("--target", required=True, help="latency=5ms | size=10MB | macs=1G | accuracy-drop=1.0")
    p.add_argument("--budget", type=FLOAT, help="minutes of fine-tuning in all (default: --epochs per fine-tune)")
    p.add_argument("--epochs", type=INT, help="epochs per fine-tune without --budget (default: the auto recipe's)")
    p.add_argument("--name", help="output folder name (default: <run>-optimize)")
    p.add_argument("--project", help="folder holding it (default: the run's)")
    p.add_argument("--macs", type=FLOAT, default=0.5, help="share of the MACs pruning keeps (default: 0.5)")
    p.add_argument("--energy", type=FLOAT, default=0.9, help="low-rank energy kept (default: 0.9)")
    p.add_argument("--calib", type=INT, default=256, help="int8 calibration images (default: 256)")
    p.add_argument("--duration", type=FLOAT, default=2.0, help="seconds of timed calls per figure (default: 2)")

    from .compress import quantize as q

    p = add("quantize", cmd_quantize, "int8 post-training quantisation to an ONNX or OpenVINO file",
            "Calibrate int8 activation ranges on the run's own training images (with exactly the evaluation "
            "preprocessing), write an int8 model file with per-channel int8 weights, and measure its top-1 "
            "against fp32 on the run's validation split. onnxruntime: QDQ through its quantize_static, with the "
            "activation type measured here (u8 or s8: the faster); openvino: NNCF's nncf.quantize. With --qat, "
            "first a quantisation-aware fine-tune (batch norms folded, int8-rounded weights and activations, the "
            "activation scales learned; a run directory like prune's, taking the training options), whose scales "
            "the onnxruntime file keeps.")
    _compression_options(p)
    p.add_argument("--qat", action="store_true",
                   help="quantisation-aware training first (--epochs, --time-limit, ... set its fine-tune)")
    p.add_argument("--backend", choices=q.BACKENDS, default="onnxruntime", help="engine the file is for "
                                                                               "(default: onnxruntime)")
    p.add_argument("--output", "-o", help="file to write (default: beside the weights, e.g. <run>/best-int8.onnx)")
    p.add_argument("--calib", type=INT, default=256, help="calibration images (default: 256)")
    p.add_argument("--method", choices=q.METHODS, default="minmax", help="onnxruntime's range calibration "
                                                                        "(default: minmax)")
    p.add_argument("--activations", choices=q.ACTIVATIONS, default="auto",
                   help="onnxruntime's activation type: auto measures u8 and s8 here and keeps the faster")
    p.add_argument("--images", help="folder of images to calibrate on (default: the run's training split)")
    p.add_argument("--max-drop", type=FLOAT, metavar="POINTS",
                   help="top-1 points int8 may lose on the validation split: the most sensitive layers stay in fp32 "
                        "until it holds (onnxruntime: the noisiest by its QDQ debugging tools, doubling; openvino: "
                        "NNCF's accuracy control)")

    p = add("lr-find", cmd_lr_find, "learning-rate range test: loss against lr, and a suggestion",
            "Grow the learning rate exponentially over a short run with the recipe's model, data and "
            "optimiser; plot the smoothed loss and suggest the rate where it falls fastest.")
    p.add_argument("data", help="image folder")
    p.add_argument("--steps", type=INT, default=100, help="steps of the test (default: 100)")
    p.add_argument("--start-lr", type=FLOAT, default=1e-6, help="first learning rate (default: 1e-6)")
    p.add_argument("--end-lr", type=FLOAT, default=10.0, help="last learning rate (default: 10)")
    p.add_argument("--out", help="output folder for lr_find.png/json (default: <project>/lr_find)")
    _config_options(p)

    add("recipes", cmd_recipes, "list the built-in training recipes")

    from .evaluation.runner import TTA_MODES

    p = add("eval", cmd_eval, "evaluate a model on a labelled folder",
            "Top-1/top-5 (top-k with k = the class count below 5), per-class precision/recall/F1, confusion matrix "
            "(PNG + CSV), a grid of predictions and of the most confident mistakes. The model may be a run, or a "
            "file exported from one: the same metrics on every backend.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("data", help="class-folder tree, or a split layout (its test, else val, split is used)")
    p.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation: flip (2 views) or multicrop (ten crops)")
    p.add_argument("--out", help="output folder (default: <run>/eval-<folder>)")
    p.add_argument("--batch-size", type=INT, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=INT, default=-1, help="data-loading processes (default: spare cores)")
    _deploy_options(p)

    p = add("predict", cmd_predict, "top-k classes for image files, folders or globs")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--topk", type=INT, default=5, help="classes per image (default: 5)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    p.add_argument("--output", "-o", help="write to this file instead of stdout")
    p.add_argument("--batch-size", type=INT, default=64, help="images per batch (default: 64)")
    _deploy_options(p)

    from .runtime.convert import DEFAULT_OPSET
    from .deploy.export import DTYPES, FORMATS

    p = add("export", cmd_export, "a trained model as an ONNX, OpenVINO or torch.export file, checked against PyTorch",
            "Write the model with its classes and preprocessing in the file's metadata, load it back and run it "
            "beside the PyTorch model on the run's validation images (up to 256): the largest logit difference "
            "and the top-1 agreement are printed; past the tolerance the export fails and no file is left. "
            "TensorRT: export onnx and run it with --backend tensorrt where onnxruntime-gpu has TensorRT.")
    p.add_argument("model", help=SAVED_MODEL_HELP)
    p.add_argument("--format", choices=FORMATS, default="onnx", help="file format (default: onnx)")
    p.add_argument("--output", "-o", help="file to write (default: beside the weights, e.g. <run>/best.onnx)")
    p.add_argument("--opset", type=INT, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: a fixed batch of 1)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and activations (default: fp32)")
    p.add_argument("--embed-preprocessing", action="store_true",
                   help="the graph takes uint8 NHWC pixels of any size and resizes, crops and normalises itself")
    p.add_argument("--images", help="folder of images for the parity check (default: the run's validation split)")

    from .deploy.bench import BENCH_BACKENDS
    from .runtime.backends import PRECISIONS

    p = add("bench", cmd_bench, "latency, throughput, cold start and memory of models on backends, side by side",
            "Measure every model on every backend, each in a process of its own: cold start (load + first "
            "inference), latency percentiles at batch 1, throughput per batch size, peak memory and file size; "
            "with --images, the end-to-end rate from image files too.")
    p.add_argument("models", nargs="+", help=MODEL_HELP + " (several: side by side)")
    p.add_argument("--backends", default="auto", help=f"comma-separated, among {', '.join(BENCH_BACKENDS)} "
                                                     "(default: auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 where the hardware has it")
    _device_option(p)
    p.add_argument("--compile", action="store_true", help="torch backend: torch.compile the model")
    p.add_argument("--cuda-graph", action="store_true",
                   help="torch backend on CUDA: replay each batch size's forward pass from a CUDA graph")
    p.add_argument("--batch-sizes", type=flag_type(list[int]), default=[1, 8, 32],
                   help="comma-separated (default: 1,8,32)")
    p.add_argument("--threads", type=INT, help="threads per engine (default: all cores)")
    p.add_argument("--duration", type=FLOAT, default=3.0, help="seconds of timed calls per figure (default: 3)")
    p.add_argument("--warmup", type=INT, default=3, help="untimed calls before each figure (default: 3)")
    p.add_argument("--images", help="folder of images: adds end-to-end figures from files")
    p.add_argument("--json", help="also write the measurements as JSON to this file")
    p.add_argument("--markdown", help="also write the table as markdown to this file")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="measure in this process (cold start and memory then include what ran before)")
    _metadata_options(p)

    p = add("ensemble", cmd_ensemble, "average several models' probabilities; evaluate and export the ensemble",
            "The members must know the same classes and take the same preprocessing. Their probabilities are "
            "averaged (equal weights, --weights, or --fit-weights on the first run's recorded validation split), "
            "the ensemble is evaluated beside each member on --data, and exported as one ONNX model "
            "(<out>/ensemble.onnx, checked against PyTorch) that predict, eval, bench and serve take.")
    p.add_argument("models", nargs="+", help=SAVED_MODEL_HELP + " (two or more)")
    p.add_argument("--data", required=True, help="labelled image folder to evaluate on (its test split, else val)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", type=flag_type(list[float]),
                   help="comma-separated, one per model (default: equal)")
    w.add_argument("--fit-weights", action="store_true",
                   help="fit the weights on the first run's validation split (lowest log-loss)")
    p.add_argument("--out", help="output folder (default: runs/ensemble-<data folder>)")
    p.add_argument("--batch-size", type=INT, default=64)
    p.add_argument("--workers", type=INT, default=-1, help="image loading processes (default: automatic)")

    from .deploy.serve import ServeOptions

    p = add("serve", cmd_serve, "serve a model over HTTP: micro-batched predictions, metrics, a page to try it",
            "FastAPI on uvicorn: POST /v1/predict (an image as the body, or several as multipart files; ?topk=, "
            "?timeout=), GET /health, /ready, /v1/metadata, /metrics (Prometheus), /docs (with --docs), and a page "
            "at / to drop images on. Requests are batched: a batch leaves when --max-batch images wait or the "
            "oldest has waited --max-wait-ms. A full queue answers 503 at once; SIGTERM answers what is queued, "
            "then exits (a second SIGTERM at once).")
    p.add_argument("model", help=MODEL_HELP)
    _deploy_options(p)
    add_flags(p, ServeOptions, show_default=True)

    def data_usage(args: argparse.Namespace) -> None:
        args.data_parser.error("give a data command: inspect or import")

    p = add("data", data_usage, "inspect an image folder, or import a real dataset")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p.set_defaults(data_parser=p)
    q = data_sub.add_parser("inspect", help="counts, sizes, balance, duplicates, unreadable files, a sample grid",
                            description="Scan every file as training would and summarise the folder: images "
                                        "per class and split, sizes and storage modes, class imbalance, "
                                        "byte-identical duplicates (and those that leak across splits), files "
                                        "that would be skipped; write inspect.json and a samples.png grid.")
    q.add_argument("folder", help="image folder (root/<class>/* or root/{train,val,test}/<class>/*)")
    q.add_argument("--out", help="output folder (default: runs/inspect-<folder>)")
    q.add_argument("--per-class", type=INT, default=4, help="sample images per class in the grid (default: 4)")
    q.set_defaults(func=cmd_data_inspect)
    q = data_sub.add_parser("import", help="write a known dataset as an image folder",
                            description="Write a dataset as root/{train,test}/<class>/*.png with its official "
                                        "split. fashion-mnist: from the Debian package dataset-fashion-mnist (or "
                                        "--source with the four idx files); fashion-mnist-sample: the 5,000-image "
                                        "sample bundled with resforge.")
    q.add_argument("name", choices=["fashion-mnist", "fashion-mnist-sample"])
    q.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    q.add_argument("--source", help="folder holding the idx files (default: /usr/share/datasets/fashion-mnist)")
    q.set_defaults(func=cmd_data_import)

    p = add("demo", cmd_demo, "run the main job on the bundled Fashion-MNIST sample",
            "Write the bundled Fashion-MNIST sample (4,000 train + 1,000 test images) to data/, inspect it, train "
            "on it for a few minutes with the default recipe (what 'resforge train FOLDER --time-limit N' does), "
            "evaluate it on the test split and write the report.")
    p.add_argument("--minutes", type=FLOAT, default=3.0, help="training time budget, above 0 (default: 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(message)s")  # other libraries: their warnings only
        log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
        args.func(args)
    except (ResforgeError, OSError) as e:  # OSError: a folder not writable, a disk full
        print(f"resforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("resforge: interrupted", file=sys.stderr)
        return 130
    return 0
