"""Training throughput: resforge's loop against a minimal hand-written loop, side by side in one run.

The hand loop is the least a training loop can do: pre-made, already normalised batches in memory,
forward, loss, backward, SGD step (torch's default SGD, as resforge uses; the fused-SGD row shows
that kernel is no faster here, which is why resforge keeps the default for SGD). resforge's loop
(`Trainer._train_epoch`) adds its data path (cached images cropped and normalised per sample,
collated by a DataLoader), the lr schedule, NaN check, metrics and progress. Same architecture
(torchvision's resnet50 and ours have identical layers), batch, precision and memory layout. Data: the bundled Fashion-MNIST sample at --img-size.

    python benchmarks/train_throughput.py [--img-size 64] [--batch-size 32] [--images 960]

Prints a markdown table of images/s and ratios. Targets: resforge / hand loop >= 0.95;
bf16 + channels_last >= 1.5x fp32 NCHW on a CPU with native bf16.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import resforge
from resforge.config import build_config
from resforge.data.sources import FASHION_MNIST_CLASSES, load_fashion_mnist_sample, write_image_folder
from resforge.training.trainer import Trainer


def make_folder(root: Path, images: int) -> Path:
    imgs, labels = load_fashion_mnist_sample()["train"]
    per_class = images // 10
    keep = torch.cat([torch.nonzero(torch.from_numpy(labels) == c)[:per_class, 0] for c in range(10)]).numpy()
    return write_image_folder({"train": (imgs[keep], labels[keep])}, FASHION_MNIST_CLASSES, root / "fm")


def hand_loop(model: torch.nn.Module, batches: list, bf16_cl: bool, warmup: int, fused: bool = False) -> list[float]:
    """Seconds per step, after `warmup` steps."""
    fmt = torch.channels_last if bf16_cl else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=fused or None)
    marks = []
    for x, y in batches:
        x = x.to(memory_format=fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_cl):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks[warmup - 1:], marks[warmup:])]


def resforge_loop(trainer: Trainer, warmup: int) -> list[float]:
    """Seconds per step (data loading included), after `warmup` steps."""
    marks: list[float] = []
    trainer.callbacks = [lambda event, t: marks.append(time.perf_counter()) if event == "batch_end" else None]
    trainer._train_epoch(trainer.epoch, budget=None)
    trainer.epoch += 1
    return [b - a for a, b in zip(marks[warmup - 1:], marks[warmup:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=800, help="training images per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="batches not timed")
    ap.add_argument("--repeats", type=int, default=4, help="round-robin repeats, pooled")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp), args.images)

        def trainer(**kw) -> Trainer:
            over = {"data.root": str(folder), "model": "resnet50", "img_size": args.img_size, "small_input": False,
                    "batch_size": args.batch_size, "augment": "none", "crop_pct": 1.0, "val_split": 0.05,
                    "cache": "on", "lr": 0.01, "nesterov": False, "weight_decay": 0.0, "project": tmp, **kw}
            return Trainer(build_config(overrides=over), progress=False)

        t = trainer(amp="bf16")
        # The hand loops get the very tensors the trainer's loader makes, pre-collated in memory.
        batches = [(x.contiguous(), y) for x, y in t.train_loader]
        tv = lambda: torchvision.models.resnet50(num_classes=10)  # noqa: E731
        ours = lambda: resforge.create_model("resnet50", num_classes=10)  # noqa: E731
        loops = {"fast": t, "fast0": trainer(amp="bf16", workers=0),
                 "fp32": trainer(amp="off", channels_last=False, workers=0)}
        configs = [
            ("hand loop", "torchvision resnet50", "fp32 NCHW", lambda: hand_loop(tv(), batches, False, args.warmup)),
            ("hand loop", "torchvision resnet50", "bf16 + channels_last",
             lambda: hand_loop(tv(), batches, True, args.warmup)),
            ("hand loop", "resforge resnet50", "bf16 + channels_last",
             lambda: hand_loop(ours(), batches, True, args.warmup)),
            ("hand loop, fused SGD", "torchvision resnet50", "bf16 + channels_last",
             lambda: hand_loop(tv(), batches, True, args.warmup, fused=True)),
            ("resforge train, 0 workers", "resforge resnet50", "bf16 + channels_last",
             lambda: resforge_loop(loops["fast0"], args.warmup)),
            ("resforge train, default workers", "resforge resnet50", "bf16 + channels_last",
             lambda: resforge_loop(loops["fast"], args.warmup)),
            ("resforge train, 0 workers", "resforge resnet50", "fp32 NCHW",
             lambda: resforge_loop(loops["fp32"], args.warmup)),
        ]
        # Round-robin repeats; the median step time over all of them: the machine is shared and drifts,
        # and a median of many steps shrugs off the stalls a total or a best-of picks up.
        steps: list[list[float]] = [[] for _ in configs]
        for _ in range(args.repeats):
            for i, (*_, run) in enumerate(configs):
                steps[i] += run()
        rows = [(*c[:3], args.batch_size / statistics.median(s)) for c, s in zip(configs, steps)]

    naive, hand_fast, hand_fused = rows[0][3], rows[1][3], rows[3][3]
    print(f"\nResNet-50 training at {args.img_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median step time over {args.repeats} round-robin repeats\n")
    print("| loop | model | precision | images/s | vs hand loop, same precision | vs hand loop, fused SGD "
          "| vs naive fp32 NCHW |")
    print("|---|---|---|---:|---:|---:|---:|")
    for loop, model, precision, speed in rows:
        same = naive if precision.startswith("fp32") else hand_fast
        fused = f"{speed / hand_fused:.2f}" if not precision.startswith("fp32") else ""
        print(f"| {loop} | {model} | {precision} | {speed:.1f} | {speed / same:.2f} | {fused} | {speed / naive:.2f} |")


if __name__ == "__main__":
    main()
