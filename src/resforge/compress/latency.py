"""Latency targets: the least compression of a model that runs within a time measured on this machine.

A method offers its settings ordered from the least change to the most (pruning steps, falling
low-rank energies); the search times a changed copy of the model at a few of them, by bisection,
so a target costs about log2(settings) + 2 timings. The timer runs the model on onnxruntime at batch 1
and the run's input size with the timing loop `bench` uses (`runtime.measure.batch_times`): warm-up
calls, then the median of a second of calls, as `bench` reports its p50.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from ..errors import ConfigError
from ..models.weights import arch_record, build_from_arch

LATENCY_SECONDS = 1.0  # of timed batch-1 calls per candidate
WARMUP_CALLS = 3  # as bench's default: kernels chosen and memory allocated before the timed calls
Setting = TypeVar("Setting")


def least_change_within(model: nn.Module, target_ms: float, timer: Callable[[nn.Module], float],
                        settings: Sequence[Setting], change: Callable[[nn.Module, Setting], Any], limit: str
                        ) -> tuple[Setting, list[float]]:
    """The first of `settings` whose `change` to a copy of `model` runs within `target_ms` by `timer`, with the
    times of `model` and of that copy; `model` is left as it is. `limit` says what bounds the last setting,
    for the error when even it is too slow."""
    def changed_time(setting: Setting) -> float:
        trial = copy.deepcopy(model)
        change(trial, setting)
        return timer(trial)

    base = timer(model)
    if base <= target_ms:
        raise ConfigError(f"the model already runs in {base:.2f} ms at batch 1 here, within the {target_ms:g} ms "
                          "asked: nothing to compress for it")
    fastest = changed_time(settings[-1])
    if fastest > target_ms:
        raise ConfigError(f"the most this method does reached {fastest:.2f} ms at batch 1 here, not the "
                          f"{target_ms:g} ms asked (from {base:.2f} ms; {limit}): ask for more time")
    low, high, best = -1, len(settings) - 1, fastest  # settings[low] misses the target, settings[high] meets it
    while high - low > 1:
        mid = (low + high) // 2
        t = changed_time(settings[mid])
        if t <= target_ms:
            high, best = mid, t
        else:
            low = mid
    return settings[high], [base, best]


def onnxruntime_latency(classes: list[str], pre: Any) -> Callable[[nn.Module], float]:
    """Median batch-1 milliseconds of a network exported to ONNX and run by onnxruntime (as `bench` times it)."""
    import onnx

    from ..runtime.convert import to_onnx
    from ..runtime.measure import batch_times
    from ..runtime.predictor import Predictor
    from ..runtime.record import ModelInfo

    def timer(net: nn.Module) -> float:
        clean = build_from_arch(arch_record(net), "the compressed network")  # without the trainer's hooks
        clean.load_state_dict(net.state_dict())
        with tempfile.TemporaryDirectory(prefix="resforge-latency-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save(to_onnx(clean.cpu().eval(), ModelInfo(classes=classes, pre=pre), dynamic_batch=False), str(path))
            predictor = Predictor.load(path, "onnxruntime")
            times = batch_times(predictor, predictor.info, 1, LATENCY_SECONDS, warmup=WARMUP_CALLS)
        return 1000 * statistics.median(times)
    return timer
