"""The structure of a low-rank factorised layer, so a factorised network rebuilds from its record.

A linear layer or 1x1 convolution of rank r becomes two (in -> r -> out); a kxk convolution of
ranks (r_in, r_out) becomes Tucker-2's three (1x1 in -> r_in, kxk r_in -> r_out, 1x1 r_out -> out).
The factors come from `compress.lowrank`; here is only their shape, and the module that holds them
keeps the attribute name of the layer it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import CheckpointError
from .layers import parent_of, replace_layer


class LowRankConv(nn.Sequential):
    """A convolution as a product of smaller ones; reads like the convolution it replaces."""

    def __init__(self, conv: nn.Conv2d, ranks: Sequence[int]):
        k, s, p = conv.kernel_size, conv.stride, conv.padding
        bias = conv.bias is not None
        if len(ranks) == 1:
            (r,) = ranks
            layers = [nn.Conv2d(conv.in_channels, r, k, s, p, bias=False),
                      nn.Conv2d(r, conv.out_channels, 1, bias=bias)]
        else:
            r_in, r_out = ranks
            layers = [nn.Conv2d(conv.in_channels, r_in, 1, bias=False), nn.Conv2d(r_in, r_out, k, s, p, bias=False),
                      nn.Conv2d(r_out, conv.out_channels, 1, bias=bias)]
        super().__init__(*layers)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.ranks = list(ranks)


class LowRankLinear(nn.Sequential):
    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__(nn.Linear(linear.in_features, rank, bias=False),
                         nn.Linear(rank, linear.out_features, bias=linear.bias is not None))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.ranks = [rank]


def factorized(module: nn.Module, ranks: Sequence[int]) -> nn.Module:
    """The low-rank module of `ranks` shaped to replace `module` (freshly initialised)."""
    if isinstance(module, nn.Linear) and len(ranks) == 1:
        return LowRankLinear(module, ranks[0])
    if isinstance(module, nn.Conv2d) and module.groups == 1 and (len(ranks) == 1) == (module.kernel_size == (1, 1)):
        return LowRankConv(module, ranks)
    raise CheckpointError(f"ranks {list(ranks)} do not fit a {type(module).__name__}")


def apply_ranks(model: nn.Module, ranks: dict[str, Sequence[int]]) -> None:
    """Replace each named layer by its factorised form, as `compress.lowrank` left it."""
    for name, r in ranks.items():
        parent, attr = parent_of(model, name)
        replace_layer(model, name, factorized(getattr(parent, attr), r))
