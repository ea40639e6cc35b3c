"""Does `resforge train` beat torchvision's detection reference recipe on real aerial trees? Side by side, one run.

Data (detect_data.py): DeepForest's NEON aerial images (the MIT-licensed PyPI wheel, downloaded offline, its
dependencies never installed), one class, Tree. Training folder: a Yellowstone scene (1249x1035, 279 trees),
OSBS_029 (400x400, 61) and SOAP_061 (400x400, 37; its Alive/Dead labels both mapped to Tree). Test: the 42
400-px tiles of another Yellowstone scene (2299x2472, 574 trees) that no training image comes from. Every arm
starts from scratch (no weights can be had offline) with the same wall-clock budget (`--minutes`), one after the
other in this process, torch's default thread count:

  - resforge: `resforge.train(train/, time_limit=M, tile=400, progress=False)` and nothing else: the default
    recipe picks the rest, the validation split it carves out of the folder included;
  - resforge-val-soap (optional): the same call on the same images as train/ and val/ folders (SOAP_061 to
    validate on), a split the user chose rather than the default's;
  - resforge+KEY=VALUE[+KEY=VALUE] (optional): the default with one or more of its choices changed, keyword
    arguments of `resforge.train` (`resforge+keep=best`, `resforge+fpn_channels=256+rois=512`): which choices
    help, and by how much;
  - tv-r50, tv-r18: torchvision's `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)`, and the same
    Faster R-CNN over `resnet_fpn_backbone("resnet18", trainable_layers=5)` with trainable batch norm (what that
    builder uses without weights), trained as references/detection/train.py and engine.py train: SGD momentum
    0.9, lr 0.02 x 2/16, weight decay 1e-4, batch 2, horizontal flips 0.5, engine.py's linear warm-up from 1/1000
    over the first epoch's steps (at most 1000), MultiStepLR's x0.1 at epochs 16 and 22 of 26 placed at 16/26
    and 22/26 of the budget, every step in the budget training (the reference evaluates on a separate set after
    the run: here, the test tiles). They train on every tile of the three training images, cut as resforge cuts
    them (400 px, overlap 0.2, boxes at least half inside, a seeded fifth of the empty tiles). Both detectors see
    400 px (min_size 400, max_size 667, as resforge's tile run) instead of the reference's 800/1333: the tiles
    at their own resolution, the fair comparison with resforge's run.

Every arm is measured the same way: sliced inference at 400-px tiles (`data.tiles.sliced_predict`: one call on
a 400-px tile) and `evaluation.coco.detection_metrics` (pycocotools) over the test tiles; the resforge arms are
also measured by the documented `resforge.evaluate(run, test-tiles/)`, which must agree.

Then, speed: torchvision's fasterrcnn_resnet50_fpn and resforge's FasterRCNN holding the same weights (loaded key
for key: tv-r50's trained ones when that arm ran), batch 1 on 400-px test tiles, eval mode, the two interleaved
in one process, median over rounds. And sliced against single: the first resforge arm's detector (else the first
torchvision one) on the whole test scene as it is (2299x2472: the "2,000-px aerial image"): one pass (the
detector downscales it to its min_size), and sliced at its tiles with and without the whole-image pass; AP50 at
COCO's 100 detections per image and at 1,000 (the scene holds 574 trees), and the seconds each took.

    python benchmarks/detect_trees.py [--minutes 10] [--arms resforge,tv-r50,tv-r18] [--data DIR] [--out DIR]

`--arms` also takes resforge-val-soap and resforge+KEY=VALUE arms (10 more minutes each). The full run takes about
40 minutes on 2 CPU cores (three 10-minute arms, 1-3 minutes of evaluation each, about 4 minutes of speed and
slicing); the data takes 15 s the first time. Prints markdown tables: accuracy with ratios against the torchvision
recipe (and what each resforge run chose, and why), inference speed, sliced against one pass, and the issue's goals
met or not.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml
from torch import nn
from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).parent))

import detect_data  # noqa: E402

import resforge  # noqa: E402
from resforge.config import Config, load_yaml  # noqa: E402
from resforge.data.annotations import Objects, scan_detection  # noqa: E402
from resforge.data.objects import ObjectsDataset, collate_objects, detection_transform  # noqa: E402
from resforge.data.tiles import TiledDataset, sliced_predict, tile_samples  # noqa: E402
from resforge.device import cpu_name  # noqa: E402
from resforge.evaluation.coco import coco_dataset, coco_results, detection_metrics, mean_ap  # noqa: E402
from resforge.models.detection import FasterRCNN as ResforgeFasterRCNN  # noqa: E402
from resforge.tasks.detect_infer import load_detector  # noqa: E402

TILE = 400
MAX_SIZE = round(TILE * 1333 / 800)  # resforge's longer-side cap for a 400-px run (square tiles never reach it)
DEFAULTS = Config()  # the tiling, split and seed a resforge run takes when none is given
OVERLAP, SEED = DEFAULTS.data.overlap, DEFAULTS.train.seed
RESFORGE_ARMS = {"resforge": "train", "resforge-val-soap": "train_val_soap"}  # arm -> training folder
TV_ARMS = ("tv-r50", "tv-r18")
ARMS = (*RESFORGE_ARMS, *TV_ARMS)
# references/detection/train.py's defaults: 2 images a GPU, lr 0.02 for 8 GPUs x 2, 26 epochs, steps at 16 and 22
TV_BATCH, TV_LR, TV_MOMENTUM, TV_WD = 2, 0.02 * 2 / 16, 0.9, 1e-4
TV_MILESTONES = (16 / 26, 22 / 26)
WARMUP_FACTOR, WARMUP_MAX = 1 / 1000, 1000
SPEED_TILES, SPEED_ROUNDS = 4, 7

Detect = Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]


@dataclass
class Arm:
    name: str
    model: str
    recipe: str
    images: int  # tile-images trained on, every epoch counted
    steps: int
    epochs: float
    train_s: float  # seconds in training steps
    wall_s: float  # the arm's whole time: preparing, training, validating, its own evaluation
    metrics: dict[str, Any]
    detect: Detect  # float CxHxW images -> detections, sliced at the arm's tiles
    model_obj: nn.Module
    tile: tuple[int, float] = (TILE, OVERLAP)
    notes: list[str] = field(default_factory=list)


# ---- evaluation, the same for every arm ----

def test_samples(folder: Path) -> list[Objects]:
    return scan_detection(folder, val_split=0.0).train


def evaluate_tiles(detect: Detect, samples: list[Objects]) -> dict[str, Any]:
    """COCO figures of `detect` over the test tiles, one image a call, and the seconds that took."""
    ds = ObjectsDataset(samples, detection_transform(None))
    predictions, targets, sizes = [], [], []
    start = time.perf_counter()
    for i in range(len(ds)):
        image, target = ds[i]
        predictions += detect([image])
        targets.append(target)
        sizes.append(tuple(image.shape[-2:]))
    seconds = time.perf_counter() - start
    return {**detection_metrics(predictions, targets, sizes, 1), "seconds": seconds}


def sliced(model: nn.Module, size: int, overlap: float) -> Detect:
    def detect(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        with torch.inference_mode():
            return [{k: v.cpu() for k, v in sliced_predict(model, image, size, overlap).items()} for image in images]
    return detect


def coco_at(predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]],
            sizes: list[tuple[int, int]], max_dets: int) -> dict[str, float]:
    """AP, AP50 and AR with up to `max_dets` detections an image (COCO's figures use 100)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = coco_results(predictions)
    if not results:
        return {"map": 0.0, "map50": 0.0, "mar": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_dataset(targets, sizes, 1)
        gt.createIndex()
        e = COCOeval(gt, gt.loadRes(results), "bbox")
        e.params.maxDets = [1, 10, max_dets]  # summarize() reads AP50 and AR100 at the last of these
        e.evaluate()
        e.accumulate()
        e.summarize()
    return {"map": mean_ap(e), "map50": max(float(e.stats[1]), 0.0), "mar": max(float(e.stats[8]), 0.0)}


# ---- resforge ----

def run_resforge(name: str, folder: Path, test: Path, samples: list[Objects], project: Path, minutes: float,
                 **opts: Any) -> Arm:
    start = time.perf_counter()
    out = resforge.train(folder, time_limit=minutes, tile=TILE, progress=False, project=str(project),
                         name=f"trees-{name}", **opts)
    run_dir = Path(out["run_dir"])
    cfg = load_yaml(run_dir / "config.yaml")
    history = out["history"]
    batch = cfg["data"]["batch_size"]
    images = sum(r["train_images"] for r in history)
    steps = sum(math.ceil(r["train_images"] / batch) for r in history)
    o = cfg["optim"]
    recipe = (f"{o['optimizer']} lr {o['lr']:g}, wd {o['weight_decay']:g}, {o['schedule']}, warm-up "
              f"{o['warmup_epochs']:g} ep, batch {batch}")
    report = resforge.evaluate(run_dir, test)
    wall = time.perf_counter() - start
    loaded = load_detector(run_dir, "cpu")
    tile = (loaded.tile["size"], loaded.tile["overlap"]) if loaded.tile else (TILE, OVERLAP)
    arm = Arm(name, f"{cfg['model']['name']} {cfg['detect']['detector']}", recipe, images, steps, out["epochs"],
              sum(r["train_time_s"] for r in history), wall, {}, loaded.detect, loaded.model, tile)
    arm.metrics = evaluate_tiles(loaded.detect, samples)
    if abs(arm.metrics["map50"] - report.metrics["map50"]) > 1e-3:
        arm.notes.append(f"resforge.evaluate gave AP50 {report.metrics['map50']:.3f}, the shared evaluation "
                         f"{arm.metrics['map50']:.3f}")
    rows = list(csv.DictReader(open(run_dir / "split.csv", newline="", encoding="utf-8")))
    for split in ("train", "val"):
        names = [Path(r["path"]).stem for r in rows if r["split"] == split]
        arm.notes.append(f"{split}: {', '.join(names) or 'none'}")
    spent = sum(r.get("epoch_time_s", 0.0) for r in history) / 60
    arm.notes.append(f"budget {minutes:g} min; its {out['epochs']} epochs ({steps / max(out['epochs'], 1):.3g} steps "
                     f"each) took {spent:.1f} min, training and validation")
    arm.notes += [f"chose {reason}" for reason in (cfg.get("auto") or {}).values()]
    return arm


# ---- torchvision's reference recipe ----

def tv_model(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    if name == "tv-r50":
        return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, min_size=TILE,
                                       max_size=MAX_SIZE)
    # fasterrcnn_resnet50_fpn without weights trains its batch norm: the same for ResNet-18
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d)
    return FasterRCNN(backbone, num_classes=2, min_size=TILE, max_size=MAX_SIZE)


def reference_lr(step: int, warmup: int, elapsed: float) -> float:
    """engine.py's warm-up (first epoch's steps) times MultiStepLR's decays (placed in the budget)."""
    lr = TV_LR * 0.1 ** sum(elapsed >= m for m in TV_MILESTONES)
    if step < warmup:
        lr *= WARMUP_FACTOR + (1 - WARMUP_FACTOR) * step / warmup
    return lr


def train_reference(model: nn.Module, tiles: list, minutes: float) -> dict[str, Any]:
    """engine.py's train_one_epoch, epoch after epoch until the budget is spent: images, steps, epochs, seconds,
    warm-up steps and notes."""
    transform = v2.Compose([v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True),
                            v2.SanitizeBoundingBoxes(min_size=1.0)])
    loader = torch.utils.data.DataLoader(TiledDataset(tiles, transform), batch_size=TV_BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(SEED), collate_fn=collate_objects)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=TV_LR, momentum=TV_MOMENTUM, weight_decay=TV_WD)
    warmup = min(WARMUP_MAX, len(loader) - 1)
    budget = minutes * 60
    done = {"images": 0, "steps": 0, "epochs": 0.0, "seconds": 0.0, "warmup": warmup, "notes": []}
    model.train()
    start = time.perf_counter()

    def finish(epoch_part: float) -> dict[str, Any]:
        return {**done, "epochs": done["epochs"] + epoch_part, "seconds": time.perf_counter() - start}

    while True:
        for i, (x, y) in enumerate(loader, 1):
            lr = reference_lr(done["steps"], warmup, (time.perf_counter() - start) / budget)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = sum(model(x, y).values())
            if not math.isfinite(loss.item()):  # the reference stops the run here
                done["notes"].append(f"loss {loss.item()} at step {done['steps'] + 1}: stopped, as the reference does")
                return finish((i - 1) / len(loader))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done["images"] += len(x)
            done["steps"] += 1
            if time.perf_counter() - start >= budget:
                return finish(i / len(loader))
        done["epochs"] += 1


def run_reference(name: str, train: list[Objects], samples: list[Objects], minutes: float) -> Arm:
    start = time.perf_counter()
    model = tv_model(name)
    tiles = tile_samples(train, TILE, OVERLAP, seed=SEED)
    t = train_reference(model, tiles, minutes)
    model.eval()
    detect = sliced(model, TILE, OVERLAP)
    recipe = f"sgd lr {TV_LR:g}, wd {TV_WD:g}, multistep, warm-up {t['warmup']} steps, batch {TV_BATCH}"
    arm = Arm(name, "resnet50 fasterrcnn" if name == "tv-r50" else "resnet18 fasterrcnn", recipe, t["images"],
              t["steps"], t["epochs"], t["seconds"], 0.0, {}, detect, model,
              notes=t["notes"] + [f"trained on {len(tiles)} tiles of {len(train)} images"])
    arm.metrics = evaluate_tiles(detect, samples)
    arm.wall_s = time.perf_counter() - start
    return arm


def reference_train_set(folder: Path) -> list[Objects]:
    """Every image of the training folder: the reference trains on all it is given (its evaluation set is apart)."""
    scan = scan_detection(folder, val_split=0.0)
    return scan.train + scan.val


# ---- speed: the same weights in both classes ----

def speed(state: dict[str, torch.Tensor] | None, samples: list[Objects]) -> dict[str, Any]:
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, min_size=TILE, max_size=MAX_SIZE)
    if state is not None:
        tv.load_state_dict(state)
    ours = ResforgeFasterRCNN(num_classes=2, min_size=TILE, max_size=MAX_SIZE)
    ours.load_state_dict(tv.state_dict())  # strict: key for key
    models = {"resforge": ours.eval(), "torchvision": tv.eval()}
    ds = ObjectsDataset(samples[:SPEED_TILES], detection_transform(None))
    images = [ds[i][0] for i in range(len(ds))]
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        a, b = (m([images[0]])[0] for m in models.values())  # also the warm-up
        same = len(a["boxes"]) == len(b["boxes"]) and bool(torch.allclose(a["boxes"], b["boxes"], atol=1e-3))
        for r in range(SPEED_ROUNDS):
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                t = time.perf_counter()
                for image in images:
                    models[name]([image])
                times[name].append((time.perf_counter() - t) / len(images))
    return {"ms": {k: 1000 * statistics.median(v) for k, v in times.items()}, "same": same,
            "boxes": len(a["boxes"]), "trained": state is not None}


# ---- sliced inference against one downscaled pass ----

def sliced_vs_single(arm: Arm, scene: Path) -> list[tuple[str, dict[str, float], float, int]]:
    ds = ObjectsDataset(test_samples(scene), detection_transform(None))
    image, target = ds[0]
    size, overlap = arm.tile
    model = arm.model_obj.eval()
    ways = [(f"one pass, the detector downscales to {model.transform.min_size[0]} px", lambda: model([image])[0]),
            (f"sliced, {size}-px tiles + the whole image (resforge's default)",
             lambda: sliced_predict(model, image, size, overlap)),
            (f"sliced, {size}-px tiles only", lambda: sliced_predict(model, image, size, overlap, full_image=False))]
    rows = []
    with torch.inference_mode():
        for label, run in ways:
            t = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - t
            sizes = [tuple(image.shape[-2:])]
            ap = {k: coco_at([out], [target], sizes, k) for k in (100, 1000)}
            rows.append((label, {"ap50_100": ap[100]["map50"], "ap50_1000": ap[1000]["map50"],
                                 "ap_1000": ap[1000]["map"], "ar_1000": ap[1000]["mar"]}, seconds, len(out["boxes"])))
    return rows


# ---- tables ----

def print_goals(arms: list[Arm], s: dict[str, Any], sliced_rows: list | None, minutes: float) -> None:
    """The issue's goals (issue 26, "Goals, measured"), each against what this run measured."""
    rows = []
    default = next((a for a in arms if a.name == "resforge"), None)
    tvs = [a for a in arms if a.name in TV_ARMS]
    if default:
        ap50 = default.metrics["map50"]
        rows.append((f"the default's AP50 >= 0.30 in 10 min (this run: {minutes:g} min)", f"{ap50:.3f}", ap50 >= 0.30))
        for tv in tvs:
            rows.append((f"the default ahead of {tv.name} (AP50)", f"{ap50:.3f} vs {tv.metrics['map50']:.3f}",
                         ap50 > tv.metrics["map50"]))
    r = s["ms"]["resforge"] / s["ms"]["torchvision"]
    rows.append(("inference no slower than torchvision's same model (within 3%)", f"{r:.3f}x its time", r <= 1.03))
    if sliced_rows:
        one, default_sliced = sliced_rows[0][1]["ap50_1000"], sliced_rows[1][1]["ap50_1000"]
        rows.append(("sliced inference at least as accurate as one downscaled pass (AP50, 1000 dets)",
                     f"{default_sliced:.3f} vs {one:.3f}", default_sliced >= one))
    print("\n**Goals**\n")
    print("| goal | measured | met |")
    print("|---|---|---|")
    for goal, measured, met in rows:
        print(f"| {goal} | {measured} | {'yes' if met else 'no'} |")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b >= 0.001 else "-"  # against a reference that found nothing, no ratio


def print_accuracy(arms: list[Arm], minutes: float, n_test: int) -> None:
    ref = next((a for a in arms if a.name == "tv-r50"), None) or next((a for a in arms if a.name in TV_ARMS), None)
    versus = f" vs {ref.name}" if ref else ""
    print(f"\n**Accuracy**: {minutes:g} min of training per arm from scratch; test: "
          f"{n_test} 400-px tiles of the unseen Yellowstone scene\n")
    print(f"| arm | model | recipe | steps | epochs | train img/s | train min | wall min | AP | AP50 | AP75 | "
          f"AP{versus} | AP50{versus} |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for a in arms:
        m, pace = a.metrics, a.images / max(a.train_s, 1e-9)
        print(f"| {a.name} | {a.model} | {a.recipe} | {a.steps} | {a.epochs:.3g} | {pace:.2f} | "
              f"{a.train_s / 60:.1f} | {a.wall_s / 60:.1f} | {m['map']:.3f} | {m['map50']:.3f} | {m['map75']:.3f} | "
              f"{ratio(m['map'], ref.metrics['map']) if ref else '-'} | "
              f"{ratio(m['map50'], ref.metrics['map50']) if ref else '-'} |")
    for a in arms:
        for note in a.notes:
            print(f"- {a.name}: {note}")
    sys.stdout.flush()


def print_speed(s: dict[str, Any]) -> None:
    ms = s["ms"]
    weights = "tv-r50's trained weights" if s["trained"] else "the same seeded random weights"
    print(f"\n**Inference speed**: Faster R-CNN R50-FPN, {weights} in both, batch 1, 400-px tiles, eval mode, median "
          f"of {SPEED_ROUNDS} interleaved rounds of {SPEED_TILES} tiles\n")
    print("| detector | ms / image | vs torchvision |")
    print("|---|---:|---:|")
    for name in ("torchvision", "resforge"):
        label = "torchvision fasterrcnn_resnet50_fpn" if name == "torchvision" else "resforge FasterRCNN, resnet50"
        print(f"| {label} | {ms[name]:.0f} | {ms[name] / ms['torchvision']:.3f} |")
    print(f"- outputs on a tile: {s['boxes']} boxes, {'the same' if s['same'] else 'NOT the same'} in both")
    sys.stdout.flush()


def print_sliced(arm: Arm, rows: list[tuple[str, dict[str, float], float, int]]) -> None:
    print(f"\n**Sliced against one pass** on the whole test scene (2299x2472, 574 trees), {arm.name}'s detector\n")
    print("| inference | detections | AP50 (100 dets) | AP50 (1000 dets) | AP (1000) | AR (1000) | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, m, seconds, n in rows:
        print(f"| {label} | {n} | {m['ap50_100']:.3f} | {m['ap50_1000']:.3f} | {m['ap_1000']:.3f} | "
              f"{m['ar_1000']:.3f} | {seconds:.1f} |")
    sys.stdout.flush()


def resforge_arm(name: str) -> tuple[str, dict[str, Any]] | None:
    """(training folder, options) of a resforge arm: `resforge`, `resforge-val-soap`, either with `+KEY=VALUE`s
    that change one choice of the default (`resforge+keep=best+fpn_channels=256`), else None."""
    base, *changes = name.split("+")
    if base not in RESFORGE_ARMS or not all("=" in c for c in changes):
        return None
    return RESFORGE_ARMS[base], {k: yaml.safe_load(v) for k, v in (c.split("=", 1) for c in changes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget of each arm (default 10)")
    ap.add_argument("--arms", default="resforge,tv-r50,tv-r18",
                    help="comma-separated: " + ", ".join(ARMS) + "; a resforge arm with +KEY=VALUE changes one choice")
    ap.add_argument("--data", default=str(Path(__file__).parent / ".data" / "deepforest"),
                    help="folder for the wheel and the folders built from it (default benchmarks/.data/deepforest)")
    ap.add_argument("--out", help="folder for the resforge runs (default: a temporary one, removed)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="boxes doesn't contain any box")  # resforge's plots of empty tiles
    names = args.arms.split(",")
    unknown = {n for n in names if n not in TV_ARMS and resforge_arm(n) is None}
    if unknown:
        ap.error(f"unknown arms: {', '.join(sorted(unknown))}")
    print(f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, resforge {resforge.__version__}")
    folders = detect_data.build(args.data)
    samples = test_samples(folders["test_tiles"])
    arms: list[Arm] = []
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(args.out or tmp)
        for name in names:
            if name not in TV_ARMS:
                folder, opts = resforge_arm(name)
                arms.append(run_resforge(name, folders[folder], folders["test_tiles"], samples, project, args.minutes,
                                         **opts))
            else:
                arms.append(run_reference(name, reference_train_set(folders["train"]), samples, args.minutes))
            print(f"{name}: AP50 {arms[-1].metrics['map50']:.3f} after {arms[-1].wall_s / 60:.1f} min", flush=True)
        print_accuracy(arms, args.minutes, len(samples))
        r50 = next((a for a in arms if a.name == "tv-r50"), None)
        s = speed(r50.model_obj.state_dict() if r50 else None, samples)
        print_speed(s)
        chosen = next((a for a in arms if a.name not in TV_ARMS), arms[0] if arms else None)
        rows = None
        if chosen is not None:
            rows = sliced_vs_single(chosen, folders["test_scene"])
            print_sliced(chosen, rows)
        print_goals(arms, s, rows, args.minutes)


if __name__ == "__main__":
    main()
