"""A Faster R-CNN R50-FPN out of the lab on this CPU: PyTorch eager fp32 beside its ONNX and OpenVINO graphs (resize
and NMS inside), NNCF int8, and the backbone pruned to half its MACs, each measured on the same held-out tiles and
timed the same way, in one run.

Data (detect_data.py): DeepForest's aerial trees; training on the three training images at 400-px tiles, testing
on the 42 tiles of a scene no training image comes from. The model: `resforge.train(train/, model="resnet50",
tile=400, time_limit=M)` (the default detector, Faster R-CNN with FPN), or an earlier run given with `--run DIR`.
Then, through the public API: `resforge.export(run, "onnx")` and `(run, "openvino")` (each gated on PyTorch's
detections), `quantize(run, "openvino")` (NNCF: backbone, pyramid and box head int8) calibrated on the run's
training tiles; `resforge.prune(run, macs=0.5, time_limit=M/2)` (the backbone to half its MACs, fine-tuned), its
OpenVINO export and its int8.

Every file is measured alike: test AP@.5 by `resforge.evaluate(file, test-tiles/)` (sliced at the run's 400-px
tiles, as the run records), and speed by `resforge bench`'s `measure` in a process of its own: batch 1 on the
first test tile end to end through the detector as deployed (resize, network, NMS; the run's tiling: one tile
and the whole-image pass), p50 latency and images per second, 3 warm-up calls, then `--seconds`. Ratios are
against PyTorch eager fp32.

    python benchmarks/detect_deploy.py [--minutes 10] [--run DIR] [--seconds 5] [--out DIR]

Takes about 1.5 x `--minutes` plus 10 minutes on 2 CPU cores. Prints a markdown table and the goals.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import detect_data  # noqa: E402

import resforge  # noqa: E402
from resforge.compress.quantize import quantize  # noqa: E402
from resforge.deploy.bench import _in_child  # noqa: E402
from resforge.device import cpu_name  # noqa: E402
from resforge.models import load_model  # noqa: E402
from resforge.models.summary import summarize  # noqa: E402
from resforge.runtime.source import open_source  # noqa: E402

TILE = 400
CALIB = 8


def exported(run: Path, out: Path, stem: str) -> list[tuple[str, str, str]]:
    """(label, file, backend) of `run` and what it exports to, each written once."""
    rows = [(f"{stem} PyTorch eager", str(run), "torch")]
    for fmt, suffix, backend in (("onnx", ".onnx", "onnxruntime"), ("openvino", ".xml", "openvino")):
        path = out / f"{stem}{suffix}"
        if not path.is_file():
            resforge.export(run, fmt, out=str(path))
        rows.append((f"{stem} {backend}", str(path), backend))
    int8 = out / f"{stem}-int8.xml"
    if not int8.is_file():
        quantize(run, "openvino", out=str(int8), calib=CALIB)
    return rows + [(f"{stem} OpenVINO int8", str(int8), "openvino")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--run", default=None, help="a Faster R-CNN run to measure instead of training one")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--data", default=str(Path(__file__).parent / ".data" / "deepforest"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    folders = detect_data.build(args.data)
    out = Path(args.out or tempfile.mkdtemp(prefix="detect-deploy-"))
    if args.run:
        run = Path(args.run)
    else:
        run = Path(resforge.train(folders["train"], model="resnet50", tile=TILE, time_limit=args.minutes,
                                  progress=False, project=str(out), name="r50", exist_ok=True)["run_dir"])
    pruned = out / "r50-pruned"
    if not (pruned / "best.safetensors").is_file():
        pruned = Path(resforge.prune(run, macs=0.5, time_limit=args.minutes / 2, progress=False, project=str(out),
                                     name="r50-pruned", exist_ok=True)["run_dir"])
    tiles = folders["test_tiles"]
    rows: list[dict[str, Any]] = []
    for label, path, backend in exported(run, out, "R50") + exported(pruned, out, "pruned"):
        ap50 = resforge.evaluate(path, tiles, out=str(out / f"eval-{Path(path).name}")).metrics["map50"]
        speed = _in_child(dict(source=path, backend=backend, precision="auto", batch_sizes=[1], threads=None,
                               duration=args.seconds, warmup=3, images=str(tiles), metadata=None, device="cpu",
                               compile=False, cuda_graph=False))
        if "error" in speed:
            raise SystemExit(f"{label}: {speed['error']}")
        rows.append({"label": label, "file": path, "backend": backend, "ap50": ap50,
                     "p50_ms": speed["latency_ms"]["p50"], "img_s": speed["throughput"]["1"],
                     "mb": speed["peak_rss_mb"]})
    macs = [summarize(load_model(r)[0].resnet, TILE).macs for r in (run, pruned)]
    info = open_source(run).info
    base = rows[0]
    print(f"\nFaster R-CNN R50-FPN trained {info.trained.get('epoch')} epochs on the trees at {TILE}-px tiles; "
          f"test AP@.5 on the 42 held-out tiles; the pruned backbone {macs[1] / 1e9:.2f} of {macs[0] / 1e9:.2f} "
          f"GMACs at {TILE} px; {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| model | engine | test AP@.5 | lost (pt) | p50 ms, b1 | img/s | vs eager | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['backend']} | {r['ap50']:.3f} | {100 * (base['ap50'] - r['ap50']):+.2f} | "
              f"{r['p50_ms']:.0f} | {r['img_s']:.2f} | {r['img_s'] / base['img_s']:.2f}x | {r['mb']:.0f} |")
    by = {r["label"]: r for r in rows}

    def goal(label: str) -> str:
        r = by[label]
        return f"{label} {r['img_s'] / base['img_s']:.2f}x, {100 * (base['ap50'] - r['ap50']):+.2f} pt"

    print(f"\ngoals: fp32 graph >= 1.5x eager: {goal('R50 onnxruntime')}; {goal('R50 openvino')}. int8 >= 2.5x with "
          f"<= 1 pt AP@.5 lost: {goal('R50 OpenVINO int8')}. Half the backbone MACs + int8 >= 4x with <= 2 pt lost: "
          f"{goal('pruned OpenVINO int8')}")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
