"""`make demo`: the main job, end to end, on the embedded default.

The Fashion-MNIST sample that ships with resforge is written out as an image folder, inspected,
and trained on for a few minutes of CPU time with the default recipe, the one a user gets who
names nothing but the folder and the budget; the best model is evaluated on the test split and
reported, exported to ONNX (checked against PyTorch) and measured on each backend, then put
through a short `optimize` (int8, pruning, low-rank; every variant measured). Each step prints the
command that does the same from a shell.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from . import api
from .data.sources import import_dataset
from .deploy.bench import settings_line, table
from .errors import ConfigError

log = logging.getLogger("resforge")

DATA = Path("data/fashion-mnist-sample")
NAME = "demo"
OPTIMIZE_MINUTES = 2.0  # fine-tuning in the demo's optimize, pruned and low-rank together


def run_demo(minutes: float, optimize_minutes: float = OPTIMIZE_MINUTES, seconds: float = 1.0) -> dict:
    """`seconds`: timed calls per bench figure."""
    if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
        raise ConfigError(f"--minutes must be a number of minutes above 0, got {minutes}")
    if not DATA.exists():
        log.info("$ resforge data import fashion-mnist-sample --out %s", DATA)
        import_dataset("fashion-mnist-sample", DATA)
    log.info("$ resforge data inspect %s", DATA)
    api.inspect_data(DATA, out=Path("runs") / "inspect-fashion-mnist-sample")
    log.info("\n$ resforge train %s --time-limit %g --name %s", DATA, minutes, NAME)
    out = api.train(DATA, time_limit=minutes, name=NAME)
    test = out["results"]["test"]
    log.info("\ntest top-1 %.2f%% on %d images the model never saw; report: %s", 100 * test["top1"],
             test["num_samples"], out["report"])
    run = out["run_dir"]
    log.info("\n$ resforge export %s --format onnx", run)
    exported = api.export(run, "onnx")
    log.info("\n$ resforge bench %s --backends torch,onnxruntime,openvino --batch-sizes 1,32 --duration %g", run,
             seconds)
    batch_sizes = [1, 32]
    rows = api.bench([run], ["torch", "onnxruntime", "openvino"], batch_sizes=batch_sizes, duration=seconds)
    log.info("%s\n%s", table(rows, batch_sizes), settings_line(rows, seconds, 3))
    target = "latency=2ms"
    log.info("\n$ resforge optimize %s --target %s --budget %g --duration %g", run, target, optimize_minutes, seconds)
    api.optimize(run, target, budget=optimize_minutes, duration=seconds)
    log.info("\nNext: resforge eval %s <labelled folder> | resforge predict %s <images>", run, exported.path)
    return out
