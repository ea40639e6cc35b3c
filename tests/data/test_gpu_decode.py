"""data.decode gpu: the loader reads files and draws the augmentation, the training device decodes and crops.

On a machine without a GPU the same code runs with the CPU as the device (libjpeg instead of nvjpeg): the
plans, the crops and the fallbacks are the ones the GPU runs."""

import logging

import numpy as np
import pytest
import torch
from helpers import write_crops
from PIL import Image

from resforge import ConfigError
from resforge.config import AugmentConfig
from resforge.data.folder import scan_folder
from resforge.data.gpu_decode import BatchDecoder, EncodedDataset, check_augment, collate
from resforge.data.loader import ImageDataset, make_loader
from resforge.data.transforms import imagenet_stats, make_preprocess, train_transform

ONE_LEVEL = 1.01 / 255 / min(imagenet_stats(3)[1])  # one uint8 step after normalisation


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEG crops of real photos (40-200 px, never decoded at a reduced scale at 112 px), plus files nvjpeg is
    not given: a PNG, a CMYK JPEG and a JPEG that EXIF turns upright."""
    root = write_crops(tmp_path_factory.mktemp("gpu") / "photos", per_class=4, seed=0)
    first = sorted((root / "china").iterdir())[0]
    with Image.open(first) as im:
        im.save(root / "china" / "plain.png")
        im.convert("CMYK").save(root / "china" / "cmyk.jpg")
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated: the file's pixels lie on their side
        im.save(root / "flower" / "turned.jpg", exif=exif)
    return scan_folder(root, val_split=0.0001)


def _both(scan, pre, aug, device="cpu", epoch=2):
    samples = scan.train
    cpu = ImageDataset(samples, train_transform(pre, aug), pre, seed=3)
    enc = EncodedDataset(samples, pre, aug, seed=3)
    batch, labels = collate([enc[(epoch, i)] for i in range(len(enc))])
    x = BatchDecoder(pre, torch.device(device), [p for p, _ in samples])(batch)
    ref = torch.stack([cpu[(epoch, i)][0] for i in range(len(cpu))])
    return x, ref, batch, labels


@pytest.mark.parametrize("preset,interpolation,chans", [("standard", "bilinear", 3), ("none", "bilinear", 3),
                                                        ("standard", "bilinear", 1)])
def test_the_batch_path_makes_the_crops_and_flips_of_the_cpu_path(photos, preset, interpolation, chans):
    pre = make_preprocess(112, 0.875, chans, interpolation, *imagenet_stats(chans))
    aug = AugmentConfig(preset=preset, hflip=0.5, vflip=0.5, scale=[0.3, 1.0])
    x, ref, batch, labels = _both(photos, pre, aug)
    assert x.shape == ref.shape == (len(photos.train), chans, 112, 112)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert labels.tolist() == [y for _, y in photos.train]
    assert any(p.hflip for p in batch.plans) and any(p.vflip for p in batch.plans)
    assert sorted(batch.encoded) != [True] * len(batch) and any(batch.encoded)  # both kinds in the batch
    per_image = (x - ref).abs().flatten(1).amax(1)
    assert per_image.max() <= ONE_LEVEL, per_image  # the same crop and flip, resized alike, to a uint8 step


def test_an_epoch_draws_other_crops_and_the_same_epoch_the_same(photos):
    pre = make_preprocess(112, 0.875, 3, "bilinear", *imagenet_stats(3))
    enc = EncodedDataset(photos.train, pre, AugmentConfig(), seed=3)
    plans = lambda epoch: [enc[(epoch, i)][0][2] for i in range(len(enc))]  # noqa: E731
    assert plans(1) == plans(1) and plans(1) != plans(2)


def test_a_file_the_device_decoder_fails_on_is_named_once_and_decoded_on_the_cpu(photos, monkeypatch, caplog):
    import resforge.data.gpu_decode as gpu

    pre = make_preprocess(112, 0.875, 3, "bilinear", *imagenet_stats(3))
    aug = AugmentConfig(preset="none")
    names = [p for p, _ in photos.train]
    bad = next(i for i, p in enumerate(names) if p.endswith("001.jpg"))
    real = gpu.decode_jpeg
    calls = []

    def failing(data, mode, device):  # the device's decoder refuses one file: a batch with it fails whole
        many = isinstance(data, list)
        calls.append(len(data) if many else 1)
        if any(torch.equal(d, bad_bytes) for d in (data if many else [data])):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(data, mode=mode, device=device)

    enc = EncodedDataset(photos.train, pre, aug)
    bad_bytes = enc.read(bad)[0]
    monkeypatch.setattr(gpu, "decode_jpeg", failing)
    decoder = BatchDecoder(pre, torch.device("cpu"), names)
    cpu = ImageDataset(photos.train, train_transform(pre, aug), pre)
    ref = torch.stack([cpu[(0, i)][0] for i in range(len(cpu))])
    with caplog.at_level(logging.WARNING, logger="resforge"):
        for epoch in range(2):
            batch, _ = collate([enc[(epoch, i)] for i in range(len(enc))])
            x = decoder(batch)
            assert (x - ref).abs().max() <= ONE_LEVEL
    warnings = [r.getMessage() for r in caplog.records if "cannot read it" in r.getMessage()]
    assert warnings == [f"{names[bad]}: the CPU JPEG decoder cannot read it (nvjpeg: unsupported JPEG); decoded on "
                        "the CPU from now on"]
    assert decoder.on_cpu == {bad}
    jpegs = sum(enc.read(i)[1] for i in range(len(enc)))
    assert calls[-1] == jpegs - 1  # the second epoch sends the rest in one call, without the bad file


def test_the_loader_collates_encoded_batches_in_worker_processes(photos):
    pre = make_preprocess(112, 0.875, 3, "bilinear", *imagenet_stats(3))
    enc = EncodedDataset(photos.train, pre, AugmentConfig(), seed=3)
    loader = make_loader(enc, 4, train=True, workers=1, seed=3, collate_fn=collate)
    loader.sampler.set_epoch(5)
    batches = list(loader)
    assert [len(b) for b, _ in batches] == [4] * (len(enc) // 4)
    in_process = {i: enc[(5, i)][0][2] for i in range(len(enc))}
    assert all(in_process[i] == plan for b, _ in batches for i, plan in zip(b.index, b.plans))


def test_augmentations_the_gpu_path_does_not_do_are_refused():
    check_augment(AugmentConfig(preset="standard", hflip=0.5, vflip=0.2, mixup=0.2, cutmix=1.0))
    for aug, named in [(AugmentConfig(preset="strong"), "augment.random_erasing 0.25, augment.auto_augment trivial"),
                       (AugmentConfig(rotation=10), "augment.rotation 10"),
                       (AugmentConfig(color_jitter=0.2, noise=0.1), "augment.color_jitter 0.2, augment.noise 0.1")]:
        with pytest.raises(ConfigError, match=named):
            check_augment(aug)


@pytest.mark.cuda
def test_on_the_gpu_the_crops_and_flips_are_the_cpu_paths_and_nvjpeg_decodes_as_libjpeg(photos):
    """Given nvjpeg's pixels, the CPU transforms make what the GPU makes, to a uint8 step or two; nvjpeg's pixels
    themselves differ from libjpeg's only by its own chroma upsampling (edges differ, the mean hardly)."""
    pre = make_preprocess(112, 0.875, 3, "bilinear", *imagenet_stats(3))
    aug = AugmentConfig(hflip=0.5, vflip=0.5, scale=[0.3, 1.0])
    enc = EncodedDataset(photos.train, pre, aug, seed=3)
    batch, _ = collate([enc[(2, i)] for i in range(len(enc))])
    decoder = BatchDecoder(pre, torch.device("cuda"), [p for p, _ in photos.train])
    pixels = [p.cpu() for p in decoder.decode(batch)]
    x = decoder(batch)
    assert x.is_cuda
    cpu = ImageDataset(photos.train, train_transform(pre, aug), pre, seed=3)
    cpu.cache = pixels  # the CPU transforms, on the very pixels nvjpeg decoded
    ref = torch.stack([cpu[(2, i)][0] for i in range(len(cpu))])
    assert (x.cpu() - ref).abs().flatten(1).amax(1).max() <= 2 * ONE_LEVEL
    x_pil, ref_pil, _, _ = _both(photos, pre, aug, device="cuda")
    assert (x_pil.cpu() - ref_pil).abs().mean() < 2 * ONE_LEVEL  # 0.57 of a step measured on an H200


def test_gray_jpegs_for_a_gray_model(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (60, 80), dtype=np.uint8)).save(tmp_path / c / f"{i}.jpg")
    scan = scan_folder(tmp_path, val_split=0.0001)
    pre = make_preprocess(48, 1.0, 1, "bilinear", *imagenet_stats(1))
    x, ref, batch, _ = _both(scan, pre, AugmentConfig(preset="none"))
    assert all(batch.encoded) and x.shape[1] == 1
    assert (x - ref).abs().max() <= ONE_LEVEL * 1.2


def test_gpu_decode_on_a_cpu_run_is_refused(photos, tmp_path):
    from resforge import api

    with pytest.raises(ConfigError, match="data.decode gpu decodes on the training GPU, and this run trains on cpu"):
        api.train(photos.root, decode="gpu", device="cpu", model="resnet18", width=0.125, img_size=16, epochs=1,
                  workers=0, project=str(tmp_path), progress=False)
