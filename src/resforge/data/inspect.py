"""What is in an image folder, before training on it: counts, sizes, balance, duplicates, bad files."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from ..io import sha256_file
from .folder import ImageFolderScan, scan_folder
from .profile import profile_data


@dataclass
class FolderReport:
    root: str
    layout: str
    classes: list[str]
    counts: dict[str, list[int]]  # split -> images per class
    width: dict[str, float]  # min, median, max
    height: dict[str, float]
    modes: dict[str, int]  # PIL mode as stored -> images
    imbalance: float | None  # largest class / smallest class, over all splits; None if a class is empty
    duplicates: list[list[str]]  # groups of byte-identical files
    cross_split_duplicates: int  # groups spanning more than one split: evaluation leaks into training
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what could mislead training, in words

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        total = [sum(c) for c in zip(*self.counts.values())]
        width = max(len(c) for c in self.classes + ["class"])
        splits = list(self.counts)
        lines = [f"{self.root}: {len(self.classes)} classes, {sum(total):,} images ({self.layout} layout)",
                 f"{'class':<{width}}" + "".join(f"{s:>8}" for s in splits)]
        lines += [f"{c:<{width}}" + "".join(f"{self.counts[s][i]:>8,}" for s in splits)
                  for i, c in enumerate(self.classes)]
        lines.append(f"imbalance (largest/smallest class): {self.imbalance:.2f}" if self.imbalance is not None
                     else "imbalance: a class has no images")
        lines.append("size: width {min:.0f}-{max:.0f} (median {median:.0f}), ".format(**self.width)
                     + "height {min:.0f}-{max:.0f} (median {median:.0f})".format(**self.height))
        lines.append("stored as: " + ", ".join(f"{m} {n:,}" for m, n in sorted(self.modes.items())))
        dup_files = sum(len(g) - 1 for g in self.duplicates)
        lines.append(f"exact duplicates: {len(self.duplicates)} group(s), {dup_files} redundant file(s)"
                     + (f"; {self.cross_split_duplicates} group(s) span splits (evaluation leaks into training)"
                        if self.cross_split_duplicates else ""))
        lines += [f"warning: {w}" for w in self.warnings]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines += [f"  {os.path.relpath(p, self.root)}: {r}" for p, r in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        return "\n".join(lines)


def inspect_folder(root: str | os.PathLike, max_pixels: int | None = None) -> tuple[FolderReport, ImageFolderScan]:
    """Scan every file (as training would) and summarise the folder."""
    kw = {"max_pixels": max_pixels} if max_pixels else {}
    scan = scan_folder(root, val_split=0.0, strict=False, **kw)
    splits = {s: getattr(scan, s) for s in ("train", "val", "test") if getattr(scan, s)}
    counts = {s: scan.counts(s) for s in splits}
    sizes = np.array([(w, h) for w, h, _ in scan.sizes.values()], dtype=float)
    stats = [{"min": float(col.min()), "median": float(np.median(col)), "max": float(col.max())} for col in sizes.T]
    per_class = np.sum(list(counts.values()), axis=0)
    split_of = {p: s for s, samples in splits.items() for p, _ in samples}
    groups: dict[str, list[str]] = {}
    for p in split_of:
        groups.setdefault(sha256_file(p), []).append(p)
    duplicates = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    cross = sum(len({split_of[p] for p in g}) > 1 for g in duplicates)
    report = FolderReport(
        root=str(root), layout=scan.layout, classes=scan.classes, counts=counts, width=stats[0], height=stats[1],
        modes=dict(Counter(mode for _, _, mode in scan.sizes.values())),
        imbalance=float(per_class.max() / per_class.min()) if per_class.min() else None, duplicates=duplicates,
        cross_split_duplicates=cross, skipped=scan.skipped, warnings=label_warnings(scan))
    return report, scan


def label_warnings(scan: ImageFolderScan) -> list[str]:
    """Augmentations that could change labels here, as the data suggests them."""
    if not scan.train or min(scan.counts("train")) == 0:
        return []
    profile = profile_data(scan)
    if profile.flip_hazard:
        return [f"horizontal flips may change labels: {profile.flip_hazard}. The default recipe trains without "
                "them; --hflip 0 does the same with any recipe"]
    if profile.mirrored_like_other:
        pairs = ", ".join(f"{a} looks like {b}" for a, b in profile.mirrored_like_other.items())
        return [f"some classes have a left-right orientation (mirrored, {pairs}): flips make pictures of them "
                "the data does not hold; the default recipe keeps flips, as most classes look alike mirrored"]
    return []
