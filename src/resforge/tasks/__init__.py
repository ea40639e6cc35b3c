"""The task seam: what makes a run classification or detection (or, next, segmentation).

The trainer's loop, the launcher, the run directory, resume and the time budget know nothing
task-specific; they call the run's `Task` for how a folder is read, how a batch becomes a loss and
running figures, how a model is validated, and how the finished run is evaluated and reported.
A new task is a `Task` subclass registered in `TASKS`.
"""

from __future__ import annotations

import logging

from ..config import Config
from ..data.annotations import recognize
from ..errors import ConfigError
from .base import Datasets, Task
from .classify import Classification
from .detect import Detection

log = logging.getLogger("resforge")

TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, Detection)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]()


def recognize_task(root: str) -> tuple[str, str]:
    """The task a folder is for, and why: detection when it holds box annotations, else classification."""
    fmt, reason = recognize(root)
    if fmt is not None:
        return Detection.name, reason
    return Classification.name, "no box annotations (COCO JSON, VOC XML or YOLO labels): class folders"


def task_for(cfg: Config) -> Task:
    """The run's task: `data.task`, or, when auto, the one its folder is for (set in `cfg`, so the run's
    config.yaml keeps it and a resume needs no second look)."""
    if cfg.data.task == "auto":
        cfg.data.task, reason = recognize_task(cfg.data.root)
        log.info("task %s: %s (--task overrides)", cfg.data.task, reason)
    return get_task(cfg.data.task)


__all__ = ["TASKS", "Datasets", "Task", "Classification", "Detection", "get_task", "recognize_task", "task_for"]
