"""What DDP costs on one CPU machine: 1 process with all its threads against N processes with a share each.

Same data (the bundled Fashion-MNIST sample), global batch, recipe and seed; `resforge train` with
`devices=1` (torch's threads on every core) and `devices=N` (gloo, each process 1/N of the cores).
Throughput: the default recipe (bf16 where the CPU has it, batch norm) on --model, training images/s
of the epochs after the first (metrics.csv). Equivalence: the largest difference of the trained
parameters between the two after one epoch in fp32 on --check-model, with group norm (only the
summation order of the gradients differs) and with batch norm (each process normalises its slice of
the batch: torch's SyncBatchNorm needs CUDA); beside it, how far one process with 1 thread ends from
one with all of them: the same reordering of sums, which a hundred AdamW steps amplify.

    python benchmarks/ddp_cpu.py [--model resnet50] [--check-model resnet18] [--img-size 32] [--epochs 2]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import datasets  # noqa: E402

import resforge  # noqa: E402
from resforge.device import cpu_cores  # noqa: E402
from resforge.device import cpu_name  # noqa: E402
from resforge.training.checkpoint import load_checkpoint  # noqa: E402


def train(data: Path, project: Path, name: str, devices: int, **options) -> tuple[Path, float, str]:
    """The run's directory, its training images/s after the first epoch, and its precision."""
    out = resforge.train(data, devices=devices, project=str(project), name=name, exist_ok=True, progress=False,
                         **options)
    run = Path(out["run_dir"])
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    later = rows[1:] or rows
    return run, sum(float(r["train_images"]) for r in later) / sum(float(r["train_time_s"]) for r in later), \
        out["precision"]


def weight_diff(a: Path, b: Path) -> tuple[float, float]:
    """Largest absolute difference of the trained parameters (not batch norm's running statistics), and
    the largest parameter."""
    wa, wb = load_checkpoint(a / "last.ckpt")["model"], load_checkpoint(b / "last.ckpt")["model"]
    keys = [k for k in wa if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    return (max((wa[k].double() - wb[k].double()).abs().max().item() for k in keys),
            max(wa[k].abs().max().item() for k in keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/resforge-ddp-bench")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--check-model", default="resnet18")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--devices", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work)
    data = datasets.build("fashion-mnist-sample", work / "data")
    project = work / "runs"
    shutil.rmtree(project, ignore_errors=True)
    common = dict(img_size=args.img_size, batch_size=args.batch_size, val_split=0.1, workers=0)
    cores, split = cpu_cores(), f"{args.devices} x {max(1, cpu_cores() // args.devices)}"
    print(f"\n{cpu_name()}, {cores} cores, torch {torch.__version__}; the Fashion-MNIST sample at {args.img_size} px, "
          f"global batch {args.batch_size}\n")
    _, one_pace, precision = train(data, project, "pace-1", 1, model=args.model, epochs=args.epochs, **common)
    _, many_pace, _ = train(data, project, f"pace-{args.devices}", args.devices, model=args.model, epochs=args.epochs,
                         **common)
    print(f"Throughput, {args.model}, auto recipe ({precision}), epochs 2-{args.epochs}:\n")
    print("| processes x threads | train img/s | ratio |\n|---|---:|---:|")
    print(f"| 1 x {cores} | {one_pace:.1f} | 1.00 |\n| {split} | {many_pace:.1f} | {many_pace / one_pace:.2f} |")
    print(f"\nEquivalence, {args.check_model}, fp32, one epoch, {split} against 1 x {cores}:\n")
    print("| norm | max abs parameter difference | same, 1 x 1 against 1 x 2 (summation order alone) | "
          "largest parameter |\n|---|---:|---:|---:|")
    for norm in ("groupnorm", "batchnorm"):
        check = dict(model=args.check_model, norm=norm, amp="off", epochs=1, **common)
        a, _, _ = train(data, project, f"{norm}-1", 1, **check)
        b, _, _ = train(data, project, f"{norm}-{args.devices}", args.devices, **check)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        c, _, _ = train(data, project, f"{norm}-1-thread", 1, **check)
        torch.set_num_threads(threads)
        (diff, scale), (alone, _) = weight_diff(a, b), weight_diff(a, c)
        print(f"| {norm} | {diff:.2e} | {alone:.2e} | {scale:.2f} |")


if __name__ == "__main__":
    main()
