"""Is the default recipe the best first command? Judged on real sets it was not tuned to, side by side.

For each set (see datasets.py: Fashion-MNIST full and sample, scikit-learn's digits, scikit-image's
LFW faces, a set of crops of the photos bundled with scikit-image, scikit-learn and matplotlib), at
one wall-clock budget of training per run (`--time-limit`: resforge fits the epochs and the lr
decay to it):

  - default: `resforge train DATA --time-limit M`, nothing else (the model is the default's pick);
  - default, ResNet-50: the same with `--model resnet50`;
  - each built-in recipe (fast, scratch, finetune, keras-baseline) with the model and image size the
    default picked (finetune without pretrained weights: none can be had offline);
  - timm: the same model built by `timm.create_model`, trained with timm's library defaults
    (`create_transform(is_training=True)`, `create_optimizer_v2` with train.py's SGD lr rule
    0.1 x batch/256 and weight decay 2e-5, `create_scheduler_v2`'s cosine, label smoothing 0.1),
    bf16 autocast and channels_last, the image size and batch of the default, and as many epochs
    as its measured pace fits in the same budget (no validation passes: all its time trains).

Test top-1 is on each set's held-out test split (the official one for Fashion-MNIST).

    python benchmarks/defaults.py [--sets fashion-mnist,digits,...] [--scale 1.0] [--data DIR]

`--scale` multiplies every budget (0.2 for a quick look). The full run takes about 3 hours on
2 CPU cores. Prints one markdown table per set and a summary of the goals.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import datasets  # noqa: E402

import resforge  # noqa: E402
from resforge.device import cpu_name  # noqa: E402

MINUTES = {"digits": 1.0, "faces": 0.5, "photos": 3.0, "fashion-mnist-sample": 2.0, "fashion-mnist": 10.0}
SEEDS = {"faces": 3}  # 40 test images: one is 2.5 points, so the mean of three seeds is reported
RECIPES = ("fast", "scratch", "finetune", "keras-baseline")


def run_resforge(data: Path, project: Path, minutes: float, seed: int = 42, **opts) -> dict:
    t0 = time.perf_counter()
    out = resforge.train(data, time_limit=minutes, project=str(project), progress=False, seed=seed, **opts)
    _, meta = resforge.models.load_model(out["run_dir"])
    return {"model": meta["arch"]["name"], "img_size": meta["preprocess"]["img_size"],
            "epochs": out["epochs"], "minutes": out["train_time_s"] / 60, "wall": (time.perf_counter() - t0) / 60,
            "test": out["results"]["test"]["top1"], "run_dir": out["run_dir"]}


def run_timm(data: Path, model_name: str, img_size: int, batch: int, minutes: float, seed: int = 42) -> dict:
    """timm's library defaults at the same wall-clock budget."""
    import timm
    from timm.data import create_transform
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from torchvision.datasets import ImageFolder

    torch.manual_seed(seed)
    t_start = time.perf_counter()
    train_set = ImageFolder(data / "train", create_transform(img_size, is_training=True))
    test_set = ImageFolder(data / "test", create_transform(img_size))
    workers = max(0, min(8, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    model = timm.create_model(model_name, num_classes=len(train_set.classes)).to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1 * batch / 256, weight_decay=2e-5, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    budget = minutes * 60

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = criterion(model(x.to(memory_format=torch.channels_last)).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    started = time.perf_counter()
    probe = []  # a few steps to learn the pace, counted in the budget
    for i, (x, y) in enumerate(loader):
        step(x, y)
        probe.append(time.perf_counter())
        if i == 10:
            break
    per_epoch = (probe[-1] - probe[1]) / (len(probe) - 2) * len(loader)
    epochs = max(1, math.floor((budget - (time.perf_counter() - started)) / per_epoch))
    scheduler = create_scheduler_v2(optimizer, num_epochs=epochs)[0]
    done = 0
    for epoch in range(epochs):
        for x, y in loader:
            step(x, y)
            if time.perf_counter() - started > budget:
                break
        done += 1
        scheduler.step(epoch + 1)
        if time.perf_counter() - started > budget:
            break
    train_minutes = (time.perf_counter() - started) / 60
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in torch.utils.data.DataLoader(test_set, batch_size=128, num_workers=workers):
            correct += (model(x.to(memory_format=torch.channels_last)).argmax(1) == y).sum().item()
    return {"model": model_name, "img_size": img_size, "epochs": done, "minutes": train_minutes,
            "wall": (time.perf_counter() - t_start) / 60, "test": correct / len(test_set)}


def judge(name: str, data: Path, project: Path, minutes: float, seed: int, only: set[str] | None = None
          ) -> list[tuple[str, dict]]:
    """The rows of one set; `only` keeps some of the runs after the default (which sets their model and size)."""
    def wanted(run: str) -> bool:
        return only is None or run in only

    rows = []
    default = run_resforge(data, project, minutes, seed, name=f"{name}-default")
    rows.append(("default", default))
    cfg = resforge.config.load_yaml(Path(default["run_dir"]) / "config.yaml")
    model, size, batch = cfg["model"]["name"], cfg["data"]["img_size"], cfg["data"]["batch_size"]
    if model != "resnet50" and wanted("resnet50"):
        rows.append(("default, --model resnet50",
                     run_resforge(data, project, minutes, seed, model="resnet50", name=f"{name}-default-r50")))
    for recipe in filter(wanted, RECIPES):
        rows.append((f"`{recipe}`", run_resforge(data, project, minutes, seed, recipe=recipe, model=model,
                                                 img_size=size, name=f"{name}-{recipe}")))
    if wanted("timm"):
        rows.append(("timm library defaults", run_timm(data, model, size, batch, minutes, seed)))
    return rows


def mean_rows(runs: list[list[tuple[str, dict]]]) -> list[tuple[str, dict]]:
    """The runs of several seeds as one row per label: test top-1, epochs and minutes averaged."""
    out = []
    for i, (label, first) in enumerate(runs[0]):
        rs = [r[i][1] for r in runs]
        means = {k: sum(r[k] for r in rs) / len(rs) for k in ("test", "epochs", "minutes", "wall")}
        out.append((label, {**first, **means}))
    return out


def print_table(name: str, minutes: float, rows: list[tuple[str, dict]], seeds: int) -> None:
    mean = f", mean of {seeds} seeds" if seeds > 1 else ""
    print(f"\n**{name}**, {minutes:g} min of training per run{mean}\n")
    print("| run | model | px | epochs | train min | wall min | test top-1 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['model']} | {r['img_size']} | {r['epochs']:.3g} | {r['minutes']:.1f} | "
              f"{r['wall']:.1f} | {r['test']:.2%} |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(MINUTES), help="comma-separated: " + ", ".join(MINUTES))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every budget by this")
    ap.add_argument("--data", help="folder for the datasets (default: a temporary one)")
    ap.add_argument("--only", help="comma-separated runs to make beside the default: resnet50, "
                                   f"{', '.join(RECIPES)}, timm (default: all; the summary needs all)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    names = args.sets.split(",")
    unknown = set(names) - set(MINUTES)
    if unknown:
        ap.error(f"unknown sets: {', '.join(sorted(unknown))}")
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, resforge {resforge.__version__}")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data or Path(tmp) / "data")
        for name in names:
            minutes = MINUTES[name] * args.scale
            data = datasets.build(name, root)
            seeds = SEEDS.get(name, 1)
            rows = mean_rows([judge(name, data, Path(tmp) / "runs", minutes, 42 + s, only) for s in range(seeds)])
            print_table(name, minutes, rows, seeds)
            if only is not None:
                continue
            scores = dict((label, r["test"]) for label, r in rows)
            best_recipe = max((label for label in scores if label.startswith("`")), key=scores.get)
            summary.append((name, scores["default"], best_recipe, scores[best_recipe],
                            scores["`keras-baseline`"], scores["timm library defaults"]))
    if not summary:
        return
    print("\n| set | default | best built-in recipe | keras-baseline | timm | default - best recipe |")
    print("|---|---:|---|---:|---:|---:|")
    for name, default, best, best_score, keras, timm_score in summary:
        print(f"| {name} | {default:.2%} | {best} {best_score:.2%} | {keras:.2%} | {timm_score:.2%} | "
              f"{100 * (default - best_score):+.2f} pt |")


if __name__ == "__main__":
    main()
