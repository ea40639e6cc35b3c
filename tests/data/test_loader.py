"""Batches are a function of (seed, epoch): not of workers, persistence or caching."""

import torch
from helpers import make_image_folder

from resforge.config import AugmentConfig
from resforge.data.folder import scan_folder
from resforge.data.loader import EpochSampler, ImageDataset, cache_bytes, make_loader
from resforge.data.transforms import eval_transform, imagenet_stats, make_preprocess, train_transform

PRE = make_preprocess(16, 1.0, 3, "bilinear", *imagenet_stats(3))


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_augmented_batches_do_not_depend_on_workers(tmp_path):
    scan = scan_folder(make_image_folder(tmp_path, per_class=6), val_split=0.0)
    ds = ImageDataset(scan.train, train_transform(PRE, AugmentConfig(preset="strong")), PRE, seed=3)
    l0 = make_loader(ds, 4, train=True, workers=0, seed=3)
    l2 = make_loader(ds, 4, train=True, workers=2, seed=3)
    e1 = _epoch(l0, 1)
    assert _same(e1, _epoch(l2, 1))
    assert _same(e1, _epoch(l2, 1))  # persistent workers, asked again
    assert not _same(e1, _epoch(l0, 2))


def test_sampler_is_a_seeded_permutation_per_epoch():
    s = EpochSampler(10, shuffle=True, seed=0)
    s.set_epoch(0)
    a = list(s)
    assert sorted(i for _, i in a) == list(range(10)) and all(e == 0 for e, _ in a)
    s.set_epoch(1)
    assert [i for _, i in s] != [i for _, i in a]
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_cache_gives_the_same_evaluation_input(tmp_path):
    scan = scan_folder(make_image_folder(tmp_path, per_class=3, size=40), val_split=0.0)
    plain = ImageDataset(scan.train, eval_transform(PRE), PRE)
    cached = ImageDataset(scan.train, eval_transform(PRE), PRE)
    cached.build_cache(progress=False)
    assert cached.cache[0].shape[-1] == PRE.resize_size
    for i in range(len(plain)):
        assert (plain[i][0] - cached[i][0]).abs().max() < 0.05  # resized once vs twice: rounding only
    assert cache_bytes(scan.train, scan.sizes, PRE) == 6 * 3 * 16 * 16


def test_training_loader_drops_a_ragged_batch_and_eval_keeps_all(tmp_path):
    scan = scan_folder(make_image_folder(tmp_path, per_class=5), val_split=0.0)
    ds = ImageDataset(scan.train, eval_transform(PRE), PRE)
    assert len(make_loader(ds, 4, train=True, workers=0, seed=0)) == 2
    assert sum(len(y) for _, y in make_loader(ds, 4, train=False, workers=0, seed=0)) == 10
