"""Ensembles: several trained models as one, their probabilities averaged (optionally weighted).

The members must know the same classes and take the same preprocessing, so one image is prepared
once for all of them. The ensemble is one network (`EnsembleNet`) whose output is the log of the
weighted mean probability, so the softmax every consumer applies gives that probability back; it is
exported as one ONNX graph carrying the usual model record, which `predict`, `eval`, `bench` and
`serve` take like any model file. Weights are given, equal, or fitted on the members' recorded
validation split by minimising the ensemble's negative log-likelihood over the simplex.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import ConfigError, ExportError
from ..evaluation.evaluate import labelled_samples
from ..evaluation.metrics import ClassificationReport, classification_report
from ..io import temp_dir, write_json
from ..runtime.backends import TorchRunner
from ..runtime.convert import DEFAULT_OPSET, move_into_place, to_onnx
from ..runtime.predictor import Predictor
from ..runtime.source import Source, open_source

log = logging.getLogger("resforge")

FIT_STEPS = 200  # of LBFGS on the weights' logits
PARITY_TOLERANCE = 1e-4  # largest probability difference between the ONNX file and the torch ensemble


class EnsembleNet(nn.Module):
    """log(sum_i w_i softmax(member_i(x))): logits whose softmax is the weighted mean probability."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = sum(w * m(x).softmax(-1) for w, m in zip(self.weights, self.members))
        return probs.clamp_min(1e-12).log()


def build_ensemble(sources: Sequence[str | os.PathLike], data: str | os.PathLike, *, weights: list[float] | None,
                   fit: bool, out: str | os.PathLike | None, batch_size: int, workers: int) -> dict[str, Any]:
    """Average several models' probabilities (equal, `weights`, or weights `fit` on the first member's recorded
    validation split), evaluate the ensemble beside each member on a labelled folder, and export it as one ONNX
    model (`<out>/ensemble.onnx`, default out: runs/ensemble-<folder>) that every command takes."""
    if weights is not None and fit:
        raise ConfigError("give --weights or --fit-weights, not both")
    chosen = check_weights(weights, len(sources)) if weights is not None else None  # before any model is read
    members = open_members(sources)
    names = [str(s) for s in sources]
    predictors = [Predictor(TorchRunner(m.model, torch.device("cpu"), "fp32"), m.info, n, m.model)
                  for n, m in zip(names, members)]
    classes = members[0].info.classes
    samples, _ = labelled_samples(data, classes)
    out = Path(out) if out else Path("runs") / f"ensemble-{Path(data).resolve().name}"

    def probabilities(items: list) -> tuple[list[torch.Tensor], torch.Tensor]:
        outputs = [p.infer(items, batch_size, workers) for p in predictors]
        return [logits.softmax(-1) for logits, _ in outputs], outputs[0][1]

    if fit:
        val = members[0].info.recorded_samples(members[0].path, "val")
        if not val:
            raise ConfigError(f"the validation split of {names[0]}'s run was not found (its split.csv or data folder "
                              "moved) to fit the weights on: give --weights")
        chosen = fit_weights(*probabilities(val))
        log.info("weights fitted on %d validation images of %s: %s", len(val), names[0],
                 ", ".join(f"{w:.3f}" for w in chosen))
    chosen = chosen or [1 / len(members)] * len(members)
    member_probs, targets = probabilities(samples)
    rows = [{"model": n, "weight": w, **_scores(classification_report(p.numpy(), targets.numpy(), classes))}
            for n, w, p in zip(names, chosen, member_probs)]
    mixed = classification_report(mix(member_probs, chosen).numpy(), targets.numpy(), classes)
    result = {"data": str(data), "images": len(samples), "weights": chosen, "members": rows,
              "ensemble": _scores(mixed)}
    path = export_ensemble(members, chosen, names, out / "ensemble.onnx", [s for s, _ in samples[:64]],
                           metrics={"top1": mixed.top1, "top5": mixed.top5, "data": str(data)})
    write_json(out / "ensemble.json", {**result, "path": str(path)})
    best = max(rows, key=lambda r: r["top1"])
    log.info("ensemble of %d on %s (%d images): top-1 %.2f%% (best member %.2f%%, %s); written %s",
             len(members), data, len(samples), 100 * mixed.top1, 100 * best["top1"], best["model"], path)
    return {**result, "path": path}


def _scores(report: ClassificationReport) -> dict[str, float]:
    return {"top1": report.top1, "top5": report.top5, "macro_f1": report.macro["f1"]}


def open_members(sources: Sequence[str | os.PathLike]) -> list[Source]:
    """The members' networks and records, checked to agree on classes and preprocessing."""
    if len(sources) < 2:
        raise ConfigError(f"an ensemble needs at least two models, got {len(sources)}")
    members = [open_source(s) for s in sources]
    for s, m in zip(sources, members):
        if m.kind != "torch":
            raise ConfigError(f"{s} is an exported {m.kind} file: give run directories or .safetensors files, from "
                              "which the ensemble is built and exported as one graph")
    first = members[0].info
    for s, m in zip(sources[1:], members[1:]):
        if m.info.classes != first.classes:
            raise ConfigError(f"{s} knows other classes than {sources[0]} ({len(m.info.classes)} against "
                              f"{len(first.classes)}, or in another order): members must predict the same classes")
        if m.info.pre != first.pre:
            raise ConfigError(f"{s} takes other preprocessing than {sources[0]} ({m.info.pre} against {first.pre}): "
                              "members must share the input size, resize, normalisation and channels")
    return members


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    """Given weights as a distribution (they must be finite, non-negative, one per member, not all zero)."""
    if len(weights) != count:
        raise ConfigError(f"--weights needs one weight per model: {count} models, {len(weights)} weights")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not max(weights) > 0:
        raise ConfigError(f"--weights must be finite, non-negative and not all zero, got {list(weights)}")
    scaled = [w / max(weights) for w in weights]  # first to at most 1: the sum of large weights overflows
    return [w / sum(scaled) for w in scaled]


def fit_weights(member_probs: Sequence[torch.Tensor], targets: torch.Tensor) -> list[float]:
    """Weights on the simplex (a softmax of free logits) minimising the ensemble's NLL on labelled images."""
    if not len(targets):
        raise ConfigError("no validation images to fit the weights on: give --weights, or keep the runs' data")
    stacked = torch.stack([p.double() for p in member_probs])  # [M, N, C]
    logits = torch.zeros(len(member_probs), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], max_iter=FIT_STEPS, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        opt.zero_grad()
        mixed = torch.einsum("m,mnc->nc", logits.softmax(0), stacked)
        loss = -mixed.gather(1, targets[:, None]).clamp_min(1e-12).log().mean()
        loss.backward()
        return loss

    opt.step(nll)
    return logits.detach().softmax(0).tolist()


def mix(member_probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The ensemble's probabilities from its members'."""
    return sum(w * p for w, p in zip(weights, member_probs))


def export_ensemble(members: list[Source], weights: list[float], names: list[str], path: Path,
                    check_images: list[str], metrics: dict[str, Any] | None = None) -> Path:
    """One ONNX graph of the ensemble with its record; written only once onnxruntime agrees with torch on
    `check_images` within PARITY_TOLERANCE."""
    import onnx

    net = EnsembleNet([m.model.eval() for m in members], weights).eval()
    first = members[0].info
    info = replace(first, arch={"name": "ensemble", "members": [{"source": n, "model": m.info.arch}
                                                                for n, m in zip(names, members)],
                                "weights": weights},
                   metrics=metrics or {}, trained={}, profile=None,  # a member's profile describes its logits alone
                   export={"format": "onnx", "dtype": "fp32", "opset": DEFAULT_OPSET, "dynamic_batch": True,
                           "resforge": __version__, "torch": torch.__version__})
    if path.suffix.lower() != ".onnx":
        raise ConfigError(f"an ensemble is exported as an .onnx file, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_dir(path.parent, "export") as tmp:
        written = tmp / path.name
        onnx.save(to_onnx(net, info, dynamic_batch=True), str(written))
        reference = Predictor(TorchRunner(net, torch.device("cpu"), "fp32"), info, "ensemble", net)
        exported = Predictor.load(written, "onnxruntime", precision="fp32")
        a, b = reference.probabilities(check_images), exported.probabilities(check_images)
        diff = float(abs(a - b).max()) if len(check_images) else 0.0
        if diff > PARITY_TOLERANCE or (a.argmax(1) != b.argmax(1)).any():
            raise ExportError(f"the exported ensemble disagrees with torch on {len(check_images)} images (max "
                              f"probability difference {diff:.2e}); nothing was written")
        log.info("ensemble parity on %d images: max probability difference %.2e", len(check_images), diff)
        move_into_place(written, path, "onnx")
    return path
