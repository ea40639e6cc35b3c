"""The task seam: what makes a run classification, detection or semantic segmentation.

The trainer's loop, the launcher, the run directory, resume and the time budget know nothing
task-specific; they call the run's `Task` for how a folder is read, how a batch becomes a loss and
running figures, how a model is validated, and how the finished run is evaluated and reported.
A new task is a `Task` subclass registered in `TASKS`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..config import Config
from ..data.annotations import recognize
from ..data.masks import recognize_masks
from ..errors import CheckpointError, ConfigError
from ..models.weights import resolve_model_path, sidecar_path
from ..runtime.source import open_source
from .base import Datasets, Task
from .classify import Classification
from .detect import Detection
from .segment import Segmentation

log = logging.getLogger("resforge")

TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, Detection, Segmentation)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]()


def recognize_task(root: str) -> tuple[str, str]:
    """The task a folder is for, and why: detection when it holds box annotations (a Pascal VOC folder with both
    boxes and class masks too), segmentation when it holds images beside masks, else classification."""
    fmt, reason = recognize(root)
    if fmt is not None:
        return Detection.name, reason
    if masks := recognize_masks(root):
        return Segmentation.name, masks
    return Classification.name, "no box annotations (COCO JSON, VOC XML or YOLO labels) nor masks: class folders"


def task_for(cfg: Config) -> Task:
    """The run's task: `data.task`, or, when auto, the one its folder is for (set in `cfg`, so the run's
    config.yaml keeps it and a resume needs no second look)."""
    if cfg.data.task == "auto":
        cfg.data.task, reason = recognize_task(cfg.data.root)
        log.info("task %s: %s (--task overrides)", cfg.data.task, reason)
    return get_task(cfg.data.task)


def recorded_task(source: str | os.PathLike) -> str:
    """The task a saved or exported model was trained for, from its record ("classify" for records from before
    tasks, and for files without one)."""
    path = Path(source)
    if path.suffix.lower() in (".onnx", ".xml") and path.is_file():
        try:
            return open_source(path).info.task
        except (CheckpointError, ConfigError):
            return Classification.name  # loading the model names what is wrong with it
    if not (path.is_dir() or path.suffix in (".safetensors", ".json")):
        return Classification.name
    side = sidecar_path(resolve_model_path(path))
    try:
        task = json.loads(side.read_text()).get("task", Classification.name)
    except (OSError, ValueError, AttributeError):
        return Classification.name  # loading the model names what is wrong with its sidecar
    return task if task in TASKS else Classification.name


__all__ = ["TASKS", "Datasets", "Task", "Classification", "Detection", "Segmentation", "get_task", "recognize_task",
           "recorded_task", "task_for"]
