"""Accuracy on real data under equal CPU time: the Keras-tutorial recipe against resforge's.

Both train the same ResNet-50 on the same Fashion-MNIST folder with the same engine (resforge's
loop, bf16 where the CPU has it) for the same wall-clock budget (`train.time_limit`: the epoch count
and lr schedule are fitted to it), then report test top-1 on the official 10,000-image test set.
So the comparison is of recipes, not of engines.

  - keras-baseline: Adam 1e-3, constant lr, no augmentation, batch 8 (what the Keras tutorials do);
  - resforge `fast`: the built-in recipe for short budgets (AdamW 2e-3, short warm-up, cosine decay
    fitted to the budget, batch 32, label smoothing 0.1, light crops and flips).

Data: the Debian package dataset-fashion-mnist (60,000 + 10,000 images) when installed, else the
sample bundled with resforge (4,000 + 1,000).

    python benchmarks/accuracy_fashion_mnist.py [--minutes 10] [--img-size 32] [--sample]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import resforge
from resforge.data.sources import FASHION_MNIST_DIR

RECIPES = {
    "keras-baseline": dict(recipe="keras-baseline"),
    "fast": dict(recipe="fast"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per recipe")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--sample", action="store_true", help="use the bundled sample even if the full set is installed")
    args = ap.parse_args()
    full = not args.sample and (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = resforge.import_dataset("fashion-mnist" if full else "fashion-mnist-sample", Path(tmp) / "fmnist")
        for name, opts in RECIPES.items():
            out = resforge.train(data, model="resnet50", img_size=args.img_size, crop_pct=1.0, small_input=False,
                                 time_limit=args.minutes, epochs=1000, project=str(Path(tmp) / "runs"),
                                 progress=False, **opts)
            speed = sum(r["img_per_s"] for r in out["history"]) / len(out["history"])
            rows.append((name, out["epochs"], speed, out["train_time_s"] / 60, out["results"]["val"]["top1"],
                         out["results"]["test"]["top1"]))
    print(f"\nResNet-50 on Fashion-MNIST ({'full: 60,000 train' if full else 'bundled sample: 4,000 train'}, "
          f"20% held out for validation; official test set), {args.img_size} px, {args.minutes:g} min budget each, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| recipe | epochs | train images/s | minutes | val top-1 | test top-1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, epochs, speed, minutes, val, test in rows:
        print(f"| {name} | {epochs} | {speed:.0f} | {minutes:.1f} | {val:.2%} | {test:.2%} |")
    print(f"\nresforge / keras-baseline test error: {(1 - rows[1][5]) / (1 - rows[0][5]):.2f}")


if __name__ == "__main__":
    main()
