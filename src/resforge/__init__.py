"""resforge: a folder of images in, a fast, small, well-measured ResNet classifier out.

    import resforge
    run = resforge.train("data/birds", model="resnet50", recipe="finetune", pretrained="r50.pth")
    resforge.predict(run["run_dir"], ["photo.jpg"])
"""

from typing import Any

from .errors import CheckpointError, ConfigError, DataError, ResforgeError, TrainingError
from .models import ResNet, create_model, list_models, load_model, summarize

__version__ = "0.1.0"

# The stage functions load on first use, so `import resforge` stays light (no matplotlib, no data code).
_API = ("info", "train", "prune", "lowrank", "quantize", "optimize", "evaluate", "predict", "lr_find", "inspect_data",
        "export", "bench", "serve", "ensemble", "tune", "Predictor")


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "import_dataset":
        from .data.sources import import_dataset

        return import_dataset
    raise AttributeError(f"module 'resforge' has no attribute {name!r}")


__all__ = ["CheckpointError", "ConfigError", "DataError", "ResNet", "ResforgeError", "TrainingError", "create_model",
           "import_dataset", "list_models", "load_model", "summarize", *_API]
