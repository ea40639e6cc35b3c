"""Data-loader throughput: resforge's dataset against torchvision's ImageFolder, side by side.

Both decode JPEGs and apply the same torchvision.transforms.v2 pipeline (the `standard` preset at
224 px: random-resized crop, horizontal flip, to float, normalise) through a DataLoader with the
same batch size and workers. Differences on resforge's side: large JPEGs are decoded at a reduced
DCT scale that still covers the evaluation resize size (PIL's draft mode), each sample is seeded
for reproducibility, and small sets can be cached decoded and resized in memory.

Photos: scikit-image's bundled ones (astronaut, coffee, chelsea, rocket, ...), cropped and resized
to two sizes: ImageNet-like (500x375) and phone-camera-like (2000x1500).

    python benchmarks/data_loader.py [--images 192] [--workers N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from resforge.config import AugmentConfig
from resforge.data.folder import scan_folder
from resforge.data.loader import ImageDataset, default_workers, make_loader
from resforge.data.transforms import imagenet_stats, make_preprocess, train_transform

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left")


def make_photos(root: Path, n: int, size: tuple[int, int]) -> Path:
    from skimage import data

    rng = np.random.default_rng(0)
    sources = []
    for name in PHOTOS:
        try:
            sources.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
        except Exception:  # a few skimage images are fetched on first use; offline they are skipped
            continue
    for i in range(n):
        im = sources[i % len(sources)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        im.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def throughput(loader, passes: int = 1) -> float:
    """Images per second over `passes` full passes, after one warm-up batch."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(0)
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for p in range(passes):
        for _, y in it:
            n += len(y)
        if p + 1 < passes:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(p + 1)
            it = iter(loader)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192, help="photos per size")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=3, help="round-robin repeats; the median is reported")
    ap.add_argument("--passes", type=int, default=4, help="passes over the photos per measurement")
    args = ap.parse_args()
    pre = make_preprocess(224, 0.875, 3, "bilinear", *imagenet_stats(3))
    transform = train_transform(pre, AugmentConfig(preset="standard"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, size in (("500x375", (500, 375)), ("2000x1500", (2000, 1500))):
            root = make_photos(Path(tmp) / label, args.images, size)
            tv = ImageFolder(str(root), transform=transform)
            tv_loader = DataLoader(tv, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                   persistent_workers=args.workers > 0)
            scan = scan_folder(root, val_split=0.0)
            ours = ImageDataset(scan.train, transform, pre)
            ours_loader = make_loader(ours, args.batch_size, train=True, workers=args.workers, seed=0)
            cached = ImageDataset(scan.train, transform, pre)
            cached.build_cache(progress=False)
            cached_loader = make_loader(cached, args.batch_size, train=True, workers=args.workers, seed=0)
            loaders = {"torchvision ImageFolder": tv_loader, "resforge ImageDataset": ours_loader,
                       "resforge, cached in memory (epochs after the first)": cached_loader}
            # Round-robin repeats, median of each: the machine is shared and its speed drifts.
            speeds = {name: [] for name in loaders}
            for _ in range(args.repeats):
                for name, loader in loaders.items():
                    speeds[name].append(throughput(loader, passes=args.passes))
            base = statistics.median(speeds["torchvision ImageFolder"])
            rows += [(label, name, statistics.median(s), statistics.median(s) / base) for name, s in speeds.items()]
    print(f"\nJPEG decode + `standard` augmentation to 224 px, batch {args.batch_size}, {args.workers} worker(s), "
          f"{args.images} photos per size, {args.passes} passes, median of {args.repeats} round-robin repeats, "
          f"torch {torch.__version__}\n")
    print("| photos | loader | images/s | vs ImageFolder |")
    print("|---|---|---:|---:|")
    for label, name, speed, ratio in rows:
        print(f"| {label} | {name} | {speed:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
