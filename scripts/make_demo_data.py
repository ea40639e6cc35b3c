"""Rebuild src/resforge/assets/fashion_mnist_sample.npz from the full Fashion-MNIST set.

Needs the Debian package dataset-fashion-mnist (or pass the idx folder). The sample is stratified:
the first N images of each class in a seeded permutation of each official split.
Usage: python scripts/make_demo_data.py [IDX_DIR] [--train-per-class 400] [--test-per-class 100]
"""

import argparse
from pathlib import Path

import numpy as np

from resforge.data.sources import SAMPLE_ASSET, load_fashion_mnist


def stratified(images: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(labels))
    keep = np.concatenate([order[labels[order] == c][:per_class] for c in np.unique(labels)])
    keep = np.sort(keep)
    return images[keep], labels[keep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("idx_dir", nargs="?", default=None)
    ap.add_argument("--train-per-class", type=int, default=400)
    ap.add_argument("--test-per-class", type=int, default=100)
    args = ap.parse_args()
    full = load_fashion_mnist(args.idx_dir)
    tr = stratified(*full["train"], args.train_per_class, seed=0)
    te = stratified(*full["test"], args.test_per_class, seed=1)
    out = Path(__file__).resolve().parents[1] / "src" / "resforge" / "assets" / SAMPLE_ASSET
    np.savez_compressed(out, train_images=tr[0], train_labels=tr[1], test_images=te[0], test_labels=te[1])
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {len(tr[1])} train, {len(te[1])} test images")


if __name__ == "__main__":
    main()
