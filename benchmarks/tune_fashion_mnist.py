"""A real hyperparameter search on the bundled Fashion-MNIST sample, and what its best config is worth.

`resforge tune` runs trials of --epochs each (TPE, median pruning) for --search-minutes; then the
best trial's config (`best.yaml`), the `fast` recipe and the untuned auto recipe (what the trials
start from) are each trained for the same --train-minutes (`--time-limit`, the lr decay fitted to
it) and evaluated on the sample's test split (1,000 images the search never saw).

    python benchmarks/tune_fashion_mnist.py [--search-minutes 10] [--train-minutes 3] [--epochs 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import datasets  # noqa: E402

import resforge  # noqa: E402
from resforge.device import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/resforge-tune-bench")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each trial")
    ap.add_argument("--search-minutes", type=float, default=10.0)
    ap.add_argument("--train-minutes", type=float, default=3.0, help="training time of the two final runs")
    ap.add_argument("--trials", type=int, default=100, help="at most this many (the time limit usually ends it)")
    args = ap.parse_args()
    work = Path(args.work)
    data = datasets.build("fashion-mnist-sample", work / "data")
    shutil.rmtree(work / "runs", ignore_errors=True)
    model = dict(model=args.model, img_size=args.img_size)
    t0 = time.perf_counter()
    search = resforge.tune(data, trials=args.trials, time_limit=args.search_minutes, project=str(work / "runs"),
                           name="search", search_seed=0, epochs=args.epochs, **model)
    wall = time.perf_counter() - t0
    runs = {"best trial's config": dict(config=search["best_config"]), "`fast` recipe": dict(recipe="fast", **model),
            "auto recipe (the default, untuned)": dict(**model)}
    results = {}
    for label, how in runs.items():
        out = resforge.train(data, time_limit=args.train_minutes, project=str(work / "runs"), progress=False,
                             name=label.split()[0].strip("`'"), **how)
        results[label] = out
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; the Fashion-MNIST sample "
          f"(4,000 training images, 20% of them for validation; 1,000 test images), {args.model} at "
          f"{args.img_size} px\n")
    print(f"Search: {search['trials']} trials ({search['complete']} complete, the rest pruned or cut by the time "
          f"limit) of {args.epochs} epochs in {wall / 60:.1f} min; best val top-1 {search['best_value']:.2%} with "
          + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in search["best_params"].items()) + "\n")
    print("| config | training time | epochs | val top-1 | test top-1 |\n|---|---:|---:|---:|---:|")
    for label, out in results.items():
        r = out["results"]
        print(f"| {label} | {out['train_time_s'] / 60:.1f} min | {out['epochs']} | {r['val']['top1']:.2%} | "
              f"{r['test']['top1']:.2%} |")
    best, fast, auto = (results[k]["results"]["test"]["top1"] for k in runs)
    print(f"\nBest config at equal training time: {100 * (best - fast):+.2f} pt test top-1 against `fast`, "
          f"{100 * (best - auto):+.2f} pt against the untuned auto recipe it started from")


if __name__ == "__main__":
    main()
