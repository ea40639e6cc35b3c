"""A window of recent images judged against a model's profile: what a deployed classifier watches.

Each image adds its input statistics and logits; the window holds the last `size` of them, the older ones
weighing `decay` times less per image. Each signal compares the window with the profile:

- each input statistic and the predicted-class mix: the population stability index (PSI) of the window's
  shares of the profile's bins;
- the features: the Mahalanobis distance of the window's mean reduced features from the validation mean;
- the confidence: the window's mean top probability minus the validation mean;
- the out-of-distribution rate: the share of the window's images over the profile's threshold.

Every threshold is a quantile of the statistic's distribution when nothing has changed, for the window's
effective size n and the profile's N images: the PSI's by simulation (multinomial windows and references drawn
from the profile's shares), a mean's distance chi-square or normal, the flagged share binomial. Each signal gets
`false_alarm` / (number of signals) of the window's false-alarm budget (Bonferroni), so a window of unchanged
images raises any alarm with probability at most `false_alarm`; `benchmarks/monitor.py` measures it.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats as st

from ..errors import ConfigError
from .profile import STATS, Profile, shares

WINDOW, DECAY, MIN_IMAGES, FALSE_ALARM = 200, 1.0, 30, 0.01
SIGNALS = (*STATS, "features", "classes", "confidence", "ood_rate")
SIGNAL_HELP = {"features": "distance of the window's mean features from the validation mean, in standard "
                           "deviations", "classes": "PSI of the predicted-class mix",
               "confidence": "mean top probability minus the validation mean",
               "ood_rate": "share of images flagged out of distribution"}


@dataclass
class Signal:
    name: str
    value: float
    threshold: float
    alarm: bool

    def describe(self) -> str:
        what = "PSI" if self.name in STATS else SIGNAL_HELP[self.name].split(" ")[0]
        return f"{self.name} moved: {what} {self.value:+.3g} against a threshold of {self.threshold:.3g}"


def smoothed(p: np.ndarray, n: float) -> np.ndarray:
    """Shares with half an image added to every bin: an empty bin is rare, not impossible."""
    return (p * n + 0.5) / (n + 0.5 * p.shape[-1])


def psi(window: np.ndarray, ref: np.ndarray, n: float, n_ref: float) -> np.ndarray:
    """The PSI of the window's shares (a row, or rows) against the reference's."""
    p, q = smoothed(window, n), smoothed(ref, n_ref)
    return ((p - q) * np.log(p / q)).sum(-1)


@functools.lru_cache(maxsize=4096)
def psi_limit(ref: tuple[float, ...], n: int, n_ref: int, alpha: float) -> float:
    """The (1 - alpha) quantile of the PSI between a window of n images and a reference of n_ref drawn from the
    same bins: simulated (multinomial draws, seeded), as the chi-square approximation's tail is too light for
    windows of a few hundred images (1.6% false alarms for a promised 1% on Fashion-MNIST). Fewer draws for many
    bins (a class mix of hundreds of classes) keep it under a second."""
    q = smoothed(np.asarray(ref), n_ref)
    draws = max(4_000, min(40_000, 2_000_000 // len(q)))
    rng = np.random.default_rng(0)
    window, reference = rng.multinomial(n, q, size=draws) / n, rng.multinomial(n_ref, q, size=draws) / n_ref
    return float(np.quantile(psi(window, reference, n, n_ref), 1 - alpha))


def verdicts(scores: np.ndarray, flagged: np.ndarray) -> list[dict[str, Any]]:
    """Each image's {"score", "flagged"} as JSON has them (no NaN: a score that is not a number is null)."""
    return [{"score": float(s) if np.isfinite(s) else None, "flagged": bool(f)} for s, f in zip(scores, flagged)]


def effective_size(size: int, decay: float) -> float:
    """What a full window of `size` images, each weighing `decay` times the next newer one, weighs as."""
    w = decay ** np.arange(size, dtype=np.float64)
    return float(w.sum() ** 2 / (w ** 2).sum())


@dataclass
class Window:
    """A copy of a monitor's window, newest image first."""

    stats: np.ndarray
    z: np.ndarray
    predicted: np.ndarray
    conf: np.ndarray
    flagged: np.ndarray
    weights: np.ndarray
    seen: int
    flagged_total: int

    @property
    def effective(self) -> float:
        w = self.weights
        return float(w.sum() ** 2 / (w ** 2).sum()) if len(w) else 0.0


class Monitor:
    """The recent images of a stream against `profile`; `observe` adds a batch and scores its images, `signals`
    and `status` judge the window. Thread-safe."""

    def __init__(self, profile: Profile, classes: list[str], size: int = WINDOW, decay: float = DECAY,
                 min_images: int = MIN_IMAGES, false_alarm: float = FALSE_ALARM, score: str | None = None):
        if size < 2 or not 0 < decay <= 1 or min_images < 2 or not 0 < false_alarm < 1:
            raise ConfigError(f"a monitor window needs size >= 2 (got {size}), decay in (0, 1] (got {decay:g}), "
                              f"min_images >= 2 (got {min_images}) and false_alarm in (0, 1) (got {false_alarm:g})")
        if effective_size(size, decay) < min_images:
            raise ConfigError(f"a window of {size} images decaying by {decay:g} weighs as {effective_size(size, decay):.0f}"
                              f" images at most, under the {min_images} an alarm needs: a larger window or less decay")
        if len(profile.class_mix) != len(classes):
            raise ConfigError(f"the profile knows {len(profile.class_mix)} classes, the model {len(classes)}")
        self.profile, self.classes, self.score = profile, classes, score or profile.ood["score"]
        self.size, self.decay, self.min_images, self.false_alarm = size, decay, min_images, false_alarm
        dims = len(profile.components)
        self._stats, self._z = np.zeros((size, len(STATS))), np.zeros((size, dims))
        self._predicted, self._conf = np.zeros(size, dtype=np.int64), np.zeros(size)
        self._flagged = np.zeros(size, dtype=bool)
        self.seen = self.flagged = 0
        self._alarms: set[str] = set()
        self._lock = threading.Lock()

    def observe(self, stats: np.ndarray, logits: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
        """Add images (their `STATS` rows and logits, in arrival order); each one's {"score", "flagged"}. An image
        the model answered with a non-finite logit is flagged (score None) and kept out of the window."""
        logits = np.asarray(logits.float() if isinstance(logits, torch.Tensor) else logits, dtype=np.float64)
        stats = np.asarray(stats, dtype=np.float64).reshape(len(logits), len(STATS))
        scores, flagged = self.profile.judge(logits, self.score)
        finite = np.isfinite(scores) & np.isfinite(stats).all(1)
        kept, logits, stats = np.flatnonzero(finite), logits[finite], stats[finite]
        z, conf = self.profile.features(logits), torch.from_numpy(logits).softmax(-1).max(-1).values.numpy()
        with self._lock:
            for i, k in enumerate(kept):
                slot = self.seen % self.size
                self._stats[slot], self._z[slot], self._predicted[slot] = stats[i], z[i], logits[i].argmax()
                self._conf[slot], self._flagged[slot] = conf[i], flagged[k]
                self.seen += 1
            self.flagged += int(flagged.sum())
        return verdicts(scores, flagged)

    def _snapshot(self) -> Window:
        """The window's images, newest first, with their weights: one consistent copy."""
        with self._lock:
            n = min(self.seen, self.size)
            slots = ((self.seen - 1) % self.size - np.arange(n)) % self.size
            return Window(self._stats[slots], self._z[slots], self._predicted[slots], self._conf[slots],
                          self._flagged[slots], self.decay ** np.arange(n, dtype=np.float64), self.seen, self.flagged)

    def signals(self, window: Window | None = None) -> list[Signal]:
        """Each signal of the window against the profile; an alarm needs `min_images` (effective) in it."""
        win = window or self._snapshot()
        if not len(win.weights):
            return []
        stats, z, predicted, conf, flagged, w = win.stats, win.z, win.predicted, win.conf, win.flagged, win.weights
        n, big_n, p = win.effective, self.profile.images, self.profile
        alpha = self.false_alarm / len(SIGNALS)
        noise = 1 / n + 1 / big_n
        out = []
        for i, name in enumerate(STATS):
            edges, ref = p.stats[name]["edges"], np.array(p.stats[name]["ref"])
            out.append((name, float(psi(shares(stats[:, i], edges, w), ref, n, big_n)),
                        psi_limit(tuple(ref), max(1, round(n)), big_n, alpha)))
        mean = (w[:, None] * z).sum(0) / w.sum()
        out.append(("features", float(np.sqrt(mean @ p.total @ mean)),
                    float(np.sqrt(st.chi2.ppf(1 - alpha, len(mean)) * noise))))
        mix = np.bincount(predicted, weights=w, minlength=len(self.classes)) / w.sum()
        out.append(("classes", float(psi(mix, p.class_mix, n, big_n)),
                    psi_limit(tuple(p.class_mix), max(1, round(n)), big_n, alpha)))
        c = p.confidence
        out.append(("confidence", float((w * conf).sum() / w.sum() - c["mean"]),
                    st.norm.ppf(1 - alpha / 2) * c["std"] * np.sqrt(noise)))
        rate = p.ood["rate"]
        trials = max(1, round(1 / noise))  # the binomial's count, widened by the reference's own noise
        out.append(("ood_rate", float((w * flagged).sum() / w.sum()), st.binom.ppf(1 - alpha, trials, rate) / trials))
        judged = n >= self.min_images
        return [Signal(name, float(v), float(t), bool(judged and (abs(v) if name == "confidence" else v) > t))
                for name, v, t in out]

    def changes(self) -> list[tuple[Signal, bool]]:
        """The signals whose alarm was raised (True) or cleared (False) since the last call."""
        signals = self.signals()
        now = {s.name for s in signals if s.alarm}
        with self._lock:
            changed = [(s, s.name in now) for s in signals if (s.name in now) != (s.name in self._alarms)]
            self._alarms = now
        return changed

    def distributions(self, window: Window | None = None) -> dict[str, Any]:
        """The window's shares of each statistic's bins, beside the profile's (what the page and report draw)."""
        win = window or self._snapshot()
        w, some = win.weights, len(win.weights) > 0
        p, out = self.profile, {}
        for i, name in enumerate(STATS):
            edges = p.stats[name]["edges"]
            out[name] = {"edges": edges, "profile": p.stats[name]["ref"],
                         "window": shares(win.stats[:, i], edges, w).tolist() if some else []}
        out["confidence"] = {"edges": p.confidence["edges"], "profile": p.confidence["ref"],
                             "window": shares(win.conf, p.confidence["edges"], w).tolist() if some else []}
        mix = np.bincount(win.predicted, weights=w, minlength=len(self.classes)) / max(w.sum(), 1e-12)
        out["classes"] = {"names": self.classes, "profile": p.class_mix.tolist(), "window": mix.tolist() if some else []}
        return out

    def status(self) -> dict[str, Any]:
        """The window against the profile, as /v1/monitor answers it."""
        win = self._snapshot()
        signals = self.signals(win)
        return {"images_seen": win.seen, "ood_flagged": win.flagged_total,
                "window": {"size": self.size, "decay": self.decay, "images": len(win.weights),
                           "effective": win.effective, "min_images": self.min_images,
                           "false_alarm": self.false_alarm},
                "ood": {"score": self.score, "threshold": self.profile.ood[self.score]["threshold"],
                        "rate": self.profile.ood["rate"]},
                "alarms": [s.describe() for s in signals if s.alarm],
                "signals": [asdict(s) for s in signals], "distributions": self.distributions(win)}
