"""The one timing loop, on a clock that moves only while the timed function runs."""

import pytest

from resforge import timing


class Calls:
    """A function whose n-th call takes durations[n] seconds of the fake clock."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def clock(self):
        return self.now

    def __call__(self):
        self.now += self.durations[self.calls]
        self.calls += 1


def test_each_call_is_timed_alone_until_the_duration_has_passed(monkeypatch):
    fn = Calls([5.0, 0.25, 0.125, 0.5, 0.25, 9.0])
    monkeypatch.setattr(timing, "clock", fn.clock)
    # the first call is a warm-up, untimed; then 0.25 + 0.125 + 0.5 + 0.25, the first total past 1 s
    assert timing.timed_calls(fn, 1.0, warmup=1) == [0.25, 0.125, 0.5, 0.25]
    assert fn.calls == 5


def test_at_least_min_calls_and_at_most_max_calls(monkeypatch):
    fn = Calls([3.0] * 4 + [0.001] * 100)
    monkeypatch.setattr(timing, "clock", fn.clock)
    assert timing.timed_calls(fn, 1.0, min_calls=4) == [3.0] * 4  # past the duration, but the calls asked for
    assert timing.timed_calls(fn, 1.0, max_calls=10) == pytest.approx([0.001] * 10)


def test_per_second_counts_items_over_the_time_taken():
    assert timing.per_second(4, [0.5, 1.0, 0.5]) == 12 / 2.0
