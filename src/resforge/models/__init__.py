"""The ResNet family (and a MobileNetV3 student), their one spec, registry, weight import, record and summaries."""

from .registry import create_model, describe_model, list_models, register_model
from .resnet import ResNet
from .spec import ModelSpec
from .summary import ModelSummary, summarize
from .weights import load_into, load_model, read_checkpoint, save_model

__all__ = ["ResNet", "ModelSpec", "ModelSummary", "create_model", "describe_model", "list_models", "load_into",
           "load_model", "read_checkpoint", "register_model", "save_model", "summarize"]
