"""A layer by its dotted name (`layer3.0.conv2`), as state_dict keys and transform records name it."""

from __future__ import annotations

from torch import nn

from ..errors import CheckpointError


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding layer `name`, and its attribute there; CheckpointError where `model` has no such
    layer (a record that does not fit the network)."""
    parent, _, attr = name.rpartition(".")
    try:
        holder = model.get_submodule(parent) if parent else model
        getattr(holder, attr)
    except AttributeError:
        raise CheckpointError(f"the transform record names {name}, which this network does not have") from None
    return holder, attr


def replace_layer(model: nn.Module, name: str, new: nn.Module) -> None:
    setattr(*parent_of(model, name), new)
