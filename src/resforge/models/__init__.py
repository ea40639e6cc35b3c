"""The ResNet family, its registry, weight import and summaries."""

from .registry import create_model, describe_model, list_models, register_model
from .resnet import ResNet
from .summary import ModelSummary, summarize
from .weights import load_into, read_checkpoint

__all__ = ["ResNet", "ModelSummary", "create_model", "describe_model", "list_models", "load_into",
           "read_checkpoint", "register_model", "summarize"]
