"""A compression run: a trained model, changed, then fine-tuned like any training run.

Each method (pruning, and the ones to come) is a function that changes the trainer's model in
place and says what it did. Around it this module does what they share: the run starts from the
saved model (`--init`) on the source run's own recorded split, learns from the unchanged model
as its teacher (distillation) unless told otherwise, and writes a run directory as training does,
with the changed model before fine-tuning kept as `start.safetensors` (so the run restarts from it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import AUTO_RECIPE, build_config
from ..errors import ConfigError
from ..models import load_model, save_model
from ..models.weights import resolve_model_path, sidecar_path
from ..training.rundir import new_run_dir
from ..training.trainer import Callback, Trainer

log = logging.getLogger("resforge")

Transform = Callable[[Trainer], dict[str, Any]]


def compression_run(source: str | os.PathLike, transform: Transform, *, suffix: str,
                    data: str | os.PathLike | None = None, distill: bool = True, recipe: str | None = None,
                    config: str | os.PathLike | None = None, callbacks: list[Callback] = (), progress: bool = True,
                    **options: Any) -> tuple[Trainer, dict[str, Any]]:
    """A Trainer whose model is `source` changed by `transform`, ready to fine-tune; and the transform's record.

    `recipe`, `config` and `options` configure the fine-tune as they do training (default: the auto
    recipe, which treats the source's weights as pretrained). The data is the folder the source was
    trained on (or `data`), split as the source run recorded it.
    """
    weights = resolve_model_path(source)
    if weights.suffix != ".safetensors" or not sidecar_path(weights).is_file():
        raise ConfigError(f"{source} holds no resforge spec: compression starts from a run directory or a "
                          ".safetensors with its .json sidecar, which record the architecture it changes (an "
                          "exported or foreign file does not)")
    _, meta = load_model(weights)
    run = weights.parent if (weights.parent / "split.csv").is_file() and weights.name == "best.safetensors" else None
    root = data or (meta.get("trained") or {}).get("data")
    if not root:
        raise ConfigError(f"{source} does not record the folder it was trained on: give --data")
    split = run / "split.csv" if run is not None and data is None else None
    name = options.pop("name", None) or f"{run.name if run else weights.stem}-{suffix}"
    overrides = {"data.root": str(root), "model.init_from": str(weights), "train.name": name, **options}
    if distill and meta.get("task", "classify") == "classify":
        overrides.setdefault("train.teacher", str(weights))
    elif distill:
        log.info("the fine-tune learns from the labels alone: distillation from the original model is for "
                 "classifiers")
    cfg = build_config(recipe or AUTO_RECIPE, config, overrides)
    train = cfg.train
    _check_output(Path(train.project) / train.name, run or weights.parent, run is not None, train.exist_ok)
    run_dir, created = new_run_dir(cfg)
    try:
        trainer = Trainer(cfg, run_dir=run_dir, callbacks=callbacks, progress=progress, split_csv=split)
        record = transform(trainer)
        start = run_dir / "start.safetensors"
        save_model(trainer.model, start, {"task": trainer.task.name, "classes": trainer.classes,
                                          "preprocess": trainer.pre.to_dict(), **trainer.task.record(cfg),
                                          "trained": {"from": str(weights), **{k: v for k, v in record.items()
                                                                              if k != "kind"}}})
        cfg.model.init_from = str(start)  # config.yaml names the model the fine-tune starts from
        trainer.model_changed()
    except BaseException:
        if created:  # an existing folder (--exist-ok) is not this command's to remove
            with contextlib.suppress(OSError):
                shutil.rmtree(run_dir)
        raise
    return trainer, record


def _check_output(out: Path, home: Path, is_run: bool, exist_ok: bool) -> None:
    """Never into or over the source: its run folder (or the folder of a loose model file) reused with
    --exist-ok, or a folder inside its run. A failed run would remove it; a finished one replace its files.
    (Without --exist-ok a taken name is numbered, never the source itself.)"""
    out, home = out.resolve(), home.resolve()
    if (out == home and exist_ok) or (is_run and out != home and out.is_relative_to(home)):
        where = "is" if out == home else "is inside"
        raise ConfigError(f"the output folder {out} {where} the {'run' if is_run else 'folder'} of the model it "
                          "starts from: give another --name or --project")
