"""An ensemble of runs against its best member, on Fashion-MNIST's official test images.

`--runs` runs of one model trained by `resforge train` with different seeds (same data, same
budget), then `resforge ensemble` with equal weights and with weights fitted on the first run's
validation split; top-1, top-5 and macro F1 of each member and of both ensembles on the test split.

    python benchmarks/ensemble_fashion_mnist.py [--set fashion-mnist] [--runs 3] [--minutes 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import datasets  # noqa: E402

import resforge  # noqa: E402
from resforge.device import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/resforge-ensemble-bench")
    ap.add_argument("--set", default="fashion-mnist", choices=sorted(datasets.SETS))
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget of each run")
    args = ap.parse_args()
    work = Path(args.work)
    data = datasets.build(args.set, work / "data")
    runs = []
    for seed in range(args.runs):
        run = work / "runs" / f"{args.model}-s{seed}"
        if not (run / "results.json").is_file():
            resforge.train(data, model=args.model, seed=seed, time_limit=args.minutes, project=str(work / "runs"),
                           name=run.name, progress=False)
        runs.append(run)
    test = data / "test"
    equal = resforge.ensemble(runs, test, out=work / "equal")
    fitted = resforge.ensemble(runs, test, fit=True, out=work / "fitted")
    print(f"\n{cpu_name()}, {torch.get_num_threads()} threads; {args.set}, {equal['images']} test images; "
          f"{args.runs} x {args.model}, {args.minutes:g} min each\n")
    print("| model | weight | test top-1 | top-5 | macro F1 |\n|---|---:|---:|---:|---:|")
    for row in equal["members"]:
        print(f"| {Path(row['model']).name} | | {row['top1']:.2%} | {row['top5']:.2%} | {row['macro_f1']:.3f} |")
    for label, r in (("ensemble, equal weights", equal), ("ensemble, fitted weights", fitted)):
        e = r["ensemble"]
        weights = ", ".join(f"{w:.2f}" for w in r["weights"])
        print(f"| {label} | {weights} | {e['top1']:.2%} | {e['top5']:.2%} | {e['macro_f1']:.3f} |")
    best = max(r["top1"] for r in equal["members"])
    print(f"\nEnsemble against its best member: {100 * (equal['ensemble']['top1'] - best):+.2f} pt (equal), "
          f"{100 * (fitted['ensemble']['top1'] - best):+.2f} pt (fitted)")


if __name__ == "__main__":
    main()
