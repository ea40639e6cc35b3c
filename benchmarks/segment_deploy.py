"""A DeepLabV3+ R50 out of the lab on this CPU: PyTorch eager fp32 beside onnxruntime and OpenVINO, fp32 and int8,
each file measured on the same held-out tiles and timed the same way, in one run.

Data (segment_data.py): StarDist's nuclei, 128-px tiles, 12 to train on and the 4 of the right-hand column to test
on. The model: `resforge.train(train/, model="resnet50", time_limit=M)` (the default segmenter, DeepLabV3+, at the
recipe's output stride 16 and 128 px), or an earlier run given with `--run DIR`. Then, through the public API:
`resforge.export(run, "onnx")` and `(run, "openvino")` (each gated on the class maps PyTorch gives), and
`quantize(run, "onnxruntime")` (QDQ, per-channel int8 weights, the activation type measured) and
`quantize(run, "openvino")` (NNCF), calibrated on the run's training tiles.

Every file is measured alike: test mIoU by `resforge.evaluate(file, test/)`, and speed by `resforge bench`'s
`measure` in a process of its own (batch 1 at the run's input size, p50 latency and images per second, 3 warm-up
calls, then `--seconds`), and the same network at 512 x 512 (the whole StarDist image in one pass), median of
`--rounds` calls. Ratios are against PyTorch eager fp32.

    python benchmarks/segment_deploy.py [--minutes 5] [--run DIR] [--seconds 5] [--out DIR]

Takes about `--minutes` plus 4 minutes on 2 CPU cores. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import segment_data  # noqa: E402

import resforge  # noqa: E402
from resforge.compress.quantize import quantize  # noqa: E402
from resforge.deploy.bench import _in_child  # noqa: E402
from resforge.device import cpu_name  # noqa: E402
from resforge.runtime.build import build_runner  # noqa: E402
from resforge.runtime.source import open_source  # noqa: E402

BIG = 512
CALIB = 8


def files(run: Path, out: Path) -> list[tuple[str, str, str, str]]:
    """(label, file, backend, precision) of each file to compare, written once."""
    rows = [("PyTorch eager", str(run), "torch", "fp32")]
    onnx = out / "best.onnx"
    if not onnx.is_file():
        resforge.export(run, "onnx", out=str(onnx))
    xml = out / "best.xml"
    if not xml.is_file():
        resforge.export(run, "openvino", out=str(xml))
    rows += [("onnxruntime", str(onnx), "onnxruntime", "auto"), ("OpenVINO", str(xml), "openvino", "fp32")]
    for backend, suffix in (("onnxruntime", ".onnx"), ("openvino", ".xml")):
        path = out / f"int8{suffix}"
        if not path.is_file():
            quantize(run, backend, out=str(path), calib=CALIB)
        rows.append((f"{'onnxruntime' if backend == 'onnxruntime' else 'OpenVINO'} int8", str(path), backend,
                     "auto" if backend == "onnxruntime" else "fp32"))
    return rows


def big_ms(path: str, backend: str, precision: str, rounds: int) -> float:
    """Median milliseconds of one 512 x 512 image through the network on `backend`."""
    runner = build_runner(open_source(path), backend, torch.device("cpu"), precision)
    x = torch.randn(1, 3, BIG, BIG)
    for _ in range(2):
        runner(x)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--run", default=None, help="a segmentation run to measure instead of training one")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--data", default=str(Path(__file__).parent / ".data" / "stardist"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    folders = segment_data.prepare(args.data)
    out = Path(args.out or tempfile.mkdtemp(prefix="segment-deploy-"))
    if args.run:
        run = Path(args.run)
    else:
        run = Path(resforge.train(folders["train"], time_limit=args.minutes, model="resnet50", progress=False,
                                  project=str(out), name="r50", exist_ok=True)["run_dir"])
    rows: list[dict[str, Any]] = []
    for label, path, backend, precision in files(run, out):
        miou = resforge.evaluate(path, folders["test"], out=str(out / f"eval-{Path(path).name}")).metrics["miou"]
        speed = _in_child(dict(source=path, backend=backend, precision=precision, batch_sizes=[1], threads=None,
                               duration=args.seconds, warmup=3, images=None, metadata=None, device="cpu",
                               compile=False, cuda_graph=False))
        if "error" in speed:
            raise SystemExit(f"{label}: {speed['error']}")
        shown = "int8" if "int8" in label else speed["precision"]  # an int8 IR's figure is its hint's otherwise
        rows.append({"label": label, "file": path, "backend": backend, "precision": shown, "miou": miou,
                     "p50_ms": speed["latency_ms"]["p50"], "img_s": speed["throughput"]["1"],
                     "big_ms": big_ms(path, backend, precision, args.rounds), "mb": speed["peak_rss_mb"]})
    info = open_source(run).info
    base = rows[0]
    print(f"\nDeepLabV3+ R50 (output stride 16) trained {info.trained.get('epoch')} epochs on the nuclei tiles; test "
          f"mIoU on the 4 held-out tiles; {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print(f"| engine | precision | test mIoU | lost (pt) | p50 ms, b1 {info.pre.img_size} px | img/s | vs eager | "
          f"ms at {BIG} px | vs eager | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['precision']} | {r['miou']:.3f} | {100 * (base['miou'] - r['miou']):+.2f} | "
              f"{r['p50_ms']:.1f} | {r['img_s']:.1f} | {r['img_s'] / base['img_s']:.2f}x | {r['big_ms']:.0f} | "
              f"{base['big_ms'] / r['big_ms']:.2f}x | {r['mb']:.0f} |")
    fp32, int8 = rows[1:3], rows[3:]
    print(f"\ngoals at {info.pre.img_size} px (and {BIG} px): onnxruntime or OpenVINO fp32 >= 1.5x eager: "
          f"{max(r['img_s'] for r in fp32) / base['img_s']:.2f}x ({max(base['big_ms'] / r['big_ms'] for r in fp32):.2f}x); "
          f"int8 >= 2.5x eager with <= 1 pt mIoU lost: "
          + "; ".join(f"{r['label']} {r['img_s'] / base['img_s']:.2f}x ({base['big_ms'] / r['big_ms']:.2f}x), "
                      f"{100 * (base['miou'] - r['miou']):+.2f} pt" for r in int8))
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
