"""`make demo`: the main job, end to end, on the embedded default.

The Fashion-MNIST sample that ships with resforge is written out as an image folder, inspected,
and a ResNet-50 is trained on it for a few minutes of CPU time, evaluated on its test split, and
reported. Each step prints the command that does the same from a shell.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import api
from .data.sources import import_dataset

log = logging.getLogger("resforge")

DATA = Path("data/fashion-mnist-sample")
# 28-px images upscaled to 32, the standard stem (the small-input stem is more accurate given many epochs,
# but four times the cost), the short-budget recipe, and the number of epochs fitted to the time limit.
TRAIN = dict(model="resnet50", recipe="fast", img_size=32, crop_pct=1.0, small_input=False, name="demo")


def run_demo(minutes: float = 3.0) -> dict:
    if not DATA.exists():
        log.info("$ resforge data import fashion-mnist-sample --out %s", DATA)
        import_dataset("fashion-mnist-sample", DATA)
    log.info("$ resforge data inspect %s", DATA)
    api.inspect_data(DATA, out=Path("runs") / "inspect-fashion-mnist-sample")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in TRAIN.items() if not isinstance(v, bool))
    log.info("\n$ resforge train %s %s --no-small-input --time-limit %g", DATA, flags, minutes)
    out = api.train(DATA, time_limit=minutes, epochs=100, **TRAIN)
    log.info("\nNext: resforge eval %s <labelled folder> | resforge predict %s <images>", out["run_dir"],
             out["run_dir"])
    return out
