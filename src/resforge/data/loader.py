"""Datasets and loaders that keep up with the model and make every epoch reproducible.

The sampler hands each worker `(epoch, index)`, and each sample's augmentation is drawn from a
generator seeded by (seed, epoch, index). So an epoch's batches do not depend on the number of
workers, on persistent workers, or on whether the run was resumed: a killed and resumed run sees
the same images, augmented the same way, as one that never stopped.

Small sets can be kept in memory decoded and resized to the evaluation resize size (the Keras
`cache()` habit): decoding then happens once, not once per epoch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms import v2

from ..device import cpu_cores
from .folder import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, Sample, load_image
from .transforms import Preprocess, eval_transform, interpolation_mode

CACHE_AUTO_BYTES = 2 * 1024**3
log = logging.getLogger("resforge")


def pil_to_tensor(im) -> torch.Tensor:
    """The image's pixels copied into a uint8 CxHxW tensor (channels-last memory, as torchvision takes it)."""
    a = np.asarray(im)
    return torch.from_numpy(a.copy()).unsqueeze(0) if a.ndim == 2 else torch.from_numpy(a.copy()).permute(2, 0, 1)


def decode_image(source: str | os.PathLike | bytes, pre: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None, formats: Sequence[str] = IMAGE_FORMATS, max_aspect: float | None = None
                 ) -> torch.Tensor:
    """An image file (path or bytes) as uint8 CxHxW in the model's channels, a large JPEG at a reduced DCT
    scale that still covers the resize size: the one decoding of training, evaluation and prediction
    (`formats` and `max_aspect` as `load_image` takes them)."""
    return pil_to_tensor(load_image(source, pre.mode, max_pixels, min_size=pre.resize_size, name=name,
                                    formats=formats, max_aspect=max_aspect))


class ImageDataset(Dataset):
    """(image tensor, label) pairs from files, or from the in-memory cache when it is built."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, pre: Preprocess, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.samples = list(samples)
        self.transform = transform
        self.pre = pre
        self.seed = seed
        self.max_pixels = max_pixels
        self.cache: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, i: int) -> torch.Tensor:
        """The uint8 CxHxW image, shorter side at least the resize size for large JPEGs."""
        if self.cache is not None:
            return self.cache[i]
        return decode_image(self.samples[i][0], self.pre, self.max_pixels)

    def build_cache(self, progress: bool = True) -> None:
        """Decode everything once, resized so the shorter side is the evaluation resize size."""
        from tqdm.auto import tqdm

        resize = v2.Resize(self.pre.resize_size, interpolation=interpolation_mode(self.pre.interpolation),
                           antialias=True)
        bar = tqdm(range(len(self)), desc="caching", disable=None if progress else True, leave=False, unit="img")
        self.cache = [resize(self.decode(i)) for i in bar]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        return seeded_sample(key, self.seed, lambda i: (self.transform(self.decode(i)), self.samples[i][1]))


_MASK64 = (1 << 64) - 1


def derived_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers: splitmix64's finaliser over each part in turn."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = ((h ^ (part & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


AUGMENT_STREAM, SHUFFLE_STREAM = 0, 1
T = TypeVar("T")


def seeded_sample(key: int | tuple[int, int], seed: int, get: Callable[[int], T]) -> T:
    """`get(index)` for a sampler's key: a training key `(epoch, index)` draws the sample's augmentation from a
    generator seeded by (seed, epoch, index); a plain index (evaluation) as it comes."""
    epoch, i = key if isinstance(key, tuple) else (None, key)
    if epoch is None:
        return get(i)
    # The CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding, formatting a stack
    # trace each time (half a millisecond per image on CUDA builds). A loader process owns its generator;
    # in the main process, the training's random stream is put back afterwards.
    own = get_worker_info() is not None
    with contextlib.nullcontext() if own else torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derived_seed(AUGMENT_STREAM, seed, epoch, i))
        return get(i)


def cache_bytes(samples: Sequence[Sample], sizes: dict[str, tuple[int, int, str]], pre: Preprocess) -> int:
    """Memory the cache would take, from the sizes the scan recorded."""
    total = 0
    for path, _ in samples:
        w, h, _ = sizes.get(path, (pre.resize_size, pre.resize_size, ""))
        scale = pre.resize_size / min(w, h)
        total += round(w * scale) * round(h * scale) * pre.in_chans
    return total


class EpochSampler(Sampler):
    """Shuffled: (epoch, index) in a seeded permutation per epoch, so each sample's augmentation is seeded
    by them and a resumed epoch replays exactly. With `world` > 1 processes, rank `rank` takes its slice
    of each global batch of `batch` (a ragged last one dropped): every world size trains on the same
    global batches. Not shuffled (evaluation): plain indices in order, every `world`-th for each rank."""

    def __init__(self, n: int, shuffle: bool, seed: int = 0, batch: int = 1, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.batch, self.rank, self.world = batch, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.world == 1:
            return self.n
        if not self.shuffle:
            return len(range(self.rank, self.n, self.world))
        return self.n // self.batch * (self.batch // self.world)

    def __iter__(self) -> Iterator[tuple[int, int] | int]:
        if not self.shuffle:
            return iter(range(self.rank, self.n, self.world))
        g = torch.Generator().manual_seed(derived_seed(SHUFFLE_STREAM, self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)
        if self.world > 1:
            per = self.batch // self.world
            batches = order[:self.n // self.batch * self.batch].view(-1, self.batch)
            order = batches[:, self.rank * per:(self.rank + 1) * per].flatten()
        return iter([(self.epoch, i) for i in order.tolist()])


def default_workers(processes: int = 1) -> int:
    """One loader process per spare core (up to 8): the main process needs a core for the model. `processes`
    training processes share the cores."""
    return max(0, min(8, cpu_cores() // processes - 1))


FEW_CORES = 4


def resolve_workers(requested: int, cached: bool = False, processes: int = 1) -> int:
    """-1: `default_workers()`, or none for images already decoded in memory on a machine with few cores
    (augmenting them is cheap; a loader process would only take a core from the model). A count above
    the cores is capped there (more processes only contend). `processes` training processes share them."""
    cores = max(1, cpu_cores() // processes)
    if requested < 0:
        return 0 if cached and cores < FEW_CORES else default_workers(processes)
    if requested > cores:
        log.warning("data.workers %d is more than the %d CPU core(s) each training process may use: using %d",
                    requested, cores, cores)
        return cores
    return requested


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int, seed: int,
                pin_memory: bool = False, rank: int = 0, world: int = 1, collate_fn: Callable | None = None
                ) -> DataLoader:
    """Training loaders shuffle and drop a ragged last batch (BatchNorm cannot use a batch of one); with
    `world` processes, each loads its share of every global batch of `batch_size`."""
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, batch=batch_size, rank=rank, world=world)
    drop_last = train and len(dataset) > batch_size
    return DataLoader(dataset, batch_size=batch_size // world if train else batch_size, sampler=sampler,
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=pin_memory,
                      drop_last=drop_last, prefetch_factor=4 if workers > 0 else None, collate_fn=collate_fn)


def dataset_stats(samples: Sequence[Sample], pre: Preprocess, limit: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (up to `limit`) training images as the network will see them."""
    plain = Preprocess(**{**pre.to_dict(), "mean": [0.0] * pre.in_chans, "std": [1.0] * pre.in_chans})
    step = max(1, len(samples) // limit)
    ds = ImageDataset(samples[::step], eval_transform(plain), plain)
    total = torch.zeros(pre.in_chans, dtype=torch.float64)
    sq = torch.zeros_like(total)
    n = 0
    for i in range(len(ds)):
        x = ds[i][0].double()
        total += x.sum((1, 2))
        sq += (x * x).sum((1, 2))
        n += x[0].numel()
    mean = total / n
    std = (sq / n - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
