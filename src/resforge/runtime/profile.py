"""A classifier's reference profile: what its validation images looked like and what it answered on them, kept
in its model record (12 kB for 10 classes) so that whoever runs the model can tell when what it sees has changed.

Per image, six input statistics of the image as decoded, before any preprocessing (brightness, contrast,
colourfulness, sharpness, pixel count and aspect; a large JPEG is decoded at a reduced DCT scale, for the profile
as for inference, so its pixel count is the decoded one) and the model's logits. The logits are the penultimate
features under the classifier's linear map: every engine (PyTorch, onnxruntime, OpenVINO) gives them, so the
profile and the scores are the same whichever file runs, with no second output in exported graphs. They are
reduced to at most `FEATURE_DIMS` principal directions, where each predicted class's mean and the within-class
covariance are kept (class-conditional Gaussians with a shared covariance, as Lee et al. 2018 fit them on
penultimate features) along with the overall covariance that a window's mean is judged by.

Two per-image out-of-distribution scores are kept, each with its threshold at `ood_rate` of the validation
images flagged: the energy (Liu et al. 2020: -logsumexp of the logits) and the Mahalanobis distance to the
nearest class mean. `benchmarks/monitor.py` measures which separates better; `OOD_SCORE` is its answer (the
energy: in the logits' few dimensions the class-conditional Gaussians fit less well than on penultimate features).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .predictor import ImageInput, Predictor

log = logging.getLogger("resforge")

VERSION = 1
STATS = ("brightness", "contrast", "colourfulness", "sharpness", "pixels", "aspect")
STAT_HELP = {"brightness": "mean luma, 0-1", "contrast": "standard deviation of luma",
             "colourfulness": "Hasler and Suesstrunk's colourfulness (0 for gray)",
             "sharpness": "standard deviation of the luma's Laplacian", "pixels": "log2 of width x height",
             "aspect": "log2 of width / height"}
STAT_SIDE = 64  # statistics are read on the image strided down to at most this many pixels a side
FEATURE_DIMS = 16
QUANTILES = np.linspace(0.1, 0.9, 9)  # a statistic's bins: its deciles, plus one below and one above the range
CONFIDENCE_EDGES = np.linspace(0.1, 0.9, 9)
OOD_SCORES = ("energy", "mahalanobis")
OOD_SCORE = "energy"  # benchmarks/monitor.py: better on 4 shifts of Fashion-MNIST, even on 2, worse on blur
OOD_RATE = 0.05
MIN_PROFILE = 20  # validation images a profile needs


def image_stats(image: torch.Tensor) -> np.ndarray:
    """The `STATS` of a decoded uint8 C x H x W image (its own size), on a view strided to `STAT_SIDE`: a few
    microseconds whatever the image's size."""
    c, h, w = image.shape
    step = max(1, math.ceil(max(h, w) / STAT_SIDE))
    a = image[:3, ::step, ::step].numpy().astype(np.float32) / 255
    if a.shape[0] == 3:
        r, g, b = a
        luma = 0.299 * r + 0.587 * g + 0.114 * b
        rg, yb = r - g, 0.5 * (r + g) - b
        colour = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    else:
        luma, colour = a[0], 0.0
    lap = (4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:])
    return np.array([luma.mean(), luma.std(), colour, lap.std() if lap.size else 0.0, math.log2(h * w),
                     math.log2(w / h)], dtype=np.float64)


def energy(logits: np.ndarray) -> np.ndarray:
    """The free energy, -logsumexp of the logits: higher is further from what the model was trained on."""
    m = logits.max(1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(logits - m).sum(1)))


@dataclass
class Profile:
    """The reference the monitor compares with; `from_dict(to_dict())` gives it back exactly."""

    images: int
    stats: dict[str, dict[str, list[float]]]  # name -> {"edges", "ref"}: bins and the share of images in each
    center: np.ndarray  # [classes] mean logits
    components: np.ndarray  # [dims, classes] principal directions of the logits
    class_means: np.ndarray  # [classes, dims] mean reduced features of the images predicted as each class (NaN: none)
    within: np.ndarray  # [dims, dims] inverse of the within-class covariance
    total: np.ndarray  # [dims, dims] inverse of the covariance of the reduced features
    class_mix: np.ndarray  # [classes] share of the images predicted as each class
    confidence: dict[str, Any]  # {"edges", "ref", "mean", "std"} of the top probability
    ood: dict[str, Any]  # {"score", "rate", score name -> {"threshold", "quantiles"}}

    # -- features and scores ----------------------------------------------------------------------------
    def features(self, logits: np.ndarray) -> np.ndarray:
        return (logits - self.center) @ self.components.T

    def scores(self, logits: np.ndarray, score: str | None = None) -> np.ndarray:
        """Each image's out-of-distribution score (`score`, default the profile's): higher is stranger."""
        score = score or self.ood["score"]
        if score == "energy":
            return energy(logits)
        # (z - m)' W (z - m) expanded, in chunks: no images x classes x dims array
        means = np.nan_to_num(self.class_means)
        near = (means @ self.within * means).sum(1)
        near[np.isnan(self.class_means).any(1)] = np.inf  # a class never predicted is never the nearest
        out = np.empty(len(logits))
        for start in range(0, len(logits), 4096):
            z = self.features(logits[start:start + 4096])
            zw = z @ self.within
            out[start:start + 4096] = ((zw * z).sum(1)[:, None] - 2 * zw @ means.T + near[None]).min(1)
        return np.sqrt(np.maximum(out, 0))

    def flagged(self, scores: np.ndarray, score: str | None = None) -> np.ndarray:
        return scores > self.ood[score or self.ood["score"]]["threshold"]

    def judge(self, logits: np.ndarray, score: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each image's score and whether it is flagged; an image answered with a non-finite logit is flagged,
        its score NaN."""
        finite = np.isfinite(logits).all(1)
        scores = np.full(len(logits), np.nan)
        scores[finite] = self.scores(logits[finite], score)
        flagged = ~finite
        flagged[finite] = self.flagged(scores[finite], score)
        return scores, flagged

    # -- the file form -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def r(a: Any) -> Any:  # NaN (a class never predicted) as null: JSON has no NaN
            return np.vectorize(lambda v: None if np.isnan(v) else float(v), otypes=[object])(
                np.asarray(a, dtype=np.float64)).tolist()
        return {"version": VERSION, "images": self.images, "stats": self.stats, "center": r(self.center),
                "components": r(self.components), "class_means": r(self.class_means), "within": r(self.within),
                "total": r(self.total), "class_mix": r(self.class_mix), "confidence": self.confidence,
                "ood": self.ood}

    @classmethod
    def from_dict(cls, d: Any, source: str) -> Profile:
        if not isinstance(d, dict) or not isinstance(d.get("version"), int):
            raise CheckpointError(f"{source}: its monitoring profile is not one resforge wrote")
        if d["version"] > VERSION:
            raise CheckpointError(f"{source} has a monitoring profile of version {d['version']}; this resforge "
                                  f"reads up to {VERSION}: upgrade resforge")

        def a(key: str) -> np.ndarray:
            return np.array(d[key], dtype=np.float64)
        try:
            profile = cls(images=int(d["images"]), stats=d["stats"], center=a("center"), components=a("components"),
                          class_means=np.array([[np.nan if v is None else v for v in row] for row in d["class_means"]],
                                               dtype=np.float64),
                          within=a("within"), total=a("total"), class_mix=a("class_mix"), confidence=d["confidence"],
                          ood=d["ood"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: its monitoring profile is incomplete ({e})") from None
        if set(profile.stats) != set(STATS) or profile.ood.get("score") not in OOD_SCORES:
            raise CheckpointError(f"{source}: its monitoring profile names other statistics or scores")
        c, dims = len(profile.center), len(profile.components)
        shapes = {"components": (profile.components.shape, (dims, c)), "class_means": (profile.class_means.shape,
                  (c, dims)), "within": (profile.within.shape, (dims, dims)), "total": (profile.total.shape, (dims, dims)),
                  "class_mix": (profile.class_mix.shape, (c,))}
        wrong = [k for k, (got, want) in shapes.items() if got != want]
        if wrong:
            raise CheckpointError(f"{source}: its monitoring profile's {', '.join(wrong)} do not fit its {c} classes")
        return profile


def _bins(values: np.ndarray) -> dict[str, list[float]]:
    """Bins at the deciles, with one below the smallest and one above the largest value (empty in the reference,
    so a value outside the validation range counts), and the share of `values` in each."""
    lo, hi = float(values.min()), float(values.max())
    edges = np.unique(np.concatenate([[np.nextafter(lo, -np.inf)], np.quantile(values, QUANTILES), [hi]]))
    return {"edges": [float(e) for e in edges], "ref": shares(values, edges).tolist()}


def shares(values: np.ndarray, edges: Sequence[float], weights: np.ndarray | None = None) -> np.ndarray:
    """The (weighted) share of `values` in each bin; a bin holds the values above its lower edge up to its upper."""
    idx = np.searchsorted(np.asarray(edges), values, side="left")
    counts = np.bincount(idx, weights=weights, minlength=len(edges) + 1)
    return counts / max(counts.sum(), 1e-12)


def _inverse(cov: np.ndarray) -> np.ndarray:
    ridge = 1e-6 * max(float(np.trace(cov)) / len(cov), 1e-12)
    return np.linalg.inv(cov + ridge * np.eye(len(cov)))


def build_profile(stats: np.ndarray, logits: np.ndarray, ood_rate: float = OOD_RATE) -> Profile:
    """The profile of `stats` [N, len(STATS)] and `logits` [N, classes] of the validation images."""
    finite = np.isfinite(logits).all(1) & np.isfinite(stats).all(1)
    if not finite.all():
        log.warning("%d of %d images left out of the monitoring profile: the model answered them with "
                    "non-finite logits", int((~finite).sum()), len(finite))
        stats, logits = stats[finite], logits[finite]
    n, classes = logits.shape
    if n < MIN_PROFILE:
        raise ConfigError(f"a monitoring profile needs at least {MIN_PROFILE} readable images, got {n}")
    if not 0 < ood_rate < 0.5:
        raise ConfigError(f"ood_rate must be a share of images above 0 and under 0.5, got {ood_rate:g}")
    logits = logits.astype(np.float64)
    center = logits.mean(0)
    _, _, vt = np.linalg.svd(logits - center, full_matrices=False)
    components = vt[:min(FEATURE_DIMS, classes, n - 1)]
    z = (logits - center) @ components.T
    predicted = logits.argmax(1)
    means = np.full((classes, len(components)), np.nan)
    residual = np.zeros_like(z)
    for c in np.unique(predicted):
        members = predicted == c
        means[c] = z[members].mean(0)
        residual[members] = z[members] - means[c]
    p = torch.from_numpy(logits).softmax(-1).numpy()
    conf = p.max(1)
    profile = Profile(images=n, stats={name: _bins(stats[:, i]) for i, name in enumerate(STATS)}, center=center,
                      components=components, class_means=means, within=_inverse(residual.T @ residual / n),
                      total=_inverse(np.cov(z.T, bias=True).reshape(len(components), len(components))),
                      class_mix=np.bincount(predicted, minlength=classes) / n,
                      confidence={"edges": CONFIDENCE_EDGES.tolist(), "ref": shares(conf, CONFIDENCE_EDGES).tolist(),
                                  "mean": float(conf.mean()), "std": max(float(conf.std()), 1e-3)},
                      ood={"score": OOD_SCORE, "rate": ood_rate})
    for name in OOD_SCORES:
        s = profile.scores(logits, name)
        profile.ood[name] = {"threshold": float(np.quantile(s, 1 - ood_rate)),
                             "quantiles": [float(v) for v in np.quantile(s, np.linspace(0, 1, 21))]}
    return profile


def profile_model(predictor: Predictor, images: Sequence[ImageInput], batch_size: int = 32,
                  ood_rate: float = OOD_RATE) -> Profile:
    """The profile of a classifier on its validation images (unreadable ones are left out)."""
    _, stats, logits, _ = predictor.observe(images, batch_size)
    return build_profile(stats, logits.numpy(), ood_rate)
