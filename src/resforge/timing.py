"""Timing repeated calls: the one loop that bench, the automatic backend choice, quantisation's choice of
activation type, compression's latency targets and the trainer's pace measure with.

A call's figure is its own duration (`clock` before and after), so the loop's bookkeeping is not counted;
tests replace `clock` with a fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

clock: Callable[[], float] = time.perf_counter


def timed_calls(fn: Callable[[], Any], seconds: float, min_calls: int = 3, max_calls: int | None = None,
                warmup: int = 0) -> list[float]:
    """Seconds taken by each of repeated calls of `fn`, after `warmup` untimed ones: at least `min_calls`,
    then until `seconds` have passed (and at most `max_calls`)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = clock()
    while len(times) < min_calls or (clock() - start < seconds and len(times) < (max_calls or 1 << 30)):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times


def per_second(items: int, times: list[float]) -> float:
    """Items per second of calls that each handled `items`."""
    return items * len(times) / sum(times)
