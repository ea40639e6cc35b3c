"""The compression commands that fine-tune: a trained model changed (pruned, made sparse, factorised, or
prepared for quantisation-aware training), then trained and finished like any run (`training.run`).
`api` and `optimize` call these directly."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ..config import ConfigSource, TrainConfig
from ..models.transforms import describe
from ..options import option
from ..training.run import complete
from ..training.trainer import Callback
from .finetune import compression_run
from .lowrank import ENERGY
from .lowrank import check_target as check_lowrank_target
from .lowrank import factorization
from .prune import IMPORTANCE, check_target, structured

log = logging.getLogger("resforge")

PRUNE_TARGET = ("the target: one of --ratio, --macs, --latency, or (unstructured) --sparsity with --sparsity-scope "
                "among the train options")
LATENCY_HELP = "milliseconds at batch 1 to reach, measured here on onnxruntime at the run's input size"


@dataclass(kw_only=True)
class CompressionOptions(ConfigSource):
    """What a compression run takes beside its own target: its data and its teacher (the fine-tune's options are
    the training config's)."""
    data: str | None = option(None, "image folder to fine-tune on (default: the one the model was trained on, split "
                                    "as its run recorded)")
    distill: bool = option(True, "fine-tune distilled from the original model as teacher (--no-distill: on the "
                                 "labels alone)")


@dataclass(kw_only=True)
class PruneOptions(CompressionOptions):
    ratio: float | None = option(None, "share of each layer's channels to remove, e.g. 0.3", group=PRUNE_TARGET)
    macs: float | None = option(None, "share of the MACs to keep, e.g. 0.5", group=PRUNE_TARGET)
    latency: float | None = option(None, LATENCY_HELP + " (the channel ratio is searched by bisection)",
                                   metavar="MS", group=PRUNE_TARGET)
    importance: str = option("l1", "which channels go first: l1/l2 weight norm, bn-scale (network slimming; train "
                                   "with --l1-bn), taylor (gradients on a few training batches)", choices=IMPORTANCE)
    round_to: int = option(8, "keep widths a multiple of this")
    # unstructured: the training config's --sparsity and --sparsity-scope
    sparsity: float | None = option(None, "share of the weights zeroed, by magnitude", flag=None)
    scope: str = option(TrainConfig.sparsity_scope, "rank the weights within each layer, or global", flag=None)


@dataclass(kw_only=True)
class LowrankOptions(CompressionOptions):
    energy: float | None = option(None, f"share of each layer's energy kept (default: {ENERGY})",
                                  group="the target: one of --energy or --latency")
    latency: float | None = option(None, LATENCY_HELP + " (the energy is searched by bisection from 0.99 down to "
                                                        "0.5)", metavar="MS",
                                   group="the target: one of --energy or --latency")


def prune(source: str | os.PathLike, o: PruneOptions, *, callbacks: list[Callback] = (), progress: bool = True,
          **options: Any) -> dict[str, Any]:
    """Prune a trained model and fine-tune it, distilled from the original; write a run directory.

    Structured: `ratio` removes that share of every layer's channels, `macs` keeps at most that share
    of the MACs, `latency` the fewest channels that make batch-1 onnxruntime inference at the run's
    input size take at most that many ms here (`importance`, `round_to`). Unstructured: `sparsity`
    zeroes that share of the weights (by magnitude, within each layer or `scope="global"`), growing
    over the fine-tune. `options` are the fine-tune's training options (epochs, time_limit, name, ...).
    """
    check_target(o.ratio, o.macs, o.sparsity, o.latency)
    sparsity, scope = o.sparsity, o.scope
    if sparsity is not None:
        options.update(sparsity=sparsity, sparsity_scope=scope)
        transform = lambda trainer: {"kind": "sparse", "sparsity": sparsity, "scope": scope}  # noqa: E731
    else:
        transform = structured(ratio=o.ratio, macs=o.macs, importance=o.importance, round_to=o.round_to,
                               latency=o.latency)
    trainer, record = compression_run(source, transform, suffix="sparse" if sparsity else "pruned", data=o.data,
                                      distill=o.distill, recipe=o.recipe, config=o.config, callbacks=callbacks,
                                      progress=progress, **options)
    if record["kind"] == "pruned":
        log.info("%s; fine-tuning in %s", describe(record), trainer.run_dir)
    return {**complete(trainer).to_dict(), "pruned": record}


def lowrank(source: str | os.PathLike, o: LowrankOptions, *, callbacks: list[Callback] = (), progress: bool = True,
            **options: Any) -> dict[str, Any]:
    """Factorise a trained model's layers (SVD, Tucker-2) at the rank keeping `energy` of each (none given:
    ENERGY), or at the highest energy whose batch-1 onnxruntime inference takes at most `latency` ms here; then
    fine-tune it distilled from the original and write a run directory (`options` as for `prune`)."""
    check_lowrank_target(o.energy, o.latency)  # before anything is read or written
    energy = ENERGY if o.energy is None and o.latency is None else o.energy
    trainer, record = compression_run(
        source, factorization(energy=energy, latency=o.latency), suffix="lowrank", data=o.data, distill=o.distill,
        recipe=o.recipe, config=o.config, callbacks=callbacks, progress=progress, **options)
    log.info("%s; fine-tuning in %s", describe(record), trainer.run_dir)
    return {**complete(trainer).to_dict(), "lowrank": record}
