"""What may be done to a network after it is built, each registered once with what it rebuilds,
requires and forbids.

A transformed network is recorded as its spec plus the list of transforms applied since
(`model.transforms`, records `{"kind": ..., ...}` in order), which its sidecar keeps: a pruned network
is one of other widths and a sparse one has zeros in its weights (the spec rebuilds both); a
low-rank one has layers replaced by their factors (`models.lowrank`, from the record's ranks); a
network trained for int8 has its batch norms folded ("fused") and rounds weights and activations
("fakequant", `models.quantized`). The methods that change a network (`compress`, training's
sparsity) record themselves here, and every "was this model already ...?" is asked here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import CheckpointError, ConfigError
from .lowrank import apply_ranks
from .quantized import apply_fake_quant, apply_fused

Record = dict[str, Any]


@dataclass(frozen=True)
class Transform:
    kind: str
    done: str  # what a network is once changed so: "this model was <done>"
    then: str = ""  # how a user asks for it: "prune the run it came from, then <then>"
    again: str = ""  # what to do instead of applying it twice (for those that forbid themselves)
    forbids: tuple[str, ...] = ()  # kinds it cannot follow
    requires: tuple[str, ...] = ()  # kinds it must follow
    rebuild: Callable[[nn.Module, Record], None] | None = None  # its structure on a fresh network (None: the spec's)
    summary: Callable[[Record], str] | None = None  # the start of `describe` for a method that reports MACs


TRANSFORMS: dict[str, Transform] = {}


def register(transform: Transform) -> Transform:
    TRANSFORMS[transform.kind] = transform
    return transform


register(Transform("pruned", "pruned", "prune", forbids=("lowrank", "fakequant"),
                   summary=lambda r: f"pruned by {r['importance']}"))
register(Transform("sparse", "made sparse"))
register(Transform("lowrank", "factorised (low-rank)", "factorise", "factorise the run it came from",
                   forbids=("lowrank", "fakequant"), rebuild=lambda m, r: apply_ranks(m, r.get("ranks") or {}),
                   summary=lambda r: f"factorised {len(r['ranks'])} layers at energy {r['energy']:g}"))
register(Transform("fused", "trained for int8", "train it for int8", "quantise it (without --qat)",
                   forbids=("fused", "fakequant"), rebuild=lambda m, r: apply_fused(m, r.get("pairs") or [], False)))
register(Transform("fakequant", "trained for int8", "train it for int8", "quantise it (without --qat)",
                   forbids=("fakequant",), requires=("fused",),
                   rebuild=lambda m, r: apply_fake_quant(m, r.get("input_conv", ""))))


def kinds(model: nn.Module) -> list[str]:
    """The kinds of transform applied to `model`, in order."""
    return [t.get("kind") for t in getattr(model, "transforms", [])]


def has(model: nn.Module, kind: str) -> bool:
    return kind in kinds(model)


def check(model: nn.Module, kind: str) -> None:
    """Refuse (ConfigError, saying what to do instead) a `kind` transform that cannot follow what was done to
    `model`, before any work is spent on it."""
    t, done = TRANSFORMS[kind], kinds(model)
    for other in map(TRANSFORMS.__getitem__, (k for k in done if k in t.forbids)):
        if other.done == t.done:
            raise ConfigError(f"this model was already {t.done}: {t.again}")
        raise ConfigError(f"this model was {other.done}: {t.then} the run it came from, then {other.then}")
    missing = [k for k in t.requires if k not in done]
    if missing:
        raise ConfigError(f"a {kind} transform follows {', '.join(missing)}, which was not applied")


def record(model: nn.Module, entry: Record) -> Record:
    """Record a transform just applied to `model` (checked as `check` does); returns the entry."""
    check(model, entry["kind"])
    model.transforms.append(entry)
    return entry


def apply_recorded(model: nn.Module, transforms: list[Record], source: str) -> nn.Module:
    """Apply the structure of recorded `transforms` to a freshly built `model` (its weights load after)."""
    unknown = [t.get("kind") if isinstance(t, dict) else t for t in transforms
               if not isinstance(t, dict) or t.get("kind") not in TRANSFORMS]
    if unknown:
        raise CheckpointError(f"{source} holds a model transformed by {', '.join(map(str, unknown))}, which this "
                              f"resforge cannot rebuild (it knows {', '.join(TRANSFORMS)}); update resforge")
    for t in transforms:
        if TRANSFORMS[t["kind"]].rebuild is not None:
            TRANSFORMS[t["kind"]].rebuild(model, t)
    model.transforms = list(transforms)
    return model


def describe(entry: Record) -> str:
    """One line on what a transform that reports MACs and parameters (pruning, low rank) did."""
    (m0, m1), (p0, p1) = entry["macs"], entry["params"]
    timing = ""
    if "latency_ms" in entry:
        t0, t1 = entry["latency_ms"]
        timing = f", {t1:.2f} ms at batch 1 from {t0:.2f} (onnxruntime, here)"
    return (f"{TRANSFORMS[entry['kind']].summary(entry)}: {m1 / 1e6:,.1f}M MACs of {m0 / 1e6:,.1f}M "
            f"({percent(m1 / m0)}), {p1:,} parameters of {p0:,} ({percent(p1 / p0)}){timing}")


def percent(share: float) -> str:
    """Three significant digits: a target of 0.0001 is 0.01%, not 0%."""
    return f"{100 * share:.3g}%"
