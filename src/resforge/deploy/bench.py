"""`resforge bench`: models and backends measured side by side, as a deployment would see them.

For each model and backend, in a fresh process of its own (so that cold start and peak memory are
its own): cold start (load + first inference; what is done once per model file, an ONNX export or
the auto choice, is done before), latency percentiles at batch 1, throughput at each
batch size, and with `--images DIR` the end-to-end rate from image files (decode + preprocess +
infer), beside the peak resident memory and the file size. Warm-up, threads and duration are
explicit and printed with the table; ratios are against the first row.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from itertools import cycle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import timing
from ..errors import ConfigError, ResforgeError

if TYPE_CHECKING:
    from ..runtime.predictor import Predictor

BENCH_BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt")
PERCENTILES = (50, 90, 99, 99.9)
CHILD_TIMEOUT_S = 600  # loading, exporting and choosing, beside the timed figures


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:
        return None


def file_size_mb(source: str | os.PathLike) -> float:
    """The bytes a deployment ships: the weights and sidecar, the .onnx, or the IR's .xml and .bin."""
    from ..models.weights import resolve_model_path, sidecar_path

    p = Path(source)
    if p.suffix == ".xml":
        files = [p, p.with_suffix(".bin")]
    elif p.suffix == ".onnx":
        files = [p]
    else:
        weights = resolve_model_path(p)
        files = [weights, sidecar_path(weights)]
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def measure(source: str, backend: str, precision: str = "auto", batch_sizes: Sequence[int] = (1, 8, 32),
            threads: int | None = None, duration: float = 3.0, warmup: int = 3, images: str | None = None,
            metadata: dict[str, Any] | None = None, device: str = "auto", compile: bool = False,
            cuda_graph: bool = False) -> dict[str, Any]:
    """One model on one backend, measured in this process. On a GPU the timed batches are already on it."""
    import torch

    from ..data.folder import scan_images
    from ..runtime.measure import batch_times, sample_batch
    from ..runtime.predictor import Predictor

    if threads:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # this model's peak, also when measured beside others
    from ..tasks import recorded_task

    if recorded_task(source) == "detect":
        from ..tasks.detect_infer import check_detector_precision

        check_detector_precision(precision)
        if compile or cuda_graph:
            raise ConfigError("compile and cuda_graph apply to networks that take a batch; a detector takes a list "
                              "of images")
        return _measure_detector(source, backend, batch_sizes, threads, duration, warmup, images, device)
    first_batch = 1 if 1 in batch_sizes else batch_sizes[0]

    def load(batch_size: int) -> Predictor:
        return Predictor.load(source, backend, device, precision=precision, threads=threads, batch_size=batch_size,
                              metadata=metadata, compile=compile, cuda_graph=cuda_graph)

    if backend != "torch":  # what is done once per model file (an ONNX export, the auto choice) is not a start
        load(first_batch)
    t0 = timing.clock()
    predictor = load(first_batch)
    predictor(sample_batch(predictor.info, 1, predictor.runner.device))
    cold = timing.clock() - t0
    mode = ", ".join(m for m, on in (("compiled", compile), ("CUDA graph", cuda_graph)) if on)
    row: dict[str, Any] = {"model": source, "name": Path(source).name, "backend": predictor.backend,
                           "precision": predictor.precision + (f", {mode}" if mode else ""), "asked": backend,
                           "device": str(predictor.runner.device), "cold_start_s": cold,
                           "file_mb": file_size_mb(source), "threads": threads or torch.get_num_threads(),
                           "throughput": {}, "chosen": {}, "end_to_end": {}}
    files = scan_images([images]) if images else []
    for bs in batch_sizes:
        p = predictor
        if backend == "auto" and bs != first_batch:  # auto chooses for the batch size it will run at
            p = load(bs)
        key = str(bs)  # as JSON keeps it
        row["chosen"][key] = f"{p.backend} {p.precision}"
        _record_times(row, bs, batch_times(p, p.info, bs, duration, device=p.runner.device, warmup=warmup))
        if files:
            row["end_to_end"][key] = _files_per_second(_answers(p, bs), files, bs, duration)
    row["peak_rss_mb"] = _peak_rss_mb()
    if predictor.runner.device.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(predictor.runner.device) / 2**20
    return row


def _record_times(row: dict[str, Any], batch_size: int, times: list[float]) -> None:
    """Seconds of timed calls at `batch_size` into `row`: its throughput, and at batch 1 the latency percentiles."""
    row["throughput"][str(batch_size)] = timing.per_second(batch_size, times)
    if batch_size == 1:
        ms = np.asarray(times) * 1000
        row["latency_ms"] = {f"p{q:g}": float(np.percentile(ms, q)) for q in PERCENTILES}
        row["latency_samples"] = len(ms)


def _measure_detector(source: str, backend: str, batch_sizes: Sequence[int], threads: int | None, duration: float,
                      warmup: int, images: str | None, device: str) -> dict[str, Any]:
    """A detector on its engine (`backend` auto: its file's own), timed on the first of `images` at its own size
    (a detector's work follows what it finds: noise at the trained size without images): a batch is that many
    images in one call, which an exported graph takes one by one."""
    import torch

    from ..data.folder import load_image, scan_images
    from ..data.loader import pil_to_tensor
    from ..runtime.source import open_source
    from ..tasks.detect_infer import detector_backend, open_detector

    src = open_source(source)
    engine, pre = detector_backend(src, backend), src.info.pre
    if engine != "torch":  # what is done once per model file (a run's graph converted) is not a start
        open_detector(src, device, backend=engine)
    del src  # the timed start loads its own, and the peak memory is one model's
    files = scan_images([images]) if images else []
    if files:
        x = pil_to_tensor(load_image(files[0], pre.mode)).float() / 255
    else:
        x = torch.rand(pre.in_chans, pre.img_size, pre.img_size, generator=torch.Generator().manual_seed(0))
    t0 = timing.clock()
    loaded = open_detector(open_source(source), device, backend=engine)
    loaded.detect([x])
    cold = timing.clock() - t0
    row: dict[str, Any] = {"model": source, "name": Path(source).name, "backend": engine, "precision": "fp32",
                           "asked": backend, "device": str(loaded.device), "cold_start_s": cold,
                           "file_mb": file_size_mb(source), "threads": threads or torch.get_num_threads(),
                           "throughput": {}, "chosen": {}, "end_to_end": {}}
    for bs in batch_sizes:
        key = str(bs)
        row["chosen"][key] = f"{engine} fp32"
        _record_times(row, bs, timing.timed_calls(lambda: loaded.detect([x] * bs), duration, warmup=warmup))
        if files:
            row["end_to_end"][key] = _files_per_second(lambda batch: loaded.detect(
                [pil_to_tensor(load_image(f, pre.mode)).float() / 255 for f in batch]), files, bs, duration)
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


def _files_per_second(answer: Callable[[list[str]], Any], files: list[str], batch_size: int, duration: float
                      ) -> float:
    """Images per second from files to answers (decode, preprocess, infer: classes, a segmenter's class map or a
    detector's objects at each image's size), the files taken in turn in batches, after one untimed batch."""
    batches = cycle([files[i:i + batch_size] for i in range(0, len(files), batch_size)])
    sizes: list[int] = []

    def call() -> None:
        batch = next(batches)
        answer(batch)
        sizes.append(len(batch))

    times = timing.timed_calls(call, duration, warmup=1)
    return sum(sizes[1:]) / sum(times)


def _answers(predictor: Predictor, batch_size: int) -> Callable[[list[str]], Any]:
    """What a deployment does with a batch of files: classify them, or segment each at its own size."""
    if predictor.info.task != "segment":
        return lambda files: predictor.predict(files, batch_size=batch_size)
    from ..data.folder import load_image
    from ..data.loader import pil_to_tensor
    from ..tasks.segment_infer import LoadedSegmenter

    loaded = LoadedSegmenter.from_info(predictor.runner, predictor.info)
    return lambda files: [loaded.segment(pil_to_tensor(load_image(f, loaded.pre.mode)).float() / 255)
                          for f in files]


def bench(models: Sequence[str | os.PathLike], backends: Sequence[str], *, precision: str = "auto",
          batch_sizes: Sequence[int], threads: int | None = None, duration: float,
          warmup: int = 3, images: str | os.PathLike | None = None, isolate: bool = True, progress: bool = True,
          metadata: dict[str, Any] | None = None, device: str = "auto", compile: bool = False,
          cuda_graph: bool = False) -> list[dict[str, Any]]:
    """Every model on every backend; a row each (or {"error"} for a pair that cannot run)."""
    from tqdm.auto import tqdm

    _check(backends, batch_sizes, threads, duration, warmup)
    if (compile or cuda_graph) and set(backends) != {"torch"}:
        raise ConfigError(f"{'--compile' if compile else '--cuda-graph'} applies to the torch backend alone: give "
                          "--backends torch")
    from ..device import resolve_device

    resolve_device(device)  # a device this machine lacks fails here, not in each measuring process
    if not models:
        raise ConfigError("give at least one model to measure")
    for m in models:
        if not Path(m).exists():
            raise ConfigError(f"no model at {m}")
    if images is not None and not Path(images).is_dir():
        raise ConfigError(f"--images takes a folder of images, got {images}")
    pairs = [(str(m), b) for m in models for b in backends]
    rows = []
    for model, backend in tqdm(pairs, desc="bench", unit="run", disable=None if progress else True):
        kwargs = dict(source=model, backend=backend, precision=precision, batch_sizes=list(batch_sizes),
                      threads=threads, duration=duration, warmup=warmup, images=str(images) if images else None,
                      metadata=metadata, device=device, compile=compile, cuda_graph=cuda_graph)
        if isolate:
            rows.append(_in_child(kwargs))
        else:
            try:
                rows.append(measure(**kwargs))
            except ResforgeError as e:
                rows.append({"error": str(e)})
        rows[-1].setdefault("model", model)
        rows[-1].setdefault("name", Path(model).name)
        rows[-1].setdefault("asked", backend)
    return rows


def _in_child(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`measure` in a process of its own (`python -m resforge.deploy.bench`), bounded in time."""
    limit = CHILD_TIMEOUT_S + 4 * kwargs["duration"] * len(kwargs["batch_sizes"])
    try:
        r = subprocess.run([sys.executable, "-m", "resforge.deploy.bench", json.dumps(kwargs)], capture_output=True,
                           text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"the measuring process did not finish in {limit:.0f} s"}
    lines = r.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the measuring process failed ({tail[:300]})"}


def _check(backends: Sequence[str], batch_sizes: Sequence[int], threads: int | None, duration: float,
           warmup: int) -> None:
    unknown = [b for b in backends if b not in BENCH_BACKENDS]
    if unknown or not backends:
        raise ConfigError(f"backends must be among {', '.join(BENCH_BACKENDS)}, got {', '.join(unknown) or 'none'}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive whole numbers, got {list(batch_sizes)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be a positive count, got {threads}")
    if not duration > 0 or warmup < 0:
        raise ConfigError(f"duration must be above 0 seconds and warmup at least 0, got {duration} and {warmup}")


def table(rows: list[dict[str, Any]], batch_sizes: Sequence[int]) -> str:
    """A markdown table: one row per model and backend, throughput ratios against the first good row."""
    good = [r for r in rows if "error" not in r]
    base = good[0] if good else None
    e2e = any(r.get("end_to_end") for r in good)
    header = ["model", "backend", "precision", "cold start s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms"]
    header += [f"b{b} img/s" for b in batch_sizes]
    header += [f"b{b} files img/s" for b in batch_sizes] if e2e else []
    gpu = any("peak_gpu_mb" in r for r in good)
    header += ["peak RSS MB"] + (["peak GPU MB"] if gpu else []) + ["file MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['asked']} | - | " + f"error: {r['error']}" +
                         " |" * (len(header) - 3))
            continue
        backend = r["backend"] if r["asked"] != "auto" else "auto: " + ", ".join(
            f"b{b} {c}" for b, c in r["chosen"].items())
        backend += f" on {r['device']}" if r.get("device", "cpu") != "cpu" else ""
        lat = r.get("latency_ms") or {}
        cells = [r["name"], backend, r["precision"], f"{r['cold_start_s']:.2f}"]
        cells += [f"{lat[f'p{q:g}']:.2f}" if lat else "-" for q in PERCENTILES]
        for b in map(str, batch_sizes):
            rate = r["throughput"][b]
            cells.append(f"{rate:.1f} ({rate / base['throughput'][b]:.2f}x)")
        if e2e:
            for b in map(str, batch_sizes):
                rate = r["end_to_end"].get(b)
                cells.append(f"{rate:.1f} ({rate / r['throughput'][b]:.2f} of tensors)" if rate else "-")
        cells += [f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"]
        cells += [f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"] if gpu else []
        cells.append(f"{r['file_mb']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_line(rows: list[dict[str, Any]], duration: float, warmup: int) -> str:
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    samples = sorted({r["latency_samples"] for r in rows if "latency_samples" in r})
    return (f"threads {', '.join(map(str, threads)) or '-'}; warm-up {warmup} calls, then {duration:g} s per figure "
            f"(latency from {'-'.join(map(str, samples[:1] + samples[-1:])) or '-'} calls); ratios against the first "
            "row; each model and backend in a process of its own")


if __name__ == "__main__":  # a measuring process: arguments as JSON in argv[1], the row as JSON on the last line
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        row = measure(**json.loads(sys.argv[1]))
    except ResforgeError as e:
        row = {"error": str(e)}
    print(json.dumps(row))
