"""How well a deployed classifier's monitor sees a change, and what it costs: Fashion-MNIST, real shifts.

  - the model: ResNet-18 at 1/4 width, 28 px, trained by `resforge train` on Fashion-MNIST's training images of
    nine classes (one, `--held-out`, left out), `--epochs` epochs with the default recipe; its profile is made
    from its validation split (a fifth of the training images), as every run's is;
  - unshifted: the test images of the nine classes (never seen in training or in the profile);
  - shifts no one tuned to: scikit-learn's handwritten digits (8x8, scaled to 28 px: MNIST itself is not on this
    machine), crops of scikit-image's photos (gray, 28 px), the test images at half brightness, blurred (Gaussian,
    radius 1), rotated a quarter turn, inverted, and the test images of the held-out class;
  - per image: AUROC of each out-of-distribution score, shift against unshifted (1 is perfect, 0.5 chance), and
    the share of each flagged at the profile's threshold (5% of validation images);
  - per window (200 images, no decay): how many shifted images a stream needs before any alarm (median of
    `--streams` random orders), the share of streams alarmed within 200 images, and the signals raised at 200;
  - false alarms: `--windows` random windows of 200 unshifted test images, the share that raise any alarm (the
    thresholds promise at most 1%), and which signal raised them;
  - serving: `resforge serve` on onnxruntime with the monitor on and off (`--no-monitor`), 16 closed-loop clients
    sending one PNG each, `--rounds` rounds of both (each first in half of them); requests/s and their ratio.

    python benchmarks/monitor.py [--work DIR] [--epochs 3] [--windows 5000] [--streams 20] [--seconds 15]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).parent))

from serve_load import load, started  # noqa: E402

from resforge import api  # noqa: E402
from resforge.data.sources import FASHION_MNIST_DIR, import_dataset  # noqa: E402
from resforge.device import cpu_name  # noqa: E402
from resforge.runtime.drift import SIGNALS, Monitor  # noqa: E402
from resforge.runtime.predictor import Predictor  # noqa: E402
from resforge.runtime.profile import OOD_SCORES  # noqa: E402

WINDOW = 200


def folder_images(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("L")) for p in sorted(folder.rglob("*.png"))]


def digits() -> list[np.ndarray]:
    from sklearn.datasets import load_digits

    images = load_digits().images  # 0-16, 8x8
    return [np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
            for im in images]


def photos(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random square crops of scikit-image's bundled photos, gray, at 28 px."""
    from skimage import data

    sources = []
    for name in ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "cat", "motorcycle_left", "retina", "page", "text", "moon", "coins", "grass", "gravel", "brick"):
        try:
            sources.append(np.asarray(Image.fromarray(getattr(data, name)()).convert("L")))
        except Exception:  # noqa: BLE001 - a photo that needs a download is skipped
            continue
    out = []
    for k in range(n):
        im = sources[k % len(sources)]
        side = int(rng.integers(48, min(im.shape) // 2))
        y, x = rng.integers(0, im.shape[0] - side), rng.integers(0, im.shape[1] - side)
        out.append(np.asarray(Image.fromarray(im[y:y + side, x:x + side]).resize((28, 28), Image.BILINEAR)))
    return out


def shifted(test: list[np.ndarray], held: list[np.ndarray], rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    def each(f):
        return [np.asarray(f(Image.fromarray(a))) for a in test[:2000]]
    return {"MNIST-like digits (scikit-learn)": digits(), "photos (scikit-image crops)": photos(2000, rng),
            "half brightness": each(lambda im: im.point(lambda v: v // 2)),
            "blurred (radius 1)": each(lambda im: im.filter(ImageFilter.GaussianBlur(1))),
            "rotated 90 degrees": each(lambda im: im.transpose(Image.ROTATE_90)),
            "inverted": [255 - a for a in test[:2000]], "held-out class": held}


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(negatives)), np.ones(len(positives))], np.r_[negatives, positives]))


def images_to_alarm(predictor: Predictor, stats: np.ndarray, logits: np.ndarray, rng: np.random.Generator
                    ) -> tuple[int | None, list[str]]:
    """Images of a random order of the shift a window needs before any alarm (None: not within 200), and the
    signals alarmed after 200."""
    order = rng.permutation(len(logits))[:WINDOW]
    mon = Monitor(predictor.profile, predictor.classes, size=WINDOW)
    first = None
    for k, i in enumerate(order, 1):
        mon.observe(stats[i:i + 1], logits[i:i + 1])
        if first is None and any(s.alarm for s in mon.signals()):
            first = k
    return first, [s.name for s in mon.signals() if s.alarm]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/bench-monitor")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--held-out", default="bag")
    ap.add_argument("--windows", type=int, default=5000)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    work = Path(args.work)
    rng = np.random.default_rng(0)
    data, held_dir = work / "fashion-mnist", work / "held-out"
    if not data.is_dir():
        import_dataset("fashion-mnist", data, FASHION_MNIST_DIR)
        held_dir.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            shutil.move(str(data / split / args.held_out), str(held_dir / split))
    run = work / "runs" / "r"
    if not (run / "best.json").is_file():
        api.train(data, model="resnet18", width=0.25, img_size=28, epochs=args.epochs, project=str(work / "runs"),
                  name="r", progress=False)
    predictor = Predictor.load(run, "onnxruntime", precision="fp32")
    test = folder_images(data / "test")
    _, test_stats, test_logits, _ = predictor.observe(test, 256)
    test_logits = test_logits.numpy()
    base = {s: predictor.profile.scores(test_logits, s) for s in OOD_SCORES}
    top1 = api.evaluate(run, data, backend="onnxruntime", precision="fp32").top1

    print(f"\n## Monitoring a Fashion-MNIST classifier ({cpu_name()})\n")
    print(f"ResNet-18 at 1/4 width, 28 px, {args.epochs} epochs on 9 classes ({args.held_out} held out): test top-1 "
          f"{top1:.2%}; profile of {predictor.profile.images} validation images; unshifted: {len(test)} test images, "
          f"{np.mean(predictor.profile.flagged(base[predictor.profile.ood['score']])):.1%} of them flagged (the "
          f"profile's rate: {predictor.profile.ood['rate']:.0%}).\n")
    print("| shift | images | AUROC energy | AUROC Mahalanobis | flagged (default score) | images to first alarm "
          "(median) | streams alarmed within 200 | signals alarmed at 200 |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, images in shifted(test, folder_images(held_dir / "test"), rng).items():
        _, stats, logits, _ = predictor.observe(images, 256)
        logits = logits.numpy()
        scores = {s: predictor.profile.scores(logits, s) for s in OOD_SCORES}
        runs = [images_to_alarm(predictor, stats, logits, rng) for _ in range(args.streams)]
        firsts = [f for f, _ in runs if f is not None]
        raised = sorted({s for _, alarmed in runs for s in alarmed}, key=SIGNALS.index)
        print(f"| {name} | {len(images)} | {auroc(base['energy'], scores['energy']):.3f} | "
              f"{auroc(base['mahalanobis'], scores['mahalanobis']):.3f} | "
              f"{np.mean(predictor.profile.flagged(scores[predictor.profile.ood['score']])):.1%} | "
              f"{statistics.median(firsts) if firsts else '-'} | {len(firsts)}/{len(runs)} | {', '.join(raised)} |")

    counts = dict.fromkeys(SIGNALS, 0)
    alarmed = 0
    for _ in range(args.windows):
        idx = rng.choice(len(test), WINDOW, replace=False)
        mon = Monitor(predictor.profile, predictor.classes, size=WINDOW)
        mon.observe(test_stats[idx], test_logits[idx])
        hit = [s.name for s in mon.signals() if s.alarm]
        alarmed += bool(hit)
        for s in hit:
            counts[s] += 1
    print(f"\nFalse alarms: {alarmed} of {args.windows} windows of {WINDOW} unshifted test images "
          f"({alarmed / args.windows:.2%}; promised at most 1%)" +
          (": " + ", ".join(f"{k} {v}" for k, v in counts.items() if v) if alarmed else "") + ".")

    pngs = []
    for a in test[:256]:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    command = [sys.executable, "-m", "resforge", "serve", str(run), "--backend", "onnxruntime", "--precision", "fp32"]
    rps: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):  # neither always goes first
            with started(command + ([] if mode == "on" else ["--no-monitor"])) as (url, _):
                rps[mode].append(load(url, pngs, 16, 3, args.seconds)["rps"])
    on, off = statistics.mean(rps["on"]), statistics.mean(rps["off"])
    print(f"\nServing, 16 clients, one 28-px PNG per request, onnxruntime: monitor on {on:.0f} requests/s, off "
          f"{off:.0f} ({', '.join(f'{a:.0f}/{b:.0f}' for a, b in zip(rps['on'], rps['off']))} in alternating rounds "
          f"of {args.seconds:g} s): on/off = {on / off:.3f}.")


if __name__ == "__main__":
    main()
