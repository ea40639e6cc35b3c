"""`resforge optimize`: the compression chain on one run, every variant measured the same way, and the
best that meets a target.

The chain: the baseline (fp32: PyTorch, and ONNX on onnxruntime and OpenVINO) -> int8 of it ->
channel pruning with a distilled fine-tune -> int8 of the pruned model -> low-rank factorisation.
Every variant is evaluated on the source run's own validation split (top-1; a segmenter's mIoU, a
detector's AP@.5) and timed by `bench`'s `measure` (latency at batch 1, throughput at batch 16, at
steady speed, one after another in this process), with its parameters, MACs (a dense model's
backbone's) and file size. A dense run's chain is the same but for its own ways: a detector's int8
is NNCF's alone, and low-rank factorisation is for classifiers. `report.md` and a self-contained `report.html`
(the Pareto plots inline) list them and name the best variant that meets the target, or by how
much the closest one misses it.

Each stage is recorded in `optimize.json` as it ends; a killed `optimize` run again with the same
name skips what is done and resumes a fine-tune that was cut off.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..deploy.bench import bench, file_size_mb
from ..deploy.export import export
from ..runtime.predictor import Predictor
from ..runtime.record import ModelInfo
from ..runtime.source import open_source
from ..errors import ConfigError
from ..evaluation.metrics import topk_correct
from ..evaluation.plots import plot_pareto
from ..io import write_json, write_text
from ..models import load_model
from ..models.summary import summarize
from ..training.run import run as training_run
from . import runs
from .prune import check_target, prunable
from .quantize import SUFFIX, check_calibration, quantize

log = logging.getLogger("resforge")

# target kind -> (variant field, unit suffixes and their scale)
TARGETS = {"latency": ("latency_ms", {"ms": 1.0, "s": 1000.0, "": 1.0}),
           "size": ("file_mb", {"mb": 1.0, "kb": 1e-3, "gb": 1e3, "": 1.0}),
           "macs": ("gmacs", {"g": 1.0, "m": 1e-3, "": 1e-9}),
           "accuracy-drop": ("drop", {"pt": 1.0, "": 1.0})}


@dataclass
class Target:
    kind: str
    value: float  # in the unit of the variant field (ms, MB, GMACs, points)

    @classmethod
    def parse(cls, text: str) -> Target:
        """`latency=5ms`, `size=10MB`, `macs=1G`, `accuracy-drop=1.0`."""
        m = re.fullmatch(r"\s*([a-z-]+)\s*=\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*", text or "")
        if not m or m.group(1) not in TARGETS:
            raise ConfigError(f"--target takes latency=5ms, size=10MB, macs=1G or accuracy-drop=1.0, got {text!r}")
        kind, number, unit = m.group(1), float(m.group(2)), m.group(3).lower()
        scales = TARGETS[kind][1]
        if unit not in scales or not 0 < number * scales.get(unit, 1) < math.inf:
            raise ConfigError(f"--target {kind} needs a positive, finite number in "
                              f"{', '.join(u for u in scales if u)}, got {text!r}")
        return cls(kind, number * scales[unit])

    def field(self) -> str:
        return TARGETS[self.kind][0]

    def met(self, variant: dict[str, Any]) -> bool:
        return variant[self.field()] <= self.value

    def describe(self, metric: str = "top-1") -> str:
        unit = {"latency": "ms", "size": "MB", "macs": " GMACs", "accuracy-drop": f" pt of {metric} lost"}[self.kind]
        return f"{self.kind} <= {self.value:g}{unit}"


def optimize(source: str | os.PathLike, target: str, *, out: str | os.PathLike, macs: float, energy: float, calib: int, duration: float, budget: float | None,
             epochs: int | None, progress: bool = True) -> dict[str, Any]:
    """Run the chain on `source` (a run directory) into `out`; return the variants and the pick."""
    from tqdm.auto import tqdm

    goal = Target.parse(target)
    run = Path(source)
    if not (run / "best.safetensors").is_file() or not (run / "split.csv").is_file():
        raise ConfigError(f"{source} is not a run directory (best.safetensors and split.csv): optimize starts from "
                          "a training run")
    if budget is not None and budget <= 0:
        raise ConfigError(f"--budget must be a positive number of minutes, got {budget:g}")
    check_target(None, macs)
    if not 0 < energy < 1 or calib < 1 or duration <= 0:
        raise ConfigError(f"--energy must lie in (0, 1), --calib be at least 1 and --duration above 0; got "
                          f"{energy:g}, {calib} and {duration:g}")
    out = Path(out)
    if out.resolve().is_relative_to(run.resolve()):  # it would write over the run's report.md, or into it
        raise ConfigError(f"the output folder {out} is {'inside ' if out.resolve() != run.resolve() else ''}the run "
                          f"it optimizes ({run}): give another --name or --project")
    model, meta = load_model(run)
    task = meta.get("task", "classify")
    # what the int8 and pruning stages would refuse, before a baseline is exported
    check_calibration(run, "openvino" if task == "detect" else "onnxruntime", calib, "minmax", "auto", None)
    prunable(model, "l1")
    del model
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "optimize.json"
    state = _read_state(state_file, run, goal)
    fine_tune = ({"time_limit": budget / 2} if budget else {}) | ({"epochs": epochs} if epochs else {})
    quantizers = ("openvino",) if task == "detect" else ("onnxruntime", "openvino")
    stages: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("baseline", lambda: _baseline(run, out)),
        ("int8", lambda: _int8(run / "best.safetensors", out / "int8", calib, quantizers)),
        ("pruned", lambda: _fine_tuned(runs.prune, runs.PruneOptions(macs=macs), run, out, "pruned", fine_tune,
                                       progress)),
        ("pruned-int8", lambda: _int8(out / "pruned" / "best.safetensors", out / "pruned-int8", calib, quantizers)),
    ]
    if task == "classify":
        stages.append(("lowrank", lambda: _fine_tuned(runs.lowrank, runs.LowrankOptions(energy=energy), run, out,
                                                      "lowrank", fine_tune, progress)))
    bar = tqdm(stages, desc="optimize", unit="stage", disable=None if progress else True)
    for name, make in bar:
        bar.set_postfix_str(name)
        if name in state["stages"]:
            continue
        state["stages"][name] = make()
        write_json(state_file, state)
    variants = [v for name, _ in stages for v in state["stages"][name]]
    score = _scorer(task, ModelInfo.from_sidecar(meta, str(run)), run / "best.safetensors")
    for v in tqdm(variants, desc="measure", unit="variant", disable=None if progress else True):
        if "score" not in v:
            v.update(_measure(v, score, duration, task))
            write_json(state_file, state)
    base = variants[0]["score"]
    for v in variants:
        v["drop"] = 100 * (base - v["score"])
    metric = METRICS[task]
    pick = _pick(variants, goal, metric)
    state["pick"] = pick
    write_json(state_file, state)
    _write_reports(out, run, goal, variants, pick, metric)
    log.info("%s", pick["line"])
    log.info("report: %s (and report.html)", out / "report.md")
    return state


def _read_state(path: Path, run: Path, goal: Target) -> dict[str, Any]:
    import json

    fresh = {"source": str(run.resolve()), "target": {"kind": goal.kind, "value": goal.value}, "stages": {}}
    if not path.is_file():
        return fresh
    try:
        state = json.loads(path.read_text())
    except ValueError:
        return fresh
    if state.get("source") != fresh["source"]:
        raise ConfigError(f"{path.parent} holds an optimize of {state.get('source')}: give another --name")
    state["target"] = fresh["target"]  # the variants stand; a new target only changes the pick
    log.info("resuming %s: %s done", path.parent, ", ".join(state["stages"]) or "nothing")
    return state


def _variant(name: str, path: Path, backend: str, precision: str, model: Path, dtype: str = "fp32"
             ) -> dict[str, Any]:
    """A file to measure on a backend (`precision`: the engine's setting; `dtype`: what the file holds);
    `model` is the saved network whose parameters and MACs it has."""
    net, meta = load_model(model)
    backbone = getattr(net, "resnet", None) or getattr(net, "backbone", net)  # a detector's, a segmenter's, or net
    s = summarize(backbone, meta["preprocess"]["img_size"])
    return {"name": name, "path": str(path), "backend": backend, "precision": precision, "dtype": dtype,
            "params": sum(p.numel() for p in net.parameters()), "gmacs": s.macs / 1e9, "file_mb": file_size_mb(path)}


def _baseline(run: Path, out: Path) -> list[dict[str, Any]]:
    onnx = export(run, "onnx", out / "baseline.onnx", dynamic_batch=True).path
    weights = run / "best.safetensors"
    return [_variant("fp32", weights, "torch", "fp32", weights),
            _variant("fp32", onnx, "onnxruntime", "auto", weights),
            _variant("fp32", onnx, "openvino", "fp32", weights)]


def _int8(weights: Path, base: Path, calib: int, backends: tuple[str, ...]) -> list[dict[str, Any]]:
    """int8 for each engine with its own quantiser (onnxruntime's QDQ, NNCF for OpenVINO)."""
    rows = []
    for backend in backends:
        q = quantize(weights, backend, base.with_name(f"{base.name}{SUFFIX[backend]}"), calib=calib)
        rows.append(_variant(base.name, q.path, backend, "auto" if backend == "onnxruntime" else "fp32", weights,
                             dtype="int8"))
    return rows


def _fine_tuned(step: Callable[..., dict[str, Any]], target: Any, run: Path, out: Path, name: str, options: dict[str, Any],
                progress: bool) -> list[dict[str, Any]]:
    """A pruned or factorised run in out/<name>: resumed when a kill cut its fine-tune short."""
    run_dir = out / name
    if (run_dir / "last.ckpt").is_file() and not (run_dir / "results.json").is_file():
        log.info("resuming the %s fine-tune in %s", name, run_dir)
        training_run(resume=run_dir, progress=progress)
    elif not (run_dir / "results.json").is_file():
        if run_dir.exists():
            shutil.rmtree(run_dir)  # started, but not as far as a checkpoint: from the start
        step(run, target, project=str(out), name=name, progress=progress, **options)
    onnx = export(run_dir, "onnx", out / f"{name}.onnx", dynamic_batch=True).path
    weights = run_dir / "best.safetensors"
    return [_variant(name, onnx, "onnxruntime", "auto", weights), _variant(name, onnx, "openvino", "fp32", weights)]


METRICS = {"classify": "top-1", "segment": "mIoU", "detect": "AP@.5"}


def _scorer(task: str, info: ModelInfo, model: Path) -> Callable[[dict[str, Any]], dict[str, float]]:
    """What a variant scores on the run's validation split: top-1 (and top-5), mIoU, or AP@.5 (and AP)."""
    if task == "segment":
        from ..tasks.segment_infer import open_segmenter, segmenter_miou, validation_masks

        masks = validation_masks(info, model)
        return lambda v: {"score": segmenter_miou(open_segmenter(open_source(v["path"]), backend=v["backend"]),
                                                  masks)}
    if task == "detect":
        from ..data.annotations import read_recorded_split
        from ..tasks.detect_infer import detection_figures, open_detector

        data, split = info.trained.get("data"), info.recorded_split(model)
        if not data or split is None or not Path(data).is_dir():
            raise ConfigError(f"the folder {model}'s run was trained on (or its split.csv) moved: optimize measures "
                              "the run on its own validation images")
        val = read_recorded_split(data, split).val

        def ap(v: dict[str, Any]) -> dict[str, float]:
            m, _, _ = detection_figures(open_detector(open_source(v["path"]), backend=v["backend"]), val)
            return {"score": m["map50"], "ap": m["map"]}
        return ap
    samples = info.recorded_samples(model, "val")

    def top(v: dict[str, Any]) -> dict[str, float]:
        predictor = Predictor.load(v["path"], v["backend"], precision=v["precision"], batch_size=64)
        logits, targets = predictor.infer(samples, 64)
        k = topk_correct(logits, targets, (1, 5))
        return {"score": k[1] / len(targets), "top5": k[5] / len(targets)}
    return top


def _measure(v: dict[str, Any], score: Callable[[dict[str, Any]], dict[str, float]], duration: float, task: str
             ) -> dict[str, Any]:
    """The score on the validation split and latency/throughput by `bench`, for one variant (a detector's batch
    of 16: 16 images in one call, which a graph takes one by one)."""
    figures = score(v)
    # in this process: the variants are compared at their steady speed (cold start and memory are bench's)
    row = bench([v["path"]], [v["backend"]], precision=v["precision"], batch_sizes=[1, 16], duration=duration,
                isolate=False, progress=False)[0]
    if "error" in row:
        raise ConfigError(f"measuring {v['name']} on {v['backend']} failed: {row['error']}")
    return {**figures, "latency_ms": row["latency_ms"]["p50"], "latency_p99_ms": row["latency_ms"]["p99"],
            "img_per_s_16": row["throughput"]["16"]}


def _pick(variants: list[dict[str, Any]], goal: Target, metric: str = "top-1") -> dict[str, Any]:
    """The most accurate variant that meets a speed or size target (the fastest that meets an accuracy
    target); else the closest, and by how much it misses."""
    field = goal.field()
    meeting = [v for v in variants if goal.met(v)]
    if meeting:
        best = (min(meeting, key=lambda v: v["latency_ms"]) if goal.kind == "accuracy-drop"
                else max(meeting, key=lambda v: (v["score"], -v["latency_ms"])))
        change = f"{best['drop']:.2f} pt lost" if best["drop"] >= 0 else f"{-best['drop']:.2f} pt gained"
        line = (f"best variant for {goal.describe(metric)}: {best['name']} on {best['backend']} ({best['dtype']}), "
                f"{metric} {best['score']:.2%} ({change} against fp32), {best['latency_ms']:.2f} ms at batch 1, "
                f"{best['file_mb']:.1f} MB")
        return {"met": True, "variant": f"{best['name']} {best['backend']}", "line": line}
    closest = min(variants, key=lambda v: v[field])
    line = (f"no variant meets {goal.describe(metric)}: the closest, {closest['name']} on {closest['backend']}, has "
            f"{closest[field]:.3g} ({closest[field] - goal.value:+.3g} over)")
    return {"met": False, "variant": f"{closest['name']} {closest['backend']}", "line": line}


def _score_columns(metric: str) -> list[tuple[str, str]]:
    """(header, format) of what a run scored in `metric` is measured by on its validation split."""
    if metric == "top-1":
        return [("top-1", "{score:.2%}"), ("top-5", "{top5:.2%}")]
    return [(metric, "{score:.3f}")] + ([("AP", "{ap:.3f}")] if metric == "AP@.5" else [])


def columns(metric: str) -> list[tuple[str, str]]:
    """(header, format) of the report's table for a run scored in `metric`."""
    macs = "GMACs" if metric == "top-1" else "backbone GMACs"
    return [("variant", "{name}"), ("backend", "{backend} {dtype}"), *_score_columns(metric),
            ("drop (pt)", "{drop:+.2f}"), ("params", "{params:,}"), (macs, "{gmacs:.3f}"), ("file MB", "{file_mb:.2f}"),
            ("p50 ms (b1)", "{latency_ms:.2f}"), ("p99 ms (b1)", "{latency_p99_ms:.2f}"),
            ("img/s (b16)", "{img_per_s_16:.1f}")]


def _write_reports(out: Path, run: Path, goal: Target, variants: list[dict[str, Any]], pick: dict[str, Any],
                   metric: str) -> None:
    cols = columns(metric)
    cells = [[fmt.format(**v) for _, fmt in cols] for v in variants]
    plot = plot_pareto(variants, out / "pareto.png", metric)
    md = [f"# optimize {run}", "", f"Target: {goal.describe(metric)}. {pick['line']}.", "",
          "| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(r) + " |" for r in cells]
    scored = " and ".join(h for h, _ in _score_columns(metric))
    md += ["", f"{scored} on the run's validation split; latency and throughput measured by `resforge bench`, one "
               "variant after another on this machine.", "", "![Pareto](pareto.png)", ""]
    write_text(out / "report.md", "\n".join(md))
    image = base64.b64encode(plot.read_bytes()).decode()
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>optimize {html.escape(str(run))}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>"
            f"</head><body><h1>optimize {html.escape(str(run))}</h1><p>Target: {html.escape(goal.describe(metric))}. "
            f"<b>{html.escape(pick['line'])}</b>.</p><table><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h, _ in cols) + f"</tr>{rows}</table>"
            f"<p><img alt='Pareto: {html.escape(metric)} against latency and size' "
            f"src='data:image/png;base64,{image}'></p></body></html>\n")
    write_text(out / "report.html", page)
