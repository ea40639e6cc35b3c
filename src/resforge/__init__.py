"""resforge: a folder of images in, a fast, small, well-measured ResNet classifier out."""

from .errors import CheckpointError, ConfigError, DataError, ResforgeError
from .models import ResNet, create_model, list_models, summarize

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "ResNet", "ResforgeError", "create_model",
           "list_models", "summarize"]
