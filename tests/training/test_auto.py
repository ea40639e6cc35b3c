"""The auto recipe: what it reads from the folder and the budget, what it leaves to the user."""

import logging

import numpy as np
import pytest
import yaml
from helpers import make_image_folder
from PIL import Image

from resforge import api
from resforge.config import build_config
from resforge.data.folder import scan_folder
from resforge.data.profile import flip_hazard, mirror_test, profile_data
from resforge.training.auto import fit_recipe


def _oriented(root, size=20, per_class=12, seed=0):
    """Class 'west' is bright on its left, 'east' on its right: each mirrored looks like the other."""
    rng = np.random.default_rng(seed)
    for c, side in (("west", slice(0, size // 3)), ("east", slice(2 * size // 3, size))):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            x = rng.integers(0, 60, (size, size), dtype=np.uint8)
            x[:, side] = 230
            Image.fromarray(x).save(root / c / f"{i}.png")
    return root


def _fit(folder, **overrides):
    cfg = build_config("auto", overrides={"data.root": str(folder), **overrides})
    reasons = fit_recipe(cfg, scan_folder(folder))
    return cfg, reasons


def test_small_gray_images_get_their_size_whole_images_one_channel(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=("cat", "dog", "owl"), per_class=8, size=24, mode="L")
    cfg, reasons = _fit(folder)
    assert (cfg.data.in_chans, cfg.data.img_size, cfg.data.crop_pct) == (1, 24, 1.0)
    assert cfg.model.small_input is False and cfg.model.name == "resnet18" and cfg.augment.hflip == 0.5
    assert "images are 24 px" in reasons["data.img_size"] and "grayscale" in reasons["data.in_chans"]


def test_photos_keep_colour_and_a_centre_crop(tmp_path):
    folder = make_image_folder(tmp_path / "d", per_class=6, size=150)
    cfg, reasons = _fit(folder, epochs=50)
    assert cfg.data.in_chans == 3 and "data.in_chans" not in reasons
    assert cfg.data.img_size == 128 and cfg.data.crop_pct == 0.875 and cfg.augment.scale == [0.08, 1.0]


@pytest.mark.parametrize("images, side, batch", [(48000, 28, 256), (3200, 28, 64), (1437, 32, 32), (128, 25, 32),
                                                 (768, 112, 32), (20000, 160, 32)])
def test_batches_shrink_for_small_folders_but_not_below_32(tmp_path, monkeypatch, images, side, batch):
    import resforge.training.auto as auto
    from resforge.data.profile import DataProfile

    folder = make_image_folder(tmp_path / "d", per_class=4, size=24)
    monkeypatch.setattr(auto, "profile_data", lambda scan, seed: DataProfile(
        images=images, classes=10, short_side=side, long_side=side, gray=False, imbalance=1.0))
    cfg, reasons = _fit(folder)
    assert cfg.data.batch_size == batch and f"{images:,} training images" in reasons["data.batch_size"]


def test_large_folders_hold_out_5000_images_not_a_fifth(tmp_path, monkeypatch):
    from dataclasses import replace

    import resforge.training.auto as auto
    from resforge.data.folder import ImageFolderScan
    from resforge.data.profile import DataProfile

    monkeypatch.setattr(auto, "profile_data", lambda scan, seed: DataProfile(
        images=len(scan.train), classes=10, short_side=28, long_side=28, gray=True, imbalance=1.0))
    samples = [(f"/x/{i:05d}.png", i % 10) for i in range(60000)]
    scan = ImageFolderScan(root="/x", classes=[str(i) for i in range(10)], layout="classes",
                           val_source="0.2 of each class, seed 123", train=samples[:48000], val=samples[48000:])
    cfg = build_config("auto", overrides={"data.root": "/x"})
    reasons = fit_recipe(cfg, scan)
    assert cfg.data.val_split == 0.083 and "5,000 are enough to pick the best epoch" in reasons["data.val_split"]
    again = scan.resplit(cfg.data.val_split, 123)
    assert len(again.val) == 4980 and sorted(again.train + again.val) == samples  # 498 of each class's 6,000
    given = build_config("auto", overrides={"data.root": "/x", "val_split": 0.3})
    fit_recipe(given, scan)
    assert given.data.val_split == 0.3  # the user's share wins
    folder = build_config("auto", overrides={"data.root": "/x"})
    assert "data.val_split" not in fit_recipe(folder, replace(scan, val_source="folder"))  # a val folder stays
    assert replace(scan, val_source="folder").resplit(0.1, 1).val == scan.val


def test_what_the_user_sets_wins(tmp_path):
    folder = make_image_folder(tmp_path / "d", per_class=8, size=24, mode="L")
    cfg, reasons = _fit(folder, img_size=32, hflip=0.25, model="resnet34", lr=0.3)
    assert (cfg.data.img_size, cfg.augment.hflip, cfg.model.name, cfg.optim.lr) == (32, 0.25, "resnet34", 0.3)
    assert not {"data.img_size", "augment.hflip", "model.name", "optim.lr"} & reasons.keys()
    assert cfg.data.in_chans == 1  # the rest is still fitted
    sgd, reasons = _fit(folder, optimizer="sgd")
    assert sgd.optim.lr is None and "optim.lr" not in reasons  # SGD keeps its own rule (0.1 x batch/256)


def test_oriented_classes_train_without_flips(tmp_path):
    folder = _oriented(tmp_path / "d")
    scan = scan_folder(folder)
    profile = profile_data(scan)
    assert profile.mirrored_like_other == {"west": "east", "east": "west"} and profile.flip_hazard
    cfg, reasons = _fit(folder)
    assert cfg.augment.hflip == 0.0 and "orientation" in reasons["augment.hflip"]


def test_flip_hazard_from_class_names():
    assert "sides" in flip_hazard(["turn_left", "turn_right", "straight"], {})
    assert "single characters" in flip_hazard([str(i) for i in range(10)], {})
    assert flip_hazard(["cat", "dog", "bird"], {"cat": "dog"}) is None  # one class in three is no pattern
    assert flip_hazard(["leftovers", "bright"], {}) is None  # words that merely contain "left"


def test_mirror_test_leaves_symmetric_classes_alone(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=10, size=24)  # horizontal bands
    scan = scan_folder(folder)
    assert mirror_test(scan.classes, [[np.asarray(Image.open(p)) for p, c in scan.train if c == k]
                                      for k in range(3)]) == {}


def test_regularisation_grows_with_the_budget(tmp_path):
    """A few epochs underfit: no crops, no mixup, no average. Longer budgets get them, step by step."""
    folder = make_image_folder(tmp_path / "d", per_class=8, size=24)
    short, reasons = _fit(folder, epochs=5)
    medium, _ = _fit(folder, epochs=20)
    long, _ = _fit(folder, epochs=100)
    assert short.augment.preset == "none" and "underfits" in reasons["augment.preset"]
    assert (medium.augment.preset, medium.augment.scale) == ("standard", [0.8, 1.0])
    assert long.augment.scale == [0.5, 1.0]
    assert (short.augment.mixup, short.train.ema, medium.augment.mixup, medium.train.ema) == (0, False, 0, False)
    assert long.augment.mixup == 0.2 and long.train.ema
    assert short.optim.warmup_epochs < medium.optim.warmup_epochs < long.optim.warmup_epochs == 1.0


def test_a_time_limit_is_turned_into_epochs_by_the_measured_pace(tmp_path):
    folder = make_image_folder(tmp_path / "d", per_class=40, size=24)
    cfg = build_config("auto", overrides={"data.root": str(folder), "time_limit": 2})
    scan = scan_folder(folder)
    fast = fit_recipe(cfg, scan, pace=lambda c: 1000.0)
    slow_cfg = build_config("auto", overrides={"data.root": str(folder), "time_limit": 2})
    fit_recipe(slow_cfg, scan, pace=lambda c: 1.0)
    images = len(scan.train)
    assert cfg.train.epochs == round(2 * 60 * 1000 * 0.85 / images) and "measured here" in fast["train.epochs"]
    assert (cfg.augment.preset, slow_cfg.augment.preset) == ("standard", "none")  # many epochs; a few
    assert cfg.train.ema and not slow_cfg.train.ema


def test_choices_are_printed_once_before_the_first_epoch_and_recorded(tmp_path, caplog):
    folder = make_image_folder(tmp_path / "d", classes=("cat", "dog"), per_class=8, size=28, mode="L")
    with caplog.at_level(logging.INFO, logger="resforge"):
        out = api.train(folder, progress=False, epochs=1, width=0.125, workers=0, amp="off",
                        project=str(tmp_path / "runs"), name="auto")
    lines = [r.getMessage() for r in caplog.records]
    first_epoch = next(i for i, m in enumerate(lines) if m.startswith("epoch 1/"))
    shown = [i for i, m in enumerate(lines) if m.strip().startswith("img-size 28:")]
    assert len(shown) == 1 and shown[0] < first_epoch
    run = tmp_path / "runs" / "auto"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["recipe"] == "auto" and saved["auto"]["data.img_size"].startswith("img-size 28:")
    assert "model.width" in saved["user_set"] and "model.width" not in saved["auto"]
    assert "img-size 28: images are 28 px" in (run / "report.md").read_text()
    # Resuming keeps the choices as they were: nothing is fitted again, nothing printed again.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resforge"):
        api.train(resume=run, epochs=2, progress=False)
    assert not any(r.getMessage().startswith("auto recipe") for r in caplog.records)
    assert out["results"]["val"]["num_samples"] > 0


@pytest.mark.parametrize("recipe", ["fast", "keras-baseline"])
def test_a_named_recipe_is_not_refitted(tmp_path, recipe):
    folder = make_image_folder(tmp_path / "d", per_class=8, size=24, mode="L")
    cfg = build_config(recipe, overrides={"data.root": str(folder)})
    assert cfg.auto is None and cfg.data.img_size == 224 and cfg.data.in_chans == 3
