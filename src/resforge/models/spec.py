"""The options a network is built from: one dataclass, whose fields carry their help, range and choices.

Everything that names a model option reads it from here: the constructors check their keywords
against it, `model.spec()` records it in the sidecar, `ModelConfig` (training's `model` section and
its flags) extends it, and `resforge info` generates its flags from it. The class count and input
channels are not options: the data sets them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..options import add_flags, convert, option

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "selu": lambda: nn.SELU(inplace=True),
    "prelu": lambda: nn.PReLU(),
    "silu": lambda: nn.SiLU(inplace=True),
    "gelu": lambda: nn.GELU(),
}
NORMS = ("batchnorm", "groupnorm")
VARIANTS = ("v1.5", "v1", "d")
INITS = ("he", "xavier")


@dataclass
class ModelSpec:
    """A network's options. `init=True` marks the two that only set the starting weights, so a saved
    network does not fix them."""

    variant: str | None = option(None, "v1.5: stride on the 3x3; v1: on the first 1x1 (paper, Keras); d: deep stem + "
                                       "avg-pool shortcut (default: v1.5, or what the pretrained weights are)",
                                 choices=VARIANTS)
    small_input: bool = option(False, "3x3 stride-1 stem without max-pool (for images of 64 px or less)")
    width: float = option(1.0, "channel width multiplier", gt=0)
    act: str = option("relu", "activation", choices=tuple(ACTIVATIONS))
    norm: str = option("batchnorm", "normalisation", choices=NORMS)
    se: bool = option(False, "squeeze-and-excitation in every block")
    drop_rate: float = option(0.0, "dropout before the classifier", ge=0, lt=1)
    drop_path_rate: float = option(0.0, "stochastic depth: drop rate of the last block (grows linearly)", ge=0, lt=1)
    zero_init_residual: bool = option(True, "start each residual branch at zero (last BN gamma = 0)", init=True)
    init: str = option("he", "conv weight init", flag="weight_init", choices=INITS, init=True)


OPTIONS = tuple(f.name for f in dataclasses.fields(ModelSpec))
# The options a saved network fixes: a run that starts from it cannot change them.
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(ModelSpec) if not f.metadata.get("init"))
CHOICES = {f.name: f.metadata["choices"] for f in dataclasses.fields(ModelSpec) if "choices" in f.metadata}


def checked(**options: Any) -> ModelSpec:
    """The spec of these keywords, each converted to its field's type and checked against its range and
    choices (a ConfigError names the option); an unknown keyword is a TypeError, as for any function."""
    spec = ModelSpec(**options)
    hints = typing.get_type_hints(ModelSpec)
    for f in dataclasses.fields(spec):
        value = convert(f.name, hints[f.name], getattr(spec, f.name), f.metadata, f.metadata.get("choices"))
        setattr(spec, f.name, value)
    return spec


def given_options(source: Any) -> dict[str, Any]:
    """The options `source` (a config section, parsed flags) sets: present and not None, so a builder's own
    defaults (and a checkpoint's variant) stand for the rest."""
    return {name: getattr(source, name) for name in OPTIONS if getattr(source, name, None) is not None}


def add_model_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """A flag per option (`--width`, `--act`, ...), in `parser` or one of its groups; one not given is absent
    from the parsed arguments."""
    add_flags(parser, ModelSpec, choices=CHOICES, show_default=True)
