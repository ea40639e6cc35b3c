"""The `auto` recipe: a training recipe fitted to the folder and the budget.

It reads what the scan found (image sizes, channels, classes, balance, the mirror test of
`data.profile`) and the budget (`train.epochs`, or `train.time_limit`), and sets every option the
user left open; each choice comes with its reason, printed before the first epoch and kept in
config.yaml (`auto:`) and report.md. Anything the user set, by flag, keyword or config file, wins.

The rules, and what they were measured on, are in the README ("The default recipe") and in
benchmarks/defaults.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import Config, flag_name, get_option, set_option
from ..data.folder import ImageFolderScan
from ..data.profile import DataProfile, profile_data

SMALL = 64  # images up to this size (shorter side) are small: whole objects, little to crop
MIN_SIDE = 24  # smaller images are upscaled to 32: the standard stem divides by 4 before the first stage
CROPS_FROM_EPOCHS = 10  # shorter budgets underfit: random crops only slow them
STRONG_FROM_EPOCHS = 40  # from here, crops as strong as the images allow
LONG_EPOCHS = 60  # schedules at least this long can afford mixup and a weight EMA
MIN_STEPS_PER_EPOCH = 30  # small folders get smaller batches, so an epoch still has this many steps ...
MIN_BATCH = 32  # ... down to this: below it a CPU does less per second than the extra steps give back
VAL_IMAGES = 5000  # a validation split of this many ranks epochs well; more only takes from training
LOOP_EFFICIENCY = 0.85  # the training loop's pace against the bare model's (loading, metrics, schedule)


class Chooser:
    """Sets options the user did not, and records why."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.reasons: dict[str, str] = {}

    def __call__(self, key: str, value: Any, reason: str) -> None:
        if key in self.cfg.user_set:
            return
        set_option(self.cfg, key, value)
        shown = value if not isinstance(value, list) else "-".join(f"{v:g}" for v in value)
        self.reasons[key] = f"{flag_name(key).replace('_', '-')} {shown}: {reason}"

    def get(self, key: str) -> Any:
        return get_option(self.cfg, key)


def fit_recipe(cfg: Config, scan: ImageFolderScan, pace: Callable[[Config], float] | None = None) -> dict[str, str]:
    """Fill in `cfg` for this folder; return {option: reason} for what was chosen.

    `pace(cfg)` measures training images/s of the model `cfg` describes; with a time limit it tells
    how many epochs the budget buys, which sets the augmentation and the warm-up.
    """
    p = profile_data(scan, seed=cfg.data.split_seed)
    choose = Chooser(cfg)
    pretrained = bool(cfg.model.pretrained or cfg.model.init_from)  # trained weights: a gentler optimiser
    _validation(choose, scan)
    _input(choose, p, pretrained)
    _batch(choose, p)
    epochs = _epochs(choose, p, pace)
    _augmentation(choose, p, epochs)
    _optimiser(choose, pretrained, epochs)
    return choose.reasons


def _validation(choose: Chooser, scan: ImageFolderScan) -> None:
    """Large folders split off VAL_IMAGES for validation, not a fifth: the rest trains (a val folder stays)."""
    if scan.split_fixed:
        return
    total = len(scan.train) + len(scan.val)
    share = round(VAL_IMAGES / total, 3)
    if share < choose.get("data.val_split"):
        choose("data.val_split", share, f"{total:,} images: {VAL_IMAGES:,} are enough to pick the best epoch, "
                                        "the rest train")


def _input(choose: Chooser, p: DataProfile, pretrained: bool) -> None:
    side = p.short_side
    if p.gray:
        choose("data.in_chans", 1, "every image is grayscale (colour would carry nothing)")
    if side < MIN_SIDE:
        choose("data.img_size", 32, f"images are {side} px: upscaled, so the standard stem still leaves its "
                                    "first stage an 8x8 map")
    elif side <= SMALL:
        choose("data.img_size", side, f"images are {side} px: trained at their own size")
    if side <= SMALL:
        choose("data.crop_pct", 1.0, f"images are {side} px: evaluated whole, no centre crop")
        choose("model.small_input", False, "the standard stem: the small-input one costs 6x at this size, more "
                                           "than it gives back in a budget")
    else:
        size = min(224, max(SMALL, side // 32 * 32))
        choose("data.img_size", size, f"images are {side} px (median shorter side)"
                                      + (": 224 is the most a CPU budget can pay for" if size < side // 32 * 32
                                         else ""))
    if not pretrained:
        choose("model.name", "resnet18", "trained from scratch: ResNet-18 reaches a given accuracy sooner than "
                                         "deeper models (benchmarks/defaults.py)")


def _batch(choose: Chooser, p: DataProfile) -> None:
    size = choose.get("data.img_size")
    batch = 256 if size <= 32 else 128 if size <= 64 else 64 if size <= 128 else 32
    while batch > MIN_BATCH and p.images / batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    choose("data.batch_size", batch, f"{p.images:,} training images at {size} px"
                                     + (": large batches keep a CPU busy on small images" if batch > 32 else ""))


def _epochs(choose: Chooser, p: DataProfile, pace: Callable[[Config], float] | None) -> float:
    """The budget in epochs: the epochs given, or what the measured pace buys in the time limit."""
    t = choose.cfg.train
    if not t.time_limit or pace is None:
        return float(t.epochs)
    per_s = pace(choose.cfg) * LOOP_EFFICIENCY
    epochs = t.time_limit * 60 * per_s / p.images
    choose("train.epochs", max(1, round(epochs)), f"about {epochs:.3g} epochs fit in {t.time_limit:g} min at "
                                                  f"{per_s:.0f} images/s measured here (a first plan: the time "
                                                  "limit refits it as the run goes)")
    return epochs


def _augmentation(choose: Chooser, p: DataProfile, epochs: float) -> None:
    small = p.short_side <= SMALL
    if epochs < CROPS_FROM_EPOCHS:
        choose("augment.preset", "none", f"no random crops: in about {epochs:.3g} epochs the model underfits, "
                                         "and crops slow its learning more than they curb overfitting")
    else:
        low = (0.8 if small else 0.35) if epochs < STRONG_FROM_EPOCHS else (0.5 if small else 0.08)
        choose("augment.preset", "standard", f"random crops: {epochs:.3g} epochs are enough to overfit without")
        choose("augment.scale", [low, 1.0], "crops keep at least " + (
            f"{low:g} of a small image: the object stays whole or nearly" if small else f"{low:g} of the image"))
    if p.flip_hazard:
        choose("augment.hflip", 0.0, f"no flips: {p.flip_hazard}")
    else:
        choose("augment.hflip", 0.5, "flips: the classes look alike mirrored")
    long = epochs >= LONG_EPOCHS
    choose("augment.mixup", 0.2 if long else 0.0, f"mixup {'pays off in' if long else 'slows'} "
                                                    f"{'long' if long else 'short'} schedules")


def _optimiser(choose: Chooser, pretrained: bool, epochs: float) -> None:
    cfg = choose.cfg
    batch = cfg.data.batch_size
    choose("optim.optimizer", "adamw", "AdamW converges fastest in short budgets")
    if cfg.optim.optimizer == "adamw":  # another optimiser the user named keeps its own defaults
        base = 1e-3 if pretrained else 2e-3
        choose("optim.lr", round(base * (batch / 32) ** 0.5, 6), f"{base:g} at batch 32, x sqrt(batch/32)")
        choose("optim.weight_decay", 0.05, "decoupled weight decay for AdamW")
    if cfg.model.pretrained:
        choose("optim.backbone_lr_mult", 0.1, "pretrained backbone: ten times slower than the new head")
    choose("optim.schedule", "cosine", "cosine decay to zero at the end of the budget")
    warmup = round(min(1.0, max(0.05, 0.03 * epochs)), 2)
    choose("optim.warmup_epochs", warmup, "3% of the budget (at most an epoch)")
    choose("train.label_smoothing", 0.1, "label smoothing 0.1")
    long = epochs >= LONG_EPOCHS
    choose("train.ema", long, f"a weight average {'helps' if long else 'lags in'} {'long' if long else 'short'} "
                              "schedules")
