"""Training on a CUDA GPU, side by side in one run: resforge's loop against a hand loop, then its data paths.

1. The loop (`--part loop`). Synthetic batches already on the GPU, so only the loops differ: a hand loop
   (zero_grad, forward under autocast, cross-entropy, backward, fused SGD step; the scaler's for fp16)
   against the epoch loop `resforge train` runs (`Trainer._train_epoch`: its step seam, schedule, loss
   check, metrics and progress) over the same batches. Eager rows use torchvision's resnet50 in the hand
   loop; compiled rows use resforge's resnet50 in both loops (the same module tree as torchvision's, so
   the second compile hits the first one's cache). Goal: resforge / hand loop >= 0.95 at each precision.
2. The data path (`--part data`). A folder of real JPEGs (crops of the photos that ship with
   scikit-learn, scikit-image and matplotlib, re-encoded at ImageNet's typical size, about 500x375,
   quality 90), trained through the same loop with data.decode cpu (loader processes decode and augment)
   and data.decode gpu (nvjpeg and the crops on the GPU), beside the synthetic ceiling of that loop.
   Goal: decode gpu >= 0.95x synthetic and >= 5,500 img/s at 224 px with compile + bf16 on an
   H100/H200-class GPU. The first epoch compiles and warms up; the second is timed.

    python benchmarks/gpu_train.py [--part loop|data|all] [--batch-size 256] [--steps 30] [--images 20000]

Prints markdown tables naming the GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision

import resforge
from resforge.config import build_config
from resforge.training.trainer import Trainer


def hand_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, steps: int,
              warmup: int, compile: bool) -> float:
    """Images/s of the least a training loop can do, on one batch already on the GPU."""
    model = model.cuda().to(memory_format=torch.channels_last).train()
    forward = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-5, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    return steps * len(x) / (time.perf_counter() - t0)


class Synthetic:
    """A stand-in for the trainer's loader: the same batch, already on the GPU, `steps` times."""

    class _Sampler:
        def set_epoch(self, epoch: int) -> None:
            pass

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int):
        self.x, self.y, self.steps, self.sampler = x, y, steps, self._Sampler()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([(self.x, self.y)] * self.steps)


def tiny_folder(root: Path) -> Path:
    """The smallest folder a Trainer accepts: its batches are replaced by synthetic ones."""
    from PIL import Image

    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(8):
            Image.new("RGB", (32, 32), (40 * c, 20 * i, 90)).save(root / f"c{c}" / f"{i}.jpg")
    return root


def trainer(folder: Path, project: str, batch: int, amp: str, compile: bool, **kw) -> Trainer:
    """A Trainer of ResNet-50 with ImageNet's 1000-class head whatever the folder holds, so that every row runs
    the same network (and a compiled one is compiled once, then found in inductor's cache)."""
    over = {"data.root": str(folder), "model": "resnet50", "img_size": 224, "small_input": False, "batch_size": batch,
            "augment": "none", "amp": amp, "compile": compile, "device": "cuda", "lr": 0.01, "weight_decay": 5e-5,
            "optimizer": "sgd", "val_split": 0.25, "project": project, "cache": "off", **kw}
    t = Trainer(build_config(overrides=over), progress=False)
    t.model.reset_classifier(1000)
    t.model_changed()
    return t


def timed_epochs(t: Trainer, epochs: int = 2) -> float:
    """Images/s of the trainer's last epoch (the first compiles and warms up); no validation."""
    for epoch in range(epochs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        row = t._train_epoch(epoch, budget=None)
        torch.cuda.synchronize()
        rate = row["train_images"] / (time.perf_counter() - t0)
    return rate


def part_loop(args: argparse.Namespace, folder: Path, project: str) -> list[tuple]:
    b = args.batch_size
    x = torch.randn(b, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device="cuda")
    rows = []
    for label, dtype, amp, compile in (("bf16", torch.bfloat16, "bf16", False),
                                       ("fp16 + grad scaler", torch.float16, "fp16", False),
                                       ("bf16 + compile", torch.bfloat16, "bf16", True)):
        if compile:
            hand_model, hand_name = resforge.create_model("resnet50", num_classes=1000), "resforge resnet50"
        else:
            hand_model, hand_name = torchvision.models.resnet50(), "torchvision resnet50"
        before = hand_loop(hand_model, x, y, dtype, args.steps, args.warmup, compile)
        t = trainer(folder, project, b, amp, compile)
        t.train_loader = Synthetic(x, y, args.warmup + args.steps)
        ours = timed_epochs(t, 2)
        after = hand_loop(hand_model, x, y, dtype, args.steps, args.warmup, compile)  # around ours: drift
        rows.append((label, hand_name, statistics.mean([before, after]), ours))
        del t
        torch.cuda.empty_cache()
    return rows


PHOTO_SIZE = (500, 375)


def _photos() -> list[np.ndarray]:
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
        photos.append(np.asarray(im.convert("RGB")))
    try:
        import skimage.data as sk

        photos += [getattr(sk, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    except (ImportError, OSError, ValueError):
        pass
    return [p if p.ndim == 3 else np.stack([p] * 3, -1) for p in photos]


def _write(job: tuple[str, int, int, int]) -> None:
    from PIL import Image

    root, start, count, seed = job
    photos = _photos()
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        size = PHOTO_SIZE if rng.random() < 0.7 else PHOTO_SIZE[::-1]
        im = Image.fromarray(p[top:top + ch, left:left + cw]).resize(size, Image.BILINEAR)
        Path(root, f"c{i % 10}").mkdir(exist_ok=True)
        im.save(Path(root, f"c{i % 10}", f"{i:06d}.jpg"), quality=90)


def jpeg_folder(root: Path, images: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    workers = max(1, (os.cpu_count() or 2) - 1)
    per = math.ceil(images / workers)
    jobs = [(str(root), s, min(per, images - s), s) for s in range(0, images, per)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write, jobs))
    return root


def stage_rates(t: Trainer, batches: int = 12) -> dict[str, float]:
    """Images/s of each stage of the GPU data path alone: the loader processes (read, draw the plans, collate),
    nvjpeg on batches held in memory, and the whole BatchDecoder (nvjpeg, crops, flips, normalisation)."""
    from torchvision.io import decode_jpeg

    t.train_loader.sampler.set_epoch(7)
    held, seen, t0 = [], 0, time.perf_counter()
    for x, _ in t.train_loader:
        seen += len(x)
        if len(held) < batches:
            held.append(x)
    rates = {"loader processes alone (read, plan, collate)": seen / (time.perf_counter() - t0)}

    def rate(fn) -> float:
        fn(held[0])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in held:
            fn(b)
        torch.cuda.synchronize()
        return sum(len(b) for b in held) / (time.perf_counter() - t0)

    mode = t.decoder.mode
    rates["nvjpeg alone (decode_jpeg of a batch)"] = rate(
        lambda b: decode_jpeg([b.jpeg(k) for k in range(len(b)) if b.encoded[k]], mode=mode, device="cuda"))
    files = [b.jpeg(k) for b in held[:4] for k in range(len(b)) if b.encoded[k]][:256]
    t0 = time.perf_counter()
    for f in files:
        decode_jpeg(f, mode=mode)
    rates["libjpeg on one CPU core (decode_jpeg on the CPU)"] = len(files) / (time.perf_counter() - t0)
    rates["BatchDecoder alone (nvjpeg, crops, flips, normalisation)"] = rate(t.decoder)
    return rates


def part_data(args: argparse.Namespace, project: str, tmp: Path) -> tuple[list[tuple], dict]:
    jpegs = jpeg_folder(tmp / "jpegs", args.images)
    mb = sum(f.stat().st_size for f in jpegs.rglob("*.jpg")) / 1e6
    print(f"{args.images} JPEGs, {mb / args.images * 1000:.0f} KB each on average, in {jpegs}")
    b = args.batch_size
    rows = []
    common = dict(amp="bf16", compile=True, val_split=0.01, augment="standard", hflip=0.5, scale=[0.08, 1.0])
    x = torch.randn(b, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (b,), device="cuda")
    t = trainer(jpegs, project, b, **common)
    steps = len(t.train_loader)
    t.train_loader = Synthetic(x, y, steps)
    rows.append(("synthetic batches on the GPU (ceiling)", "-", timed_epochs(t, 2)))
    del t
    cores = os.cpu_count() or 2
    stages = {}
    for decode, workers in (("gpu", -1), ("cpu", cores - 1)):
        t = trainer(jpegs, project, b, decode=decode, workers=workers, **common)
        rows.append((f"JPEG files, data.decode {decode}", str(t.train_loader.num_workers), timed_epochs(t, 2)))
        if decode == "gpu":
            stages = stage_rates(t)
        else:
            seen, t0 = 0, time.perf_counter()
            for xb, _ in t.train_loader:
                seen += len(xb)
            stages[f"CPU path: {t.train_loader.num_workers} loader processes alone (decode, crop, normalise)"] = \
                seen / (time.perf_counter() - t0)
        del t
        torch.cuda.empty_cache()
    return rows, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("loop", "data", "all"), default="all")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per loop measurement")
    ap.add_argument("--warmup", type=int, default=8, help="steps not timed (compiling, cuDNN's choices)")
    ap.add_argument("--images", type=int, default=20000, help="JPEG files for the data-path part")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    header = (f"{gpu}, torch {torch.__version__}, torchvision {torchvision.__version__}, ResNet-50 at 224 px, "
              f"batch {args.batch_size}, channels-last, fused SGD")
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("loop", "all"):
            rows = part_loop(args, tiny_folder(Path(tmp) / "tiny"), tmp)
            print(f"\n### The loop: {header}; synthetic batches already on the GPU, {args.steps} timed steps\n")
            print("| precision | hand loop model | hand loop img/s | resforge train img/s | resforge / hand |")
            print("|---|---|---:|---:|---:|")
            for label, name, hand, ours in rows:
                print(f"| {label} | {name} | {hand:,.0f} | {ours:,.0f} | {ours / hand:.3f} |")
        if args.part in ("data", "all"):
            rows, stages = part_data(args, tmp, Path(tmp))
            ceiling = rows[0][2]
            print(f"\n### The data path: {header}, compile + bf16, random-resized crops and flips; "
                  f"{os.cpu_count()} CPU cores; the second epoch timed\n")
            print("| input | loader processes | img/s | vs synthetic |")
            print("|---|---:|---:|---:|")
            for label, workers, rate in rows:
                print(f"| {label} | {workers} | {rate:,.0f} | {rate / ceiling:.3f} |")
            print("\nEach stage alone, on the same files (img/s):\n\n| stage | img/s |\n|---|---:|")
            for label, rate in stages.items():
                print(f"| {label} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
