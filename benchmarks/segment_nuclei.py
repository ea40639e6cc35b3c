"""Does `resforge train` beat torchvision's segmentation reference recipe on real nuclei? Side by side, one run.

Data (segment_data.py): StarDist's 2-D fluorescence image (the BSD-3 PyPI wheel, downloaded offline, its
dependencies never installed), nucleus against background, cut into 128-px tiles: 12 to train on, the 4 of the
right-hand column to test on. Both arms start from scratch with the same wall-clock budget (`--minutes`), one
after the other in this process, torch's default thread count:

  - resforge: `resforge.train(train/, time_limit=M, progress=False)` and nothing else: the default recipe picks
    the network, the input size, the optimiser and the rest, its validation split carved out of the folder;
  - resforge+KEY=VALUE[+KEY=VALUE] (optional): the default with one or more of its choices changed, keyword
    arguments of `resforge.train` (`resforge+loss=ce+dice` is read as loss "ce+dice"): which choices help;
  - tv-reference: the same network (the class and options resforge's run recorded, freshly initialised),
    trained as references/segmentation/train.py trains: SGD momentum 0.9, lr 0.01, weight decay 1e-4, batch
    8, polynomial decay (power 0.9) to the end of the budget, cross-entropy ignoring 255 (the auxiliary head's
    at 0.5 when the network has one), its training transforms (RandomResize between 0.5 and 2 times the base
    size, a horizontal flip half the time, RandomCrop padded with 255), base and crop size the tiles' 128 px
    (the reference's are 520 and 480 for VOC's 500-px photos), on all 12 training tiles.

Both are measured alike on the test tiles: `tasks.segment_infer.LoadedSegmenter` (one pass at the size the run
recorded) and the one confusion matrix of `evaluation.segmentation`.

Then speed and memory: resforge's DeepLabV3 and torchvision's `deeplabv3_resnet50` holding the same weights,
batch 1 at 512 px, eval mode, interleaved in one process, median over rounds; each model's peak resident memory
measured in its own process.

    python benchmarks/segment_nuclei.py [--minutes 5] [--arms resforge,tv-reference] [--data DIR] [--out DIR]

Takes about `--minutes` an arm plus 2 minutes on 2 CPU cores. Prints markdown tables.
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
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.models.segmentation import deeplabv3_resnet50
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).parent))

import segment_data  # noqa: E402

import resforge  # noqa: E402
from resforge.config import load_yaml  # noqa: E402
from resforge.data.folder import load_image  # noqa: E402
from resforge.data.loader import pil_to_tensor  # noqa: E402
from resforge.data.masks import read_mask, scan_masks  # noqa: E402
from resforge.data.transforms import Preprocess, imagenet_stats  # noqa: E402
from resforge.device import cpu_name  # noqa: E402
from resforge.models import load_model  # noqa: E402
from resforge.models.registry import rebuild  # noqa: E402
from resforge.models.segmentation import DeepLabV3  # noqa: E402
from resforge.tasks.segment import AUX_WEIGHT, Segmentation  # noqa: E402
from resforge.tasks.segment_infer import LoadedSegmenter, load_segmenter  # noqa: E402

SEED = 42
TV_LR, TV_MOMENTUM, TV_WD, TV_BATCH, TV_POWER = 0.01, 0.9, 1e-4, 8, 0.9
SPEED_SIZE, SPEED_ROUNDS = 512, 15


def evaluate(loaded: LoadedSegmenter, test: Path, out: Path) -> dict[str, Any]:
    scan = scan_masks(test, val_split=0.0)
    report = Segmentation().evaluate(loaded, scan.train, out, "test", 1, 0)
    return report.metrics


def overrides(arm: str) -> dict[str, Any]:
    """resforge+loss=ce+dice+class_weights=true -> {"loss": "ce+dice", "class_weights": True}."""
    opts: dict[str, Any] = {}
    key = None
    for part in arm.split("+")[1:]:
        if "=" in part:
            key, value = part.split("=", 1)
            opts[key] = value
        elif key is not None:  # a value holding "+", as ce+dice
            opts[key] += "+" + part
    return {k: {"true": True, "false": False}.get(v, v) for k, v in opts.items()}


def run_resforge(arm: str, train: Path, test: Path, project: Path, minutes: float) -> dict[str, Any]:
    start = time.perf_counter()
    name = arm.replace("+", "_").replace("=", "-")
    out = resforge.train(train, time_limit=minutes, progress=False, project=str(project), name=name,
                         **overrides(arm))
    run_dir = Path(out["run_dir"])
    cfg = load_yaml(run_dir / "config.yaml")
    loaded = load_segmenter(run_dir, "cpu")
    o = cfg["optim"]
    return {"name": arm, "metrics": evaluate(loaded, test, project / f"eval-{name}"), "epochs": out["epochs"],
            "images": sum(r["train_images"] for r in out["history"]), "wall_s": time.perf_counter() - start,
            "recipe": f"{o['optimizer']} lr {o['lr']:g}, {o['schedule']}, batch {cfg['data']['batch_size']}, "
                      f"{cfg['data']['img_size']} px",
            "model": f"{cfg['model']['name']} {cfg['segment']['segmenter']} os{cfg['segment']['output_stride']}",
            "run_dir": run_dir, "choices": list((cfg.get("auto") or {}).values())}


class ReferenceSet(torch.utils.data.Dataset):
    """references/segmentation/presets.py's training transforms over (image, mask) pairs."""

    def __init__(self, samples: list, size: int, mean: list[float], std: list[float]):
        self.samples, self.size = samples, size
        self.transform = v2.Compose([
            v2.RandomResize(int(0.5 * size), int(2.0 * size)), v2.RandomHorizontalFlip(0.5),
            v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255}),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[i]
        image = tv_tensors.Image(pil_to_tensor(load_image(s.path, "RGB")))
        mask = tv_tensors.Mask(torch.from_numpy(read_mask(s.mask)))
        x, y = self.transform(image, mask)
        return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)


def run_reference(train: Path, test: Path, like: Path, out: Path, minutes: float) -> dict[str, Any]:
    """The network resforge's run recorded, freshly initialised, trained by the reference's recipe."""
    start = time.perf_counter()
    _, meta = load_model(like)
    torch.manual_seed(SEED)
    model = rebuild(meta["arch"]["name"], meta["arch"]["kwargs"], "resforge's run")
    scan = scan_masks(train, val_split=0.0)
    mean, std = imagenet_stats(3)
    size = meta["preprocess"]["img_size"]
    loader = torch.utils.data.DataLoader(ReferenceSet(scan.train, size, mean, std), batch_size=TV_BATCH,
                                         shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(SEED))
    groups = {"backbone.": [], "classifier.": [], "aux_classifier.": []}  # the reference's: aux at 10x the lr
    for n, p in model.named_parameters():
        groups[next(k for k in groups if n.startswith(k))].append(p)
    optimizer = torch.optim.SGD([{"params": ps, "scale": 10.0 if k == "aux_classifier." else 1.0}
                                 for k, ps in groups.items() if ps], lr=TV_LR, momentum=TV_MOMENTUM,
                                weight_decay=TV_WD)
    budget, images, steps, epochs = minutes * 60, 0, 0, 0.0
    model.train()
    t0 = time.perf_counter()
    done = False
    while not done:
        for i, (x, y) in enumerate(loader, 1):
            elapsed = (time.perf_counter() - t0) / budget
            for group in optimizer.param_groups:
                group["lr"] = group["scale"] * TV_LR * max(0.0, 1 - elapsed) ** TV_POWER
            out_ = model(x)
            loss = F.cross_entropy(out_["out"], y, ignore_index=255)
            if "aux" in out_:
                loss = loss + AUX_WEIGHT * F.cross_entropy(out_["aux"], y, ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images, steps = images + len(x), steps + 1
            if time.perf_counter() - t0 >= budget:
                epochs += i / len(loader)
                done = True
                break
        else:
            epochs += 1
    loaded = LoadedSegmenter(lambda x: model.eval()(x)["out"], meta["classes"], Preprocess(size, size, mean, std))
    return {"name": "tv-reference", "metrics": evaluate(loaded, test, out / "eval-tv-reference"), "epochs": epochs,
            "images": images, "wall_s": time.perf_counter() - start,
            "recipe": f"sgd lr {TV_LR:g} momentum {TV_MOMENTUM}, poly {TV_POWER}, batch {TV_BATCH}, {size} px",
            "model": "the same", "choices": []}


MEMORY = """
import resource, sys, torch
from torchvision.models.segmentation import deeplabv3_resnet50
from resforge.models.segmentation import DeepLabV3
torch.manual_seed(0)
model = (deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2) if sys.argv[1] == "torchvision"
         else DeepLabV3(num_classes=2)).eval()
x = torch.rand(1, 3, {size}, {size})
with torch.inference_mode():
    for _ in range(2):
        model(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def speed() -> dict[str, Any]:
    torch.manual_seed(0)
    tv = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=2).eval()
    ours = DeepLabV3(num_classes=2).eval()
    ours.load_state_dict(tv.state_dict())
    models = {"resforge": ours, "torchvision": tv}
    x = torch.rand(1, 3, SPEED_SIZE, SPEED_SIZE)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        same = bool(torch.allclose(ours(x)["out"], tv(x)["out"], atol=1e-4))
        for r in range(SPEED_ROUNDS):
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                t = time.perf_counter()
                models[name](x)
                times[name].append(time.perf_counter() - t)
    memory = {}
    for name in models:
        r = subprocess.run([sys.executable, "-c", MEMORY.format(size=SPEED_SIZE), name], capture_output=True,
                           text=True, check=True)
        memory[name] = float(r.stdout.strip().splitlines()[-1])
    return {"ms": {k: 1000 * statistics.median(v) for k, v in times.items()}, "same": same, "mb": memory}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--arms", default="resforge,tv-reference")
    p.add_argument("--data", default=str(Path(__file__).parent / ".data" / "stardist"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    folders = segment_data.prepare(args.data)
    out = Path(args.out or tempfile.mkdtemp(prefix="segment-nuclei-"))
    names = args.arms.split(",")
    if not names or names[0] != "resforge":
        raise SystemExit("--arms starts with resforge: the reference trains the network resforge's run chose")
    arms = []
    for arm in names:
        if arm == "tv-reference":
            arms.append(run_reference(folders["train"], folders["test"], arms[0]["run_dir"], out, args.minutes))
        else:
            arms.append(run_resforge(arm, folders["train"], folders["test"], out, args.minutes))
    s = speed()
    print(f"\nnuclei, 12 training tiles of 128 px, tested on 4 held-out tiles; {args.minutes:g} min each from scratch; "
          f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| arm | model | recipe | epochs | images seen | test mIoU | IoU nucleus | pixel acc | vs reference |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    reference = next((a for a in arms if a["name"] == "tv-reference"), None)
    ref = reference["metrics"]["miou"] if reference else float("nan")
    for a in arms:
        m = a["metrics"]
        print(f"| {a['name']} | {a['model']} | {a['recipe']} | {a['epochs']:.1f} | {a['images']} | {m['miou']:.3f} | "
              f"{m['iou']['nucleus'] or 0:.3f} | {m['pixel_acc']:.3f} | {m['miou'] / max(ref, 1e-9):.2f}x |")
    print("\nresforge chose: " + "; ".join(arms[0]["choices"]))
    print(f"\nspeed, DeepLabV3 R50 at {SPEED_SIZE} px, batch 1, the same weights (outputs equal: {s['same']}):\n")
    print("| model | ms / image | vs torchvision | peak memory (MB, own process) |")
    print("|---|---:|---:|---:|")
    for k in ("torchvision", "resforge"):
        print(f"| {k} | {s['ms'][k]:.0f} | {s['ms'][k] / s['ms']['torchvision']:.3f}x | {s['mb'][k]:.0f} |")
    ahead = reference is not None and arms[0]["metrics"]["miou"] > ref
    print(f"\ngoal: resforge ahead on held-out mIoU: {'met' if ahead else 'NOT met'}; inference within 3% of "
          f"torchvision: {'met' if s['ms']['resforge'] <= 1.03 * s['ms']['torchvision'] else 'NOT met'}")
    (out / "results.json").write_text(json.dumps({"arms": [{k: v for k, v in a.items() if k != "run_dir"}
                                                          for a in arms], "speed": s}, default=str, indent=1))


if __name__ == "__main__":
    main()
