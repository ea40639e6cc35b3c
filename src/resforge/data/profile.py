"""What a scanned folder is like, as a recipe needs to know it: image size, channels, balance, and
whether its classes have a left-right orientation that horizontal flips would break.

The mirror test: each class's mean image (grayscale, 16x16, from up to 64 training images) is
mirrored; a class has a consistent orientation (digits, letters, arrows, shoes that all point one
way) when its mirrored mean is nearer another class's mean than its own and differs from the
unmirrored one by a good part of the typical distance between classes (the second condition
keeps classes of texture-like photos, whose means are nearly uniform, from being flagged by noise).
Flipping such images makes pictures the test set never holds and, for characters, changes what
they mean. Class names that speak of left and right, or that are single characters, point the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .folder import ImageFolderScan, load_image

MIRROR_SIZE = 16
MIRROR_IMAGES = 64  # per class
ORIENTED = 0.6  # mirror-image distance / median distance to the other classes' means
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_SIDE = re.compile(r"(^|[^a-z])(left|right)([^a-z]|$)")


@dataclass
class DataProfile:
    images: int  # training images
    classes: int
    short_side: int  # median shorter side of the training images, in pixels
    long_side: int  # median longer side
    gray: bool  # every image is stored as grayscale
    imbalance: float  # largest / smallest training class
    mirrored_like_other: dict[str, str] = field(default_factory=dict)  # class -> the class its mirror image resembles
    flip_hazard: str | None = None  # why horizontal flips would hurt, or None

    @property
    def per_class(self) -> float:
        return self.images / self.classes


def _class_samples(scan: ImageFolderScan, seed: int) -> list[list[np.ndarray]]:
    """Up to MIRROR_IMAGES decoded RGB images per class, chosen at random."""
    rng = np.random.default_rng(seed)
    by_class: list[list[str]] = [[] for _ in scan.classes]
    for path, label in scan.train:
        by_class[label].append(path)
    return [[np.asarray(load_image(paths[i], "RGB")) for i in rng.choice(len(paths), min(MIRROR_IMAGES, len(paths)),
                                                                         replace=False)] if paths else []
            for paths in by_class]


def looks_gray(samples: list[list[np.ndarray]], tolerance: int = 3) -> bool:
    """Every sampled image has equal channels (JPEG's colour noise aside): colour carries nothing."""
    return all(int(np.ptp(a.astype(np.int16), axis=2).max(initial=0)) <= tolerance for c in samples for a in c)


def mirror_test(classes: list[str], samples: list[list[np.ndarray]]) -> dict[str, str]:
    """Classes whose mirrored mean image is nearer another class's mean than their own."""
    from PIL import Image

    if any(not c for c in samples):
        return {}
    m = np.stack([np.mean([np.asarray(Image.fromarray(a).convert("L").resize((MIRROR_SIZE, MIRROR_SIZE)),
                                      dtype=np.float64) for a in c], 0) for c in samples])
    out = {}
    for c, name in enumerate(classes):
        mirrored = m[c][:, ::-1]
        nearest = int(np.sqrt(((m - mirrored) ** 2).sum((1, 2))).argmin())
        spread = np.median([np.linalg.norm(m[c] - m[d]) for d in range(len(m)) if d != c])
        if nearest != c and np.linalg.norm(m[c] - mirrored) >= ORIENTED * spread:
            out[name] = classes[nearest]
    return out


def flip_hazard(classes: list[str], mirrored: dict[str, str]) -> str | None:
    """Why horizontal flips would change labels or make images unlike the data, or None."""
    sided = [c for c in classes if _SIDE.search(c.lower())]
    if sided:
        return f"class names speak of sides ({', '.join(sided[:3])}): a mirror image swaps left and right"
    if sum(len(c) == 1 for c in classes) * 2 >= len(classes):
        return "class names are single characters: mirrored characters are not characters"
    if len(mirrored) * 2 >= len(classes):
        return (f"{len(mirrored)} of {len(classes)} classes have a left-right orientation (mirrored, "
                + ", ".join(f"{a} looks like {b}" for a, b in list(mirrored.items())[:3]) + ")")
    return None


def profile_data(scan: ImageFolderScan, seed: int = 0) -> DataProfile:
    train = [p for p, _ in scan.train]
    sizes = np.array([scan.sizes[p][:2] for p in train])
    counts = np.bincount([label for _, label in scan.train], minlength=len(scan.classes))
    samples = _class_samples(scan, seed)
    mirrored = mirror_test(scan.classes, samples)
    stored_gray = all(scan.sizes[p][2] in GRAY_MODES for p in train)
    return DataProfile(
        images=len(train), classes=len(scan.classes), short_side=int(np.median(sizes.min(1))),
        long_side=int(np.median(sizes.max(1))), gray=stored_gray or looks_gray(samples),
        imbalance=float(counts.max() / max(1, counts.min())), mirrored_like_other=mirrored,
        flip_hazard=flip_hazard(scan.classes, mirrored))
