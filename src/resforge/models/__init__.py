"""The ResNet family, its registry, weight import and summaries."""

from .registry import create_model, describe_model, list_models, register_model
from .resnet import ResNet
from .summary import ModelSummary, summarize
from .weights import load_into, load_model, read_checkpoint, save_model

__all__ = ["ResNet", "ModelSummary", "create_model", "describe_model", "list_models", "load_into",
           "load_model", "read_checkpoint", "register_model", "save_model", "summarize"]
