"""The profile and the drift window: thresholds that hold their false-alarm rate, alarms that name the signal."""

import json

import numpy as np
import pytest

from resforge.errors import CheckpointError, ConfigError
from resforge.runtime.drift import FALSE_ALARM, Monitor
from resforge.runtime.profile import STATS, Profile, build_profile, image_stats

CLASSES = [str(c) for c in range(6)]


def draw(rng, n, brightness=0.4, confident=3.0):
    """Images of a made-up stream: their statistics and logits (a class each, its logit raised by `confident`)."""
    y = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(0, 1, (n, len(CLASSES)))
    logits[np.arange(n), y] += confident
    stats = np.c_[rng.normal(brightness, 0.05, n), rng.normal(0.2, 0.03, n), rng.gamma(2, 0.05, n),
                  rng.normal(0.5, 0.1, n), np.full(n, np.log2(32 * 32)), np.zeros(n)]
    return stats, logits


@pytest.fixture(scope="module")
def profile():
    return build_profile(*draw(np.random.default_rng(0), 1000))


def test_unchanged_windows_raise_alarms_at_most_at_the_stated_rate(profile):
    rng = np.random.default_rng(1)
    alarms = 0
    for _ in range(400):
        monitor = Monitor(profile, CLASSES, size=200)
        monitor.observe(*draw(rng, 200))
        alarms += any(s.alarm for s in monitor.signals())
    # 1% stated; 400 windows: a rate of 2.5% or more would be 4 standard errors off
    assert alarms / 400 < 2.5 * FALSE_ALARM


def test_a_shift_raises_the_alarm_of_the_signal_that_moved_and_no_other(profile):
    rng = np.random.default_rng(2)
    darker = Monitor(profile, CLASSES)
    darker.observe(*draw(rng, 200, brightness=0.3))
    assert [s.name for s in darker.signals() if s.alarm] == ["brightness"]
    assert "brightness moved: PSI" in darker.status()["alarms"][0]
    unsure = Monitor(profile, CLASSES)
    unsure.observe(*draw(rng, 200, confident=1.0))
    moved = {s.name for s in unsure.signals() if s.alarm}
    assert "confidence" in moved and not moved & set(STATS)


def test_the_window_forgets_what_slid_out_of_it_and_decay_weighs_the_newest_more(profile):
    rng = np.random.default_rng(3)
    monitor = Monitor(profile, CLASSES, size=100)
    monitor.observe(*draw(rng, 100, brightness=0.2))
    assert "brightness" in {s.name for s in monitor.signals() if s.alarm}
    monitor.observe(*draw(rng, 100))
    assert not any(s.alarm for s in monitor.signals())
    assert monitor.seen == 200 and monitor.status()["window"]["images"] == 100
    dark, bright = draw(rng, 150, brightness=0.2), draw(rng, 50)
    for decay, alarm in ((1.0, True), (0.95, False)):  # decayed, the dark images are old: they weigh little
        monitor = Monitor(profile, CLASSES, size=200, decay=decay)
        monitor.observe(*dark)
        monitor.observe(*bright)
        assert ("brightness" in {s.name for s in monitor.signals() if s.alarm}) == alarm
    assert 30 < monitor.status()["window"]["effective"] < 50


def test_too_few_images_are_judged_but_raise_no_alarm(profile):
    monitor = Monitor(profile, CLASSES, min_images=30)
    monitor.observe(*draw(np.random.default_rng(4), 10, brightness=0.1))
    signals = {s.name: s for s in monitor.signals()}
    assert signals["brightness"].value > signals["brightness"].threshold and not signals["brightness"].alarm


def test_scores_flag_the_stated_share_of_the_reference_and_more_of_strange_images(profile):
    stats, logits = draw(np.random.default_rng(5), 2000)
    for score in ("energy", "mahalanobis"):
        rate = profile.flagged(profile.scores(logits, score), score).mean()
        assert 0.03 < rate < 0.07
        strange = np.random.default_rng(6).normal(-3, 1, (500, len(CLASSES)))  # no class is near
        assert profile.flagged(profile.scores(strange, score), score).mean() > 0.5


def test_the_profile_survives_json_exactly_and_refuses_a_newer_version(profile):
    back = Profile.from_dict(json.loads(json.dumps(profile.to_dict())), "x")
    _, logits = draw(np.random.default_rng(7), 50)
    np.testing.assert_array_equal(back.scores(logits), profile.scores(logits))
    assert len(json.dumps(profile.to_dict())) < 16_000  # kilobytes, not a copy of the data
    with pytest.raises(CheckpointError, match="version 9"):
        Profile.from_dict({**profile.to_dict(), "version": 9}, "x")
    with pytest.raises(CheckpointError, match="incomplete"):
        Profile.from_dict({k: v for k, v in profile.to_dict().items() if k != "within"}, "x")
    with pytest.raises(ConfigError, match="at least 20"):
        build_profile(*draw(np.random.default_rng(8), 10))


def test_image_statistics_read_what_they_say():
    import torch

    gray = torch.full((1, 40, 80), 128, dtype=torch.uint8)
    s = dict(zip(STATS, image_stats(gray)))
    assert s["brightness"] == pytest.approx(128 / 255) and s["contrast"] == 0 and s["colourfulness"] == 0
    assert s["sharpness"] == 0 and s["pixels"] == pytest.approx(np.log2(3200)) and s["aspect"] == pytest.approx(1)
    red = torch.zeros((3, 30, 30), dtype=torch.uint8)
    red[0] = 255
    assert dict(zip(STATS, image_stats(red)))["colourfulness"] > 0.3
    edges = torch.zeros((1, 30, 30), dtype=torch.uint8)
    edges[:, :, ::2] = 255
    assert dict(zip(STATS, image_stats(edges)))["sharpness"] > 1


def test_a_window_too_light_to_ever_alarm_is_refused(profile):
    with pytest.raises(ConfigError, match="weighs as 19 images at most"):
        Monitor(profile, CLASSES, size=200, decay=0.9)
    with pytest.raises(ConfigError, match="under the 30"):
        Monitor(profile, CLASSES, size=20)


def test_an_image_with_non_finite_logits_is_flagged_and_kept_out_of_the_window(profile):
    stats, logits = draw(np.random.default_rng(9), 40)
    logits[3, 2], stats[5, 0] = np.inf, np.nan
    monitor = Monitor(profile, CLASSES)
    verdicts = monitor.observe(stats, logits)
    assert verdicts[3] == {"score": None, "flagged": True} and verdicts[5]["score"] is not None
    status = monitor.status()
    assert status["window"]["images"] == 38 and status["ood_flagged"] >= 1
    json.dumps(status, allow_nan=False)  # what the server answers: no NaN anywhere
