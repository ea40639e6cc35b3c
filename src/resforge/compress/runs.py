"""The compression commands that fine-tune: a trained model changed (pruned, made sparse, factorised, or
prepared for quantisation-aware training), then trained and finished like any run (`training.run`).
`api` and `optimize` call these directly."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..training.run import complete
from ..training.trainer import Callback
from .finetune import compression_run
from .lowrank import check_target as check_lowrank_target
from .lowrank import describe as describe_lowrank
from .lowrank import factorization
from .prune import check_target, describe, structured

log = logging.getLogger("resforge")


def prune(source: str | os.PathLike, *, ratio: float | None = None, macs: float | None = None,
          latency: float | None = None, sparsity: float | None = None, importance: str = "l1", round_to: int = 8,
          scope: str = "layer", data: str | os.PathLike | None = None, distill: bool = True,
          recipe: str | None = None, config: str | os.PathLike | None = None, callbacks: list[Callback] = (),
          progress: bool = True, **options: Any) -> dict[str, Any]:
    """Prune a trained model and fine-tune it, distilled from the original; write a run directory.

    Structured: `ratio` removes that share of every layer's channels, `macs` keeps at most that share
    of the MACs, `latency` the fewest channels that make batch-1 onnxruntime inference at the run's
    input size take at most that many ms here (`importance`, `round_to`). Unstructured: `sparsity`
    zeroes that share of the weights (by magnitude, within each layer or `scope="global"`), growing
    over the fine-tune. Options are the fine-tune's training options (epochs, time_limit, name, ...).
    """
    check_target(ratio, macs, sparsity, latency)
    if sparsity is not None:
        options.update(sparsity=sparsity, sparsity_scope=scope)
        transform = lambda trainer: {"kind": "sparse", "sparsity": sparsity, "scope": scope}  # noqa: E731
    else:
        transform = structured(ratio=ratio, macs=macs, importance=importance, round_to=round_to, latency=latency)
    trainer, record = compression_run(source, transform, suffix="sparse" if sparsity else "pruned", data=data,
                                      distill=distill, recipe=recipe, config=config, callbacks=callbacks,
                                      progress=progress, **options)
    if record["kind"] == "pruned":
        log.info("%s; fine-tuning in %s", describe(record), trainer.run_dir)
    return {**complete(trainer).to_dict(), "pruned": record}


def lowrank(source: str | os.PathLike, *, energy: float | None = None, latency: float | None = None,
            data: str | os.PathLike | None = None, distill: bool = True, recipe: str | None = None,
            config: str | os.PathLike | None = None, callbacks: list[Callback] = (), progress: bool = True,
            **options: Any) -> dict[str, Any]:
    """Factorise a trained model's layers (SVD, Tucker-2) at the rank keeping `energy` of each (default 0.9),
    or at the highest energy whose batch-1 onnxruntime inference takes at most `latency` ms here; then
    fine-tune it distilled from the original and write a run directory (options as for `prune`)."""
    check_lowrank_target(energy, latency)  # before anything is read or written
    if energy is None and latency is None:
        energy = 0.9
    trainer, record = compression_run(
        source, factorization(energy=energy, latency=latency), suffix="lowrank", data=data, distill=distill,
        recipe=recipe, config=config, callbacks=callbacks, progress=progress, **options)
    log.info("%s; fine-tuning in %s", describe_lowrank(record), trainer.run_dir)
    return {**complete(trainer).to_dict(), "lowrank": record}
