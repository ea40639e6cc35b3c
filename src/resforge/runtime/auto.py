"""`backend="auto"`: the fastest backend here for a model, measured once at the batch size it will run at
and remembered in the cache, per model content, batch size, threads, machine and versions."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..device import cpu_name
from ..errors import CheckpointError, ConfigError
from ..io import write_json
from ..models.weights import cache_dir
from .backends import Runner, require_backend
from .build import KINDS, build_runner
from .measure import batch_times
from .source import Source, fingerprint

log = logging.getLogger("resforge")

AUTO_SECONDS = 0.5  # measuring time per candidate backend
AUTO_MAX_BATCH = 16  # larger batches are measured at this size: the ranking holds, the measuring stays short


def _candidates(source: Source, device: torch.device) -> list[str]:
    """The backends worth measuring for `source` here (installed, and able to run it on this device)."""
    out = []
    for backend in KINDS[source.kind]:
        if backend == "tensorrt":
            continue  # only on request: its engine build takes minutes
        if backend != "torch":
            try:
                engine = require_backend(backend)
            except ConfigError:
                continue
            if backend == "openvino" and (device.type != "cpu" or (source.kind == "onnx" and source.info.takes_pixels)):
                continue
            if backend == "onnxruntime" and device.type == "cuda" and \
                    "CUDAExecutionProvider" not in engine.get_available_providers():
                continue
        out.append(backend)
    return out



def _auto_key(source: Source, device: torch.device, precision: str, threads: int | None, batch_size: int,
              candidates: list[str]) -> str:
    import onnxruntime

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    parts = [fingerprint(source), source.kind, str(device), precision, threads or os.cpu_count(), batch_size,
             candidates, cpu_name(), __version__, torch.__version__, onnxruntime.__version__, ov_version]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def choose_backend(source: Source, device: torch.device, precision: str, threads: int | None, batch_size: int
                   ) -> tuple[Runner, dict[str, Any]]:
    """The fastest backend for `source` here, measured at `batch_size` once and remembered in the cache."""
    candidates = _candidates(source, device)
    key = _auto_key(source, device, precision, threads, batch_size, candidates)
    cache = cache_dir() / "auto-backend.json"
    known = _read_json(cache)
    if key in known:
        record = known[key]
        log.info("auto backend: %s %s (measured before at batch %d: %s)", record["backend"], record["precision"],
                 batch_size, _rates(record["img_per_s"]))
        return build_runner(source, record["backend"], device, precision, threads), record
    n = min(batch_size, AUTO_MAX_BATCH)
    rates: dict[str, float] = {}
    refused: dict[str, str] = {}
    best: tuple[float, Runner] | None = None
    for backend in candidates:
        try:
            runner = build_runner(source, backend, device, precision, threads)
            times = batch_times(runner, source.info, n, AUTO_SECONDS, warmup=2, max_calls=50)
        except (ConfigError, CheckpointError) as e:  # warm-up included: kernels chosen, memory allocated
            log.debug("auto backend: %s left out (%s)", backend, e)
            refused[backend] = str(e)
            continue
        per_image = statistics.median(times) / n
        rates[f"{backend} {runner.precision}"] = 1 / per_image
        if best is None or per_image < best[0]:
            best = (per_image, runner)
    if best is None:  # the engines' reasons: an invalid graph is named as such, not as a missing backend
        raise ConfigError(f"no backend here can run {source.path} on {device}: "
                          + ("; ".join(f"{b}: {why}" for b, why in refused.items()) or "none is installed for it"))
    runner = best[1]
    record = {"backend": runner.backend, "precision": runner.precision, "batch_size": batch_size, "img_per_s": rates}
    write_json(cache, {**_read_json(cache), key: record})
    log.info("auto backend: %s %s, the fastest here at batch %d (%s)", runner.backend, runner.precision, batch_size,
             _rates(rates))
    return runner, record


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{name} {r:.1f} img/s" for name, r in sorted(rates.items(), key=lambda kv: -kv[1]))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
