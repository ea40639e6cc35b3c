"""Compression of a ResNet-50 on Fashion-MNIST: what each method keeps of its accuracy and what it gains in speed.

  - accuracy: a ResNet-50 trained by `resforge train` on the full Fashion-MNIST (60,000 images, the
    auto recipe at 28 px), then every method through resforge's own commands: int8 PTQ (onnxruntime,
    OpenVINO/NNCF), QAT (`--other-epochs`; its int8 graph runs as fast as PTQ's), structured
    pruning to half the MACs with distillation fine-tune, pruned + int8, low-rank and unstructured
    sparsity; top-1 of each on the official 10,000 test images;
  - speed: the same architectures recorded for 224 px (resize 256, crop 224), at batch 1 and 16 on
    `--threads` threads through `resforge bench` (a process per model), against ORT fp32 and eager
    PyTorch fp32 NCHW measured the same way in the same run.

Every stage's result is kept in `<work>/results.json`: run again with the same `--work` and only
what is missing is made (so a speed phase run on a busy machine can be measured again alone with
`--redo speed`).

    python benchmarks/compress_fashion_mnist.py [--work DIR] [--epochs 4] [--prune-epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import datasets
from inference_cpu import eager_rate

import resforge
from resforge.compress.prune import prune_model
from resforge.device import cpu_name
from resforge.models import load_model, save_model
from resforge.models.summary import summarize
from resforge.training.sparsity import zip_bytes

SPEED_IMAGES = 64  # per split of the small record the 224-px copies calibrate and check parity on
ROUND_TO = (1, 8, 16, 32, 64)  # channel multiples compared


class Stages:
    """Results by stage name, saved after each stage so that a rerun makes only what is missing."""

    def __init__(self, path: Path, redo: set[str]):
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}
        for name in redo:
            self.done.pop(name, None)

    def __call__(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self.done:
            print(f"== {name}", flush=True)
            self.done[name] = make()
            self.path.write_text(json.dumps(self.done, indent=1))
        return self.done[name]


def precision(backend: str) -> str:
    """fp32 on every engine but for what the file holds (no bf16 hint: the accuracy is the file's own)."""
    return "auto" if backend == "onnxruntime" else "fp32"


def model_row(weights: Path, test: Path, backend: str = "torch", file: Path | None = None) -> dict[str, Any]:
    """Test top-1 of a file on one backend, with the size of the network it holds."""
    net, meta = load_model(weights)
    s = summarize(net, meta["preprocess"]["img_size"])
    f = file or weights
    top1 = resforge.evaluate(f, test, backend=backend, precision=precision(backend),
                             out=f.parent / f"eval-{f.stem}-{backend}").top1
    return {"top1": top1, "params": s.params, "macs": s.macs, "file_mb": f.stat().st_size / 1e6,
            "file": str(f), "weights": str(weights), "backend": backend}


def trained(st: Stages, data: Path, runs: Path, args: argparse.Namespace) -> Path:
    """The ResNet-50 run every method starts from."""
    return Path(st("train", lambda: resforge.train(data, model="resnet50", epochs=args.epochs, name="r50",
                                                   project=str(runs), progress=False)["run_dir"]))


def accuracy(st: Stages, data: Path, runs: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    common = {"project": str(runs), "progress": False}
    base = trained(st, data, runs, args)
    best = base / "best.safetensors"
    pruned = Path(st("prune", lambda: resforge.prune(base, macs=0.5, epochs=args.prune_epochs, name="r50-pruned",
                                                     **common)["run_dir"]))
    lowrank = Path(st("lowrank", lambda: resforge.lowrank(base, energy=0.9, epochs=args.other_epochs,
                                                          name="r50-lowrank", **common)["run_dir"]))
    sparse = Path(st("sparse", lambda: resforge.prune(base, sparsity=0.5, epochs=args.other_epochs, name="r50-sparse",
                                                      **common)["run_dir"]))
    out = runs / "files"

    def int8(run: Path, backend: str, tag: str) -> dict[str, Any]:
        q = resforge.quantize(run, backend, out / f"{tag}{'.onnx' if backend == 'onnxruntime' else '.xml'}",
                              calib=args.calib)
        return {**model_row(run / "best.safetensors", data, backend, q.path), "activations": q.activations,
                "val_drop": q.drop}

    def trained_for_int8() -> dict[str, Any]:
        q = resforge.quantize(base, qat=True, calib=args.calib, epochs=args.other_epochs, name="r50-qat", **common)
        return {**model_row(q.path.parent / "best.safetensors", data, "onnxruntime", q.path), "val_drop": q.drop}

    def fp32_onnx(run: Path, tag: str) -> dict[str, Any]:
        e = resforge.export(run, "onnx", out / f"{tag}.onnx", dynamic_batch=True)
        return model_row(run / "best.safetensors", data, "onnxruntime", e.path)

    rows = {
        "fp32": st("acc fp32", lambda: model_row(best, data)),
        "fp32 onnx": st("acc fp32 onnx", lambda: fp32_onnx(base, "r50")),
        "int8 ort": st("acc int8 ort", lambda: int8(base, "onnxruntime", "r50-int8")),
        "int8 openvino": st("acc int8 openvino", lambda: int8(base, "openvino", "r50-int8")),
        "int8 qat ort": st("acc qat", trained_for_int8),
        "pruned": st("acc pruned", lambda: model_row(pruned / "best.safetensors", data)),
        "pruned int8 ort": st("acc pruned int8 ort", lambda: int8(pruned, "onnxruntime", "pruned-int8")),
        "pruned int8 openvino": st("acc pruned int8 openvino", lambda: int8(pruned, "openvino", "pruned-int8")),
        "lowrank": st("acc lowrank", lambda: model_row(lowrank / "best.safetensors", data)),
        "sparse": st("acc sparse", lambda: {**model_row(sparse / "best.safetensors", data),
                                            "zip_mb": zip_bytes(load_model(sparse)[0]) / 1e6,
                                            "dense_zip_mb": zip_bytes(load_model(base)[0]) / 1e6}),
    }
    return rows


def at_224(weights: Path, out: Path, data: Path, model: torch.nn.Module | None = None) -> Path:
    """The network of `weights` (or `model`, changed from it) recorded for 224-px inputs, with a small
    split record to calibrate on."""
    run = out.parent
    run.mkdir(parents=True, exist_ok=True)
    source_run = weights.parent
    with open(source_run / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keep = {"train": SPEED_IMAGES, "val": SPEED_IMAGES}
    picked = []
    for split, n in keep.items():
        part = [r for r in rows if r["split"] == split]
        picked += part[:: max(1, len(part) // n)][:n]
    with open(run / "split.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["split", "class", "path"])
        w.writeheader()
        w.writerows(picked)
    loaded, meta = load_model(weights)
    model = model or loaded
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "weights", "id", "arch")}
    meta["preprocess"] = {**meta["preprocess"], "img_size": 224, "resize_size": 256}
    meta["trained"] = {**meta.get("trained", {}), "run": str(run), "data": str(data)}
    return save_model(model, out, meta)


def rate(path: Path, backend: str, args: argparse.Namespace, engine_precision: str | None = None
         ) -> dict[str, Any]:
    r = resforge.bench([path], [backend], precision=engine_precision or precision(backend), batch_sizes=[1, 16],
                       threads=args.threads, duration=args.duration, progress=False)[0]
    if "error" in r:
        return {"error": r["error"]}
    return {"b1": r["throughput"]["1"], "b16": r["throughput"]["16"], "p50_ms": r["latency_ms"]["p50"],
            "p99_ms": r["latency_ms"]["p99"]}


def round_to(st: Stages, base: Path, work: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Which channel multiple suits the kernels: the trained ResNet-50 pruned with widths rounded to each
    multiple, timed at 224 px on onnxruntime fp32 and int8 and OpenVINO bf16. The pruning steps move
    the MACs in jumps that grow with the multiple, so each multiple is timed at the last step above
    half the MACs and the first below, and compared at exactly half by interpolating the time per image."""
    def timed(multiple: int, steps: int, root: Path) -> dict[str, Any]:
        model, _ = load_model(base / "best.safetensors")
        record = prune_model(model, 224, steps=steps, round_to=multiple)
        w = at_224(base / "best.safetensors", root / "best.safetensors", data, model)
        onnx = resforge.export(w, "onnx", root / "fp32.onnx", dynamic_batch=True).path
        q = resforge.quantize(w, "onnxruntime", root / "int8.onnx", calib=SPEED_IMAGES, activations="u8")
        return {"steps": steps, "macs": record["macs"], "ort fp32": rate(onnx, "onnxruntime", args),
                "ort int8": rate(q.path, "onnxruntime", args), "openvino bf16": rate(onnx, "openvino", args, "bf16")}

    def make() -> dict[str, Any]:
        rows = {}
        for multiple in ROUND_TO:
            model, _ = load_model(base / "best.safetensors")
            k = prune_model(model, 224, macs=0.5, round_to=multiple)["steps"]
            root = work / "round-to" / f"x{multiple}"
            rows[str(multiple)] = [timed(multiple, s, root / f"steps{s}") for s in (k - 1, k)]
        return rows
    return st("round-to", make)


def at_half_macs(above: dict[str, Any], below: dict[str, Any], engine: str, batch: str) -> float:
    """img/s at exactly half the unpruned MACs, the time per image interpolated linearly in MACs."""
    half = above["macs"][0] / 2
    (ma, mb), (ta, tb) = (above["macs"][1], below["macs"][1]), (1 / above[engine][batch], 1 / below[engine][batch])
    return 1 / (tb + (half - mb) * (ta - tb) / (ma - mb))


def speed(st: Stages, acc: dict[str, dict[str, Any]], work: Path, data: Path, args: argparse.Namespace
          ) -> dict[str, Any]:
    """img/s at batch 1 and 16 of every variant at 224 px, all measured in this one stage."""
    def make() -> dict[str, Any]:
        root = work / "speed"
        result: dict[str, Any] = {"eager": {}, "activations": {}}
        for name in ("fp32", "pruned", "lowrank"):
            w = at_224(Path(acc[name]["weights"]), root / name / "best.safetensors", data)
            result["eager"][name] = {str(b): eager_rate(w, args.threads, args.duration, b) for b in (1, 16)}
            onnx = resforge.export(w, "onnx", root / f"{name}.onnx", dynamic_batch=True).path
            for backend in ("onnxruntime", "openvino"):
                result[f"{name} fp32 {backend}"] = rate(onnx, backend, args)
            if name == "lowrank":
                continue
            for backend, suffix in (("onnxruntime", ".onnx"), ("openvino", ".xml")):
                q = resforge.quantize(w, backend, root / f"{name}-int8{suffix}", calib=SPEED_IMAGES)
                result[f"{name} int8 {backend}"] = rate(q.path, backend, args)
                if q.timings:
                    result["activations"][name] = q.timings
        return result
    return st("speed", make)


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def print_tables(acc: dict[str, dict[str, Any]], sp: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{cpu_name()}, {args.threads} threads, torch {torch.__version__}, resforge {resforge.__version__}\n")
    base = acc["fp32"]
    print(f"**Accuracy**: ResNet-50 trained {args.epochs} epochs on Fashion-MNIST at 28 px; top-1 on the official "
          "10,000 test images\n")
    print("| variant | engine | test top-1 | drop (pt) | params | MMACs at 28 px | file MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, r in acc.items():
        ref = acc["fp32 onnx"] if "int8" in name else base  # int8 against fp32 on the same engine's graph
        mb = r["file_mb"] + (Path(r["file"]).with_suffix(".bin").stat().st_size / 1e6 if r["file"].endswith(".xml")
                             else 0)  # an IR's weights are in its .bin
        size = f"{mb:.1f}" + (f" ({r['zip_mb']:.1f} zipped, dense {r['dense_zip_mb']:.1f})" if "zip_mb" in r else "")
        print(f"| {name} | {r['backend']} | {pct(r['top1'])} | {100 * (ref['top1'] - r['top1']):+.2f} | "
              f"{r['params']:,} | {r['macs'] / 1e6:.1f} | {size} |")
    ort = sp["fp32 fp32 onnxruntime"]
    eager = sp["eager"]["fp32"]
    print(f"\n**Speed** at 224 px, {args.threads} threads, img/s (ratios: against ORT fp32 of the unpruned model at "
          "the same batch; last column: against eager PyTorch fp32 NCHW at batch 1)\n")
    print("| variant | b1 img/s | b16 img/s | p50 ms | p99 ms | × ORT fp32 b1 | × ORT fp32 b16 | × eager b1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for tag in ("fp32", "pruned"):
        e = sp["eager"][tag]
        print(f"| {tag} eager fp32 NCHW | {e['1']:.1f} | {e['16']:.1f} | | | {e['1'] / ort['b1']:.2f} | "
              f"{e['16'] / ort['b16']:.2f} | {e['1'] / eager['1']:.2f} |")
    for name, r in sp.items():
        if name in ("eager", "activations"):
            continue
        if "error" in r:
            print(f"| {name} | {r['error']} | | | | | | |")
            continue
        print(f"| {name} | {r['b1']:.1f} | {r['b16']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['b1'] / ort['b1']:.2f} | {r['b16'] / ort['b16']:.2f} | {r['b1'] / eager['1']:.2f} |")
    for name, t in sp["activations"].items():
        print(f"\n{name} int8 on onnxruntime, activation types as `quantize` measured them at batch 1: "
              + ", ".join(f"{k} {v:.1f} img/s" for k, v in t.items()))
    goals(acc, sp, ort, eager)


def goals(acc: dict[str, dict[str, Any]], sp: dict[str, Any], ort: dict[str, float], eager: dict[str, float]
          ) -> None:
    q, p = sp["fp32 int8 onnxruntime"], sp["pruned fp32 onnxruntime"]
    drop = lambda a, b: 100 * (acc[a]["top1"] - acc[b]["top1"])
    best_pq = max(("onnxruntime", "openvino"), key=lambda b: sp[f"pruned int8 {b}"]["b1"])
    pq = sp[f"pruned int8 {best_pq}"]
    rows = [
        ("int8 PTQ top-1 drop (ORT, against ORT fp32)", "≤ 0.5 pt", drop("fp32 onnx", "int8 ort"), 0.5, "le"),
        ("int8 PTQ × ORT fp32, batch 1", "≥ 3.2×", q["b1"] / ort["b1"], 3.2, "ge"),
        ("int8 PTQ × ORT fp32, batch 16", "≥ 3.6×", q["b16"] / ort["b16"], 3.6, "ge"),
        ("pruned MACs kept", "≤ 50%", 100 * acc["pruned"]["macs"] / acc["fp32"]["macs"], 50, "le"),
        ("pruned top-1 drop (distilled)", "≤ 1.0 pt", drop("fp32", "pruned"), 1.0, "le"),
        ("pruned × unpruned, batch 1 (ORT fp32)", "≥ 1.6×", p["b1"] / ort["b1"], 1.6, "ge"),
        (f"pruned + int8 ({best_pq}) × eager fp32, batch 1", "≥ 10×", pq["b1"] / eager["1"], 10, "ge"),
        (f"pruned + int8 ({best_pq}) img/s, batch 1", "≥ 135", pq["b1"], 135, "ge"),
        (f"pruned + int8 ({best_pq}) top-1 drop", "≤ 1.0 pt",
         drop("fp32", f"pruned int8 {best_pq.replace('onnxruntime', 'ort')}"), 1.0, "le"),
    ]
    print("\n**Goals**\n\n| goal | target | measured | met |\n|---|---|---:|---|")
    for name, target, value, bound, how in rows:
        met = value <= bound if how == "le" else value >= bound
        print(f"| {name} | {target} | {value:.2f} | {'yes' if met else '**no**'} |")


def print_round_to(rows: dict[str, Any]) -> None:
    print("\n**Channel multiple** (`prune --round-to`): ResNet-50 pruned with widths rounded to each multiple, 224 px, "
          "img/s at batch 1 / 16 at exactly half the MACs (interpolated between the pruning steps either side; "
          "ratio: against multiple 1)\n")
    print("| multiple | GMACs either side | ORT fp32 | ORT int8 (u8) | OpenVINO bf16 |\n|---:|---|---:|---:|---:|")
    engines = ("ort fp32", "ort int8", "openvino bf16")
    failed = {e for pair in rows.values() for r in pair for e in engines if "error" in r[e]}
    first = rows[str(ROUND_TO[0])]
    for m, (above, below) in rows.items():
        cells = []
        for e in engines:
            if e in failed:
                cells.append("-")
                continue
            b1, b16 = (at_half_macs(above, below, e, b) for b in ("b1", "b16"))
            f1, f16 = (at_half_macs(*first, e, b) for b in ("b1", "b16"))
            cells.append(f"{b1:.1f} / {b16:.1f} ({b1 / f1:.2f}x / {b16 / f16:.2f}x)")
        print(f"| {m} | {above['macs'][1] / 1e9:.2f}, {below['macs'][1] / 1e9:.2f} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/compress-fmnist", help="folder for the data, runs and results")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs of the ResNet-50")
    ap.add_argument("--prune-epochs", type=int, default=3, help="fine-tune epochs after pruning")
    ap.add_argument("--other-epochs", type=int, default=1, help="fine-tune epochs of low-rank and sparsity")
    ap.add_argument("--calib", type=int, default=512, help="int8 calibration images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of timing per model and batch size")
    ap.add_argument("--set", default="fashion-mnist", choices=sorted(datasets.SETS),
                    help="the dataset (fashion-mnist-sample: a quick check of the script)")
    ap.add_argument("--skip", default="", help="comma-separated optional stages to leave out: round-to")
    ap.add_argument("--redo", default="", help="comma-separated stages to make again (e.g. speed)")
    ap.add_argument("--only", choices=["round-to"], help="train the ResNet-50 and measure only this stage")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    st = Stages(work / "results.json", {s for s in args.redo.split(",") if s})
    data = datasets.build(args.set, work / "data")
    if args.only == "round-to":
        print_round_to(round_to(st, trained(st, data, work / "runs", args), work, data, args))
        return
    acc = accuracy(st, data, work / "runs", args)
    sp = speed(st, acc, work, data, args)
    multiples = None if "round-to" in args.skip else round_to(st, Path(acc["fp32"]["weights"]).parent, work, data,
                                                               args)
    print_tables(acc, sp, args)
    if multiples:
        print_round_to(multiples)


if __name__ == "__main__":
    main()
