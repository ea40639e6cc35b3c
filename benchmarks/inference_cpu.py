"""ResNet-50 inference on this CPU: every backend side by side, through `resforge bench` itself.

The model: a ResNet-50 trained here for a few minutes on the photo set of datasets.py at 128 px,
recorded for 224 px (resize 256, centre crop 224), so that every figure is of one real model at the
size the goals name and its top-1 agreements are measured on confident predictions, not near-ties.

  - speed: `resforge bench` (each backend in a process of its own, `--threads`), batch 1 and 16,
    against plain eager PyTorch (fp32, NCHW, `torch.inference_mode`) measured the same way;
  - auto: what `--backend auto` chose at each batch size, against the fastest row;
  - agreement: top-1 of each backend and precision against torch fp32 on the set's test split;
  - overhead: the Predictor's call against a bare `InferenceSession.run` / OpenVINO infer request on
    the same tensor, interleaved, at batch 1;
  - end to end: decode + preprocess + infer from 500x375 JPEGs, against the same backend on tensors.

    python benchmarks/inference_cpu.py [--threads 2] [--duration 10] [--train-minutes 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

import datasets  # noqa: E402

import resforge  # noqa: E402
from resforge.data.folder import scan_images  # noqa: E402
from resforge.deploy.bench import table  # noqa: E402
from resforge.runtime.measure import sample_batch  # noqa: E402
from resforge.runtime.predictor import Predictor  # noqa: E402
from resforge.device import cpu_name  # noqa: E402
from resforge.models import load_model, save_model  # noqa: E402

BATCHES = [1, 16]

EAGER = """
import json, sys, torch
from resforge.models import load_model
from resforge.timing import per_second, timed_calls
threads, duration, batch = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model = load_model(sys.argv[4])[0].eval()
x = torch.randn(batch, model.stem_conv.in_channels, 224, 224)
with torch.inference_mode():
    times = timed_calls(lambda: model(x), duration, warmup=3)
print(json.dumps(per_second(batch, times)))
"""


def build_model(root: Path, minutes: float) -> tuple[Path, Path]:
    """(model at 224 px, the photo set): trained at 128 px, the same weights recorded for 224."""
    data = datasets.build("photos", root / "data")
    out = resforge.train(data, model="resnet50", img_size=128, time_limit=minutes, project=str(root / "runs"),
                         name="r50", progress=False)
    model, meta = load_model(out["run_dir"])
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "weights", "id", "arch")}
    meta["preprocess"] = {**meta["preprocess"], "img_size": 224, "resize_size": 256}
    path = save_model(model, root / "r50-224" / "best.safetensors", meta)
    return path, data


def eager_rate(model: Path, threads: int, duration: float, batch: int) -> float:
    r = subprocess.run([sys.executable, "-c", EAGER, str(threads), str(duration), str(batch), str(model)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def jpegs(root: Path, n: int = 64) -> Path:
    """500x375 JPEGs (quality 90) cut and scaled from the bundled photos."""
    out = root / "jpeg500"
    out.mkdir(parents=True, exist_ok=True)
    photos = list(datasets._photos().values())
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = img.size
        cw, ch = min(w, int(h * 4 / 3)), min(h, int(w * 3 / 4))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.BICUBIC).save(out / f"{i:03d}.jpg", quality=90)
    return out


def overhead(source: Path, backend: str, threads: int, rounds: int = 200) -> tuple[float, float]:
    """Median ms of the Predictor's call and of the bare engine call on one 224-px tensor, interleaved."""
    p = Predictor.load(source, backend, precision="fp32", threads=threads)
    x = sample_batch(p.info, 1)
    arr = x.numpy()
    if backend == "onnxruntime":
        session, name = p.runner.session, p.runner.input_name

        def bare():
            return session.run(None, {name: arr})[0]
    else:
        request = p.runner.request

        def bare():
            request.infer({0: arr}, share_inputs=True)
            return request.get_output_tensor(0).data
    ours, theirs = [], []
    for _ in range(5):
        p(x), bare()
    for _ in range(rounds):
        t0 = time.perf_counter()
        p(x)
        t1 = time.perf_counter()
        bare()
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        theirs.append(t2 - t1)
    return statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3


def agreement(sources: dict[str, tuple[Path, str, str]], files: list[str]) -> dict[str, tuple[float, float]]:
    """Top-1 agreement with torch fp32 and the test top-1 of each (backend, precision)."""
    probs = {name: Predictor.load(src, backend, precision=prec).probabilities(files)
             for name, (src, backend, prec) in sources.items()}
    ref = probs["torch fp32"].argmax(1)
    labels = np.array([Path(f).parent.name for f in files])
    classes = Predictor.load(sources["torch fp32"][0], "torch", precision="fp32").classes
    return {name: (float((p.argmax(1) == ref).mean()), float((np.array(classes)[p.argmax(1)] == labels).mean()))
            for name, p in probs.items()}


def print_speed(rows: list[dict], eager: dict[int, float]) -> None:
    print(table(rows, BATCHES))
    print("\n| path | " + " | ".join(f"b{b} img/s | vs eager fp32" for b in BATCHES) + " |")
    print("|---|" + "---:|---:|" * len(BATCHES))
    print("| plain eager PyTorch fp32 NCHW | " + " | ".join(f"{eager[b]:.1f} | 1.00" for b in BATCHES) + " |")
    for r in rows:
        if "error" not in r:
            name = f"{r['backend']} {r['precision']}" + (" (auto)" if r["asked"] == "auto" else "")
            rates = [r["throughput"][str(b)] for b in BATCHES]
            print(f"| {name} | " + " | ".join(f"{v:.1f} | {v / eager[b]:.2f}" for v, b in zip(rates, BATCHES)) + " |")


def print_auto(rows: list[dict]) -> None:
    fixed = [r for r in rows if "error" not in r and r["asked"] != "auto"]
    auto = next(r for r in rows if r.get("asked") == "auto" and "error" not in r)
    print("\n| batch | auto chose | auto img/s | fastest | fastest img/s | auto / fastest |")
    print("|---:|---|---:|---|---:|---:|")
    for b in map(str, BATCHES):
        best = max(fixed, key=lambda r: r["throughput"][b])
        print(f"| {b} | {auto['chosen'][b]} | {auto['throughput'][b]:.1f} | {best['backend']} {best['precision']} "
              f"| {best['throughput'][b]:.1f} | {auto['throughput'][b] / best['throughput'][b]:.2f} |")


def print_agreement(model: Path, onnx_file: Path, ir: Path, files: list[str]) -> None:
    agree = agreement({"torch fp32": (model, "torch", "fp32"), "onnxruntime fp32": (onnx_file, "onnxruntime", "fp32"),
                       "openvino fp32": (ir, "openvino", "fp32"), "torch bf16": (model, "torch", "bf16"),
                       "openvino bf16": (ir, "openvino", "bf16")}, files)
    print(f"\n| backend | top-1 agreement with torch fp32 ({len(files)} test images) | test top-1 |")
    print("|---|---:|---:|")
    for name, (a, top1) in agree.items():
        print(f"| {name} | {a:.2%} | {top1:.2%} |")


def print_overhead(onnx_file: Path, ir: Path, threads: int) -> None:
    print("\n| engine | Predictor call ms | bare engine call ms | overhead |")
    print("|---|---:|---:|---:|")
    for source, backend in ((onnx_file, "onnxruntime"), (ir, "openvino")):
        ours, theirs = overhead(source, backend, threads)
        print(f"| {backend} fp32, batch 1 | {ours:.2f} | {theirs:.2f} | {100 * (ours / theirs - 1):+.1f}% |")


def print_end_to_end(rows: list[dict]) -> None:
    print("\n| backend | b16 from 500x375 JPEGs img/s | b16 tensors img/s | ratio |")
    print("|---|---:|---:|---:|")
    for r in rows:
        if r.get("end_to_end"):
            e2e, tensors = r["end_to_end"]["16"], r["throughput"]["16"]
            print(f"| {r['backend']} {r['precision']} | {e2e:.1f} | {tensors:.1f} | {e2e / tensors:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per figure")
    ap.add_argument("--train-minutes", type=float, default=5.0)
    ap.add_argument("--work", help="folder to keep the model and files in (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        model, data = build_model(root, args.train_minutes)
        onnx_file = resforge.export(model, "onnx", root / "r50.onnx", dynamic_batch=True, images=data / "test").path
        ir = resforge.export(model, "openvino", root / "r50.xml", dynamic_batch=True, images=data / "test").path
        images = jpegs(root)
        common = dict(batch_sizes=BATCHES, threads=args.threads, duration=args.duration, progress=False)
        rows = resforge.bench([model], ["torch"], precision="fp32", **common)
        rows += resforge.bench([onnx_file], ["onnxruntime"], precision="fp32", images=images, **common)
        rows += resforge.bench([ir], ["openvino"], precision="fp32", **common)
        rows += resforge.bench([model], ["torch"], precision="bf16", **common)
        rows += resforge.bench([ir], ["openvino"], precision="bf16", images=images, **common)
        rows += resforge.bench([model], ["auto"], **common)
        eager = {b: eager_rate(model, args.threads, args.duration, b) for b in BATCHES}
        print(f"\n{cpu_name()}, {args.threads} threads, torch {torch.__version__}, resforge {resforge.__version__}; "
              f"{args.duration:g} s per figure\n")
        print_speed(rows, eager)
        print_auto(rows)
        print_agreement(model, onnx_file, ir, scan_images([data / "test"]))
        print_overhead(onnx_file, ir, args.threads)
        print_end_to_end(rows)


if __name__ == "__main__":
    main()
