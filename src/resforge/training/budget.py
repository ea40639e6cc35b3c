"""Fitting a run to a wall-clock budget (`train.time_limit`), step by step.

The budget is the run's whole training time, resumes included: validation and saving count, the
folder scan before the first epoch does not. Every optimiser step re-plans how many more steps fit,
from the pace of the recent steps and the measured cost of an epoch's validation and saving; the lr
decay is refitted to end at that step (`Schedule.resized` keeps its shape), and the epoch in which
the budget runs out is cut there. So an epoch that runs slower than the last moves the end of the
decay closer instead of overrunning the budget with the decay unfinished.
"""

from __future__ import annotations

import math
import time
from collections import deque

clock = time.perf_counter  # tests put a fake clock here

MIN_STEPS = 5  # steps measured before the first plan
WINDOW = 20  # recent steps whose pace predicts the next ones
EVAL_COST = 0.5  # an evaluated batch costs about this share of a training step, until measured


class TimeBudget:
    """How many optimiser steps fit in what is left of `seconds`."""

    def __init__(self, seconds: float, steps_per_epoch: int, val_batches: int):
        self.seconds = seconds
        self.steps_per_epoch = steps_per_epoch
        self.val_batches = val_batches
        self.started = clock()
        self.step_times: deque[float] = deque(maxlen=WINDOW)
        self.epoch_overhead: float | None = None  # validation, saving, logging between two epochs
        self._last: float | None = None

    def elapsed(self) -> float:
        return clock() - self.started

    def epoch_started(self) -> None:
        """The first step of an epoch waits for the loader: it is not a sample of the pace, unless epochs are
        too short to give MIN_STEPS others (a detector's few large batches); then it is timed from the epoch's
        start, the loader's wait included, and the plan errs on the short side."""
        self._last = clock() if self.steps_per_epoch <= MIN_STEPS else None

    def step_done(self) -> None:
        now = clock()
        if self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now

    def end_step(self, step: int, epoch_step: int) -> tuple[int, int] | None:
        """(last step that fits, epochs those steps end in, the current one counted), or None until the
        pace is known. `epoch_step` is how many steps of the current epoch are done."""
        if len(self.step_times) < MIN_STEPS:
            return None
        per_step = sum(self.step_times) / len(self.step_times)
        per_epoch_end = self.epoch_overhead
        if per_epoch_end is None:
            per_epoch_end = self.val_batches * per_step * EVAL_COST
        left = self.seconds - self.elapsed()
        spe = self.steps_per_epoch
        best = (0, 1)
        for ends in range(1, 1_000_000):  # ends: epoch ends still to come, each with its validation
            room = left - ends * per_epoch_end
            if room < 0:
                break
            more = min(ends * spe - epoch_step, math.floor(room / per_step))
            if more > (ends - 1) * spe - epoch_step:  # reaches into the last of those epochs
                best = (more, ends)
            if more < ends * spe - epoch_step:  # time ran out inside this epoch: more ends cannot fit
                break
        return step + best[0], best[1]
