"""Presets and each augmentation option change what the network sees; evaluation never varies."""

import pytest
import torch
from torchvision.transforms import v2

from resforge.config import AugmentConfig
from resforge.data.transforms import BatchMix, eval_transform, imagenet_stats, make_preprocess, train_transform

PRE = make_preprocess(32, 0.875, 3, "bilinear", *imagenet_stats(3))


def _img(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=g)


def _ops(t):
    return [type(op).__name__ for op in t.transforms]


def test_eval_is_resize_centre_crop_normalise():
    assert PRE.resize_size == 37
    t = eval_transform(PRE)
    assert _ops(t) == ["ToImage", "Resize", "CenterCrop", "ToDtype", "Normalize"]
    x = _img()
    assert torch.equal(t(x), t(x)) and t(x).shape == (3, 32, 32)


@pytest.mark.parametrize("preset, expected", [
    ("none", ["ToImage", "Resize", "CenterCrop", "ToDtype", "Normalize"]),
    ("standard", ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]),
    ("strong", ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide", "ToDtype",
                "Normalize", "RandomErasing"]),
])
def test_presets(preset, expected):
    assert _ops(train_transform(PRE, AugmentConfig(preset=preset))) == expected


@pytest.mark.parametrize("option, value, op", [
    ("vflip", 0.5, "RandomVerticalFlip"), ("rotation", 15.0, "RandomRotation"),
    ("color_jitter", 0.4, "ColorJitter"), ("noise", 0.1, "GaussianNoise"),
    ("auto_augment", "rand", "RandAugment"), ("random_erasing", 0.5, "RandomErasing"),
])
def test_each_option_adds_its_operation_and_changes_the_output(option, value, op):
    base = AugmentConfig(preset="none")
    t0, t1 = train_transform(PRE, base), train_transform(PRE, AugmentConfig(preset="none", **{option: value}))
    assert op in _ops(t1) and op not in _ops(t0)
    x = _img()
    outs = []
    for seed in range(6):
        torch.manual_seed(seed)
        outs.append(t1(x))
    assert any(not torch.allclose(o, t0(x)) for o in outs)


def test_overrides_beat_presets():
    t = train_transform(PRE, AugmentConfig(preset="strong", hflip=0.0, auto_augment="none", random_erasing=0.0))
    assert _ops(t) == ["ToImage", "RandomResizedCrop", "ToDtype", "Normalize"]


def test_scale_reaches_random_resized_crop():
    t = train_transform(PRE, AugmentConfig(scale=[0.5, 0.9]))
    assert t.transforms[1].scale == (0.5, 0.9)


def test_grayscale_normalisation_and_jitter():
    pre1 = make_preprocess(32, 1.0, 1, "bilinear", *imagenet_stats(1))
    assert len(pre1.mean) == 1 and pre1.resize_size == 32
    t = train_transform(pre1, AugmentConfig(color_jitter=0.3))
    out = t(torch.randint(0, 256, (1, 40, 40), dtype=torch.uint8))
    assert out.shape == (1, 32, 32)


@pytest.mark.parametrize("kw, kind", [(dict(mixup=0.2), v2.MixUp), (dict(cutmix=1.0), v2.CutMix)])
def test_batch_mix_makes_soft_labels(kw, kind):
    mix = BatchMix(AugmentConfig(**kw), num_classes=4)
    assert isinstance(mix.mix, kind)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    mx, my = mix(x, y)
    assert my.shape == (8, 4) and torch.allclose(my.sum(1), torch.ones(8))
    assert not torch.equal(mx, x)


def test_batch_mix_off_and_probability():
    assert BatchMix(AugmentConfig(), 3).mix is None
    both = BatchMix(AugmentConfig(mixup=0.2, cutmix=1.0), 3)
    assert isinstance(both.mix, v2.RandomChoice)
    never = BatchMix(AugmentConfig(mixup=0.2, mix_prob=0.0), 3)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    assert never(x, y)[1] is y
