"""Training batches decoded and augmented on the GPU (`data.decode gpu`): the data path that keeps a fast GPU fed.

At a GPU's pace the CPU's JPEG decoders set the speed of training. Here the loader processes only read
each file and draw its augmentation: the crop and the flips, from the same per-sample seed and in the
same order as the CPU path's torchvision transforms, so an epoch trains on the same crops either way.
The training process then decodes the JPEGs of a whole batch in one nvjpeg call
(`torchvision.io.decode_jpeg(list, device=...)`), and crops, resizes (antialiased, as torchvision does
on the CPU), flips and normalises them on the device.

What nvjpeg is not given or cannot read is decoded by PIL exactly as on the CPU path and joins the same
batch: other formats, CMYK JPEGs, JPEGs that EXIF rotates, and any file the GPU decoder fails on (named
once in the log, then decoded on the CPU for the rest of the run). Validation keeps the CPU path, so its
figures are those of the preprocessing the model is deployed with.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from ..config import AugmentConfig
from ..errors import ConfigError
from .folder import DEFAULT_MAX_PIXELS, Sample, load_image
from .loader import AUGMENT_STREAM, decode_image, derived_seed, pil_to_tensor
from .transforms import PRESETS, Preprocess

log = logging.getLogger("resforge")

_EXIF_ORIENTATION = 0x0112
_NVJPEG_MODES = ("RGB", "L")  # what nvjpeg decodes as the file stores it (CMYK and YCCK go to PIL)


def check_augment(aug: AugmentConfig) -> None:
    """The GPU path does random-resized crops (or resize + centre crop), flips and normalisation: refuse the rest
    rather than silently skip it."""
    preset = PRESETS[aug.preset]
    auto = preset["auto_augment"] if aug.auto_augment is None else aug.auto_augment
    erasing = preset["random_erasing"] if aug.random_erasing is None else aug.random_erasing
    others = {"rotation": aug.rotation, "color_jitter": aug.color_jitter, "noise": aug.noise,
              "random_erasing": erasing, "auto_augment": auto if auto not in (None, "none") else 0}
    asked = [f"augment.{k} {v}" for k, v in others.items() if v]
    if asked:
        raise ConfigError(f"data.decode gpu crops, flips and normalises on the GPU; {', '.join(asked)} "
                          f"{'needs' if len(asked) == 1 else 'need'} the CPU path (data.decode cpu), or turn "
                          f"{'it' if len(asked) == 1 else 'them'} off")


@dataclass
class Plan:
    """How one decoded image becomes the network's input: crop `box` (top, left, height, width) of the
    image, resize it to `size` (height, width), take the `img_size` square at `at` (top, left), flip."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    at: tuple[int, int]
    hflip: bool
    vflip: bool


@dataclass
class EncodedBatch:
    """A batch as the loader processes leave it: the JPEGs nvjpeg is given, end to end in one buffer (one
    transfer between processes, not one per image), the images PIL decoded, each image's plan and sample index."""

    data: torch.Tensor  # uint8, 1-D
    spans: list[tuple[int, int]]  # (start, length) of each image's file in `data`; length 0: in `pixels`
    pixels: dict[int, torch.Tensor]  # position in the batch -> uint8 CxHxW
    plans: list[Plan]
    index: list[int]

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def encoded(self) -> list[bool]:
        return [n > 0 for _, n in self.spans]

    def jpeg(self, k: int) -> torch.Tensor:
        start, n = self.spans[k]
        return self.data[start:start + n]


class EncodedDataset(Dataset):
    """(image bytes or PIL-decoded pixels, plan, index) and label per sample, keyed by (epoch, index) as
    `ImageDataset`: the plan's random draws are those the CPU path's transforms make for that sample."""

    def __init__(self, samples: Sequence[Sample], pre: Preprocess, aug: AugmentConfig, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        check_augment(aug)
        self.samples, self.pre, self.seed, self.max_pixels = list(samples), pre, seed, max_pixels
        preset = PRESETS[aug.preset]
        self.crop = v2.RandomResizedCrop(pre.img_size, scale=tuple(aug.scale)) if preset["random_crop"] else None
        self.hflip = preset["hflip"] if aug.hflip is None else aug.hflip
        self.vflip = aug.vflip

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> tuple[torch.Tensor, bool, tuple[int, int]]:
        """(the file's bytes, True, its height and width) when nvjpeg can decode it as it stands, else (the
        image upright in the model's channels, decoded as the CPU path does, False, its size)."""
        path = self.samples[i][0]
        data = Path(path).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                upright = im.getexif().get(_EXIF_ORIENTATION, 1) == 1
                if im.format == "JPEG" and im.mode in _NVJPEG_MODES and upright:
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, (im.height, im.width)
        except (OSError, SyntaxError, ValueError):
            pass  # PIL's decode below names what is wrong with it
        image = decode_image(data, self.pre, self.max_pixels, name=str(path))  # as the CPU path, to the pixel
        return image, False, (image.shape[-2], image.shape[-1])

    def plan(self, height: int, width: int) -> Plan:
        """The random draws, in the order `transforms.train_transform` makes them."""
        size = self.pre.img_size
        if self.crop is not None:
            p = self.crop.make_params([torch.empty(1, 1, 1).expand(1, height, width)])
            box, resized, at = (p["top"], p["left"], p["height"], p["width"]), (size, size), (0, 0)
        else:  # resize the shorter side, centre crop (as v2.Resize and v2.CenterCrop compute them)
            short, long = sorted((height, width))
            new_long = int(self.pre.resize_size * long / short)
            resized = (self.pre.resize_size, new_long) if height <= width else (new_long, self.pre.resize_size)
            box, at = (0, 0, height, width), tuple(int(round((side - size) / 2.0)) for side in resized)
        hflip = self.hflip > 0 and torch.rand(1).item() < self.hflip
        vflip = self.vflip > 0 and torch.rand(1).item() < self.vflip
        return Plan(box, resized, at, hflip, vflip)

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[torch.Tensor, bool, Plan, int], int]:
        epoch, i = key
        image, encoded, (height, width) = self.read(i)
        # A generator of its own: the CPU path seeds the process's default one, which draws the same numbers.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derived_seed(AUGMENT_STREAM, self.seed, epoch, i))
            plan = self.plan(height, width)
        return (image, encoded, plan, i), self.samples[i][1]


def collate(items: list[tuple[tuple[torch.Tensor, bool, Plan, int], int]]) -> tuple[EncodedBatch, torch.Tensor]:
    spans, pixels, files, start = [], {}, [], 0
    for k, ((image, encoded, _, _), _) in enumerate(items):
        if encoded:
            files.append(image)
            spans.append((start, len(image)))
            start += len(image)
        else:
            spans.append((start, 0))
            pixels[k] = image
    data = torch.cat(files) if files else torch.empty(0, dtype=torch.uint8)
    return (EncodedBatch(data, spans, pixels, [item[2] for item, _ in items], [item[3] for item, _ in items]),
            torch.tensor([y for _, y in items]))


class BatchDecoder:
    """EncodedBatch -> the normalised float batch on `device` (channels-last), as the CPU transforms make it."""

    def __init__(self, pre: Preprocess, device: torch.device, names: Sequence[str],
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.pre, self.device, self.names, self.max_pixels = pre, device, names, max_pixels
        self.mode = ImageReadMode.GRAY if pre.in_chans == 1 else ImageReadMode.RGB
        self.interpolation = pre.interpolation  # torch's names for the modes torchvision's Resize uses
        self.mean = torch.tensor(pre.mean, device=device).view(1, -1, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(pre.std, device=device).view(1, -1, 1, 1) * 255)
        self.on_cpu: set[int] = set()  # samples the GPU's decoder failed on: PIL decodes them from then on

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        images = self.decode(batch)
        x = torch.stack([self._resize(img, plan) for img, plan in zip(images, batch.plans)])
        if self.interpolation == "bicubic":  # the CPU path's uint8 result cannot overshoot
            x.clamp_(0, 255)
        for dim, flips in ((3, [p.hflip for p in batch.plans]), (2, [p.vflip for p in batch.plans])):
            if any(flips):  # by index, not by mask: a mask would wait for the GPU to count it
                which = torch.tensor([k for k, f in enumerate(flips) if f], device=self.device)
                x.index_copy_(0, which, x.index_select(0, which).flip(dim))
        x = (x - self.mean) * self.inv_std
        return x.contiguous(memory_format=torch.channels_last)

    def decode(self, batch: EncodedBatch) -> list[torch.Tensor]:
        """Every image of the batch as uint8 CxHxW on the device: the JPEGs in one decoder call."""
        out: list[torch.Tensor | None] = [None] * len(batch)
        jpegs = [k for k, enc in enumerate(batch.encoded) if enc and batch.index[k] not in self.on_cpu]
        try:
            decoded = decode_jpeg([batch.jpeg(k) for k in jpegs], mode=self.mode, device=self.device) if jpegs else []
        except RuntimeError:  # one bad file fails the call: find it, one by one
            decoded = [self._decode_one(batch.jpeg(k), batch.index[k]) for k in jpegs]
        for k, image in zip(jpegs, decoded):
            out[k] = image
        for k, image in enumerate(out):
            if image is None:
                out[k] = self._pixels(batch, k).to(self.device, non_blocking=True)
        return out  # type: ignore[return-value]

    def _decode_one(self, data: torch.Tensor, index: int) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=self.mode, device=self.device)
        except RuntimeError as e:
            self.on_cpu.add(index)
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log.warning("%s: the %s JPEG decoder cannot read it (%s); decoded on the CPU from now on",
                        self.names[index], self.device.type.upper(), reason)
            return None

    def _pixels(self, batch: EncodedBatch, k: int) -> torch.Tensor:
        if k in batch.pixels:
            return batch.pixels[k]
        # At full size (the plan was drawn on it), straight to the model's channels as nvjpeg would (a draft
        # that cannot shrink the image: for a gray model, libjpeg's luma, not PIL's conversion of RGB).
        image = load_image(batch.jpeg(k).numpy().tobytes(), self.pre.mode, self.max_pixels, min_size=1 << 30,
                           name=self.names[batch.index[k]])
        return pil_to_tensor(image)

    def _resize(self, image: torch.Tensor, plan: Plan) -> torch.Tensor:
        top, left, h, w = plan.box
        x = image[:, top:top + h, left:left + w].unsqueeze(0).float()
        if (h, w) != plan.size:
            x = F.interpolate(x, size=plan.size, mode=self.interpolation,
                              antialias=self.interpolation != "nearest",
                              align_corners=False if self.interpolation != "nearest" else None)
        size = self.pre.img_size
        return x[0, :, plan.at[0]:plan.at[0] + size, plan.at[1]:plan.at[1] + size]


class Prefetcher:
    """Batches decoded on a CUDA stream of their own by a thread, one or two ahead of the training step
    (nvjpeg and the per-image crops then overlap the step instead of waiting for it)."""

    def __init__(self, batches: Iterable[tuple[EncodedBatch, torch.Tensor]], decoder: BatchDecoder, depth: int = 2):
        self.batches, self.decoder, self.depth = batches, decoder, depth

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.decoder.device
        index = torch.cuda.current_device() if device.index is None else device.index
        stream = torch.cuda.Stream(device)
        ready: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def work(batches: Iterator[tuple[EncodedBatch, torch.Tensor]]) -> None:
            torch.cuda.set_device(index)  # a thread starts on the first GPU
            try:
                with torch.cuda.stream(stream):
                    for x, y in batches:
                        item = (self.decoder(x), y.to(device, non_blocking=True), torch.cuda.Event())
                        item[2].record(stream)
                        while not stop.is_set():
                            try:
                                ready.put(item, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
            except BaseException as e:  # raised in the training thread, where it can stop the run
                ready.put(e)
                return
            ready.put(None)

        thread = threading.Thread(target=work, args=(iter(self.batches),), name="gpu-decode", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y, event = item
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                x.record_stream(current)  # the allocator must not reuse them while the step runs
                y.record_stream(current)
                yield x, y
        finally:
            stop.set()
            while thread.is_alive():  # let a blocked put see the stop
                try:
                    ready.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()
