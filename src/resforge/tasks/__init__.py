"""The task seam: what makes a run classification (or, next, detection or segmentation).

The trainer's loop, the launcher, the run directory, resume and the time budget know nothing
task-specific; they call the run's `Task` for how a folder is read, how a batch becomes a loss and
running figures, how a model is validated, and how the finished run is evaluated and reported.
A new task is a `Task` subclass registered in `TASKS`.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Datasets, Task
from .classify import Classification

TASKS: dict[str, type[Task]] = {Classification.name: Classification}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Datasets", "Task", "Classification", "get_task"]
