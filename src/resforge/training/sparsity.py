"""Unstructured pruning: gradual magnitude pruning (Zhu & Gupta 2017), made permanent.

During the fine-tune the share of zeroed weights follows their cubic schedule,
s(t) = s_final * (1 - (1 - t / T)^3), reaching s_final after PRUNE_SHARE of the run's steps, which
leaves the rest to recover at the final sparsity. After each optimiser step the weights outside
the mask are zeroed again, so they stay zero in the saved model. The mask is the largest weights
by magnitude, per layer or over all layers at once (`scope="global"`); it is recomputed from the
weights, so a resumed run rebuilds it without any state of its own.

What it saves: zeros compress, so the file shrinks under any compressor (measured: `zip_bytes`);
dense runtimes (onnxruntime, OpenVINO and PyTorch on CPU) run a sparse model no faster than the
dense one. Structured pruning (`prune --ratio/--macs`) is what makes a network faster.

The trainer runs it when `train.sparsity` is set (`resforge train --sparsity 0.8`, or
`resforge prune RUN --sparsity 0.8` to fine-tune a trained run so), and a resumed run again.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..io import write_csv
from ..models import transforms

log = logging.getLogger("resforge")

SCOPES = ("layer", "global")
PRUNE_SHARE = 0.7  # of the run's steps: the sparsity grows over these, the rest fine-tune at the final one
UPDATES = 100  # the mask is recomputed this many times along the growth


def prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights unstructured pruning zeroes: every convolution's and linear layer's."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def target(step: int, total: int, final: float) -> float:
    """Zhu & Gupta's cubic schedule: sparsity at `step` of a growth lasting `total` steps."""
    t = min(1.0, step / max(1, total))
    return final * (1 - (1 - t) ** 3)


def masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing the `sparsity` share of smallest-magnitude weights, per layer or over all."""
    if scope == "global":
        flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
        k = int(sparsity * flat.numel())
        threshold = flat.kthvalue(k).values if k else flat.new_tensor(-1.0)
        return {n: w.detach().abs().float() > threshold for n, w in weights.items()}
    out = {}
    for name, w in weights.items():
        flat = w.detach().abs().flatten().float()
        k = int(sparsity * flat.numel())
        out[name] = w.detach().abs().float() > (flat.kthvalue(k).values if k else -1.0)
    return out


class GradualMagnitude:
    """The trainer callback that grows the sparsity and keeps pruned weights at zero."""

    def __init__(self, sparsity: float, scope: str = "layer"):
        if not 0 < sparsity < 1:
            raise ConfigError(f"sparsity must lie between 0 and 1 (exclusive), got {sparsity:g}")
        if scope not in SCOPES:
            raise ConfigError(f"sparsity scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.sparsity, self.scope = sparsity, scope
        self.mask: dict[str, torch.Tensor] = {}
        self.level = -1.0

    def growth_steps(self, trainer: Any) -> int:
        return max(1, int(PRUNE_SHARE * trainer.schedule.end))

    def reached(self, trainer: Any) -> bool:
        """Whether the final sparsity holds: only then may an epoch be the run's best."""
        return trainer.step >= self.growth_steps(trainer)

    def __call__(self, event: str, trainer: Any) -> None:
        if event not in ("train_start", "step_end"):
            return
        total = self.growth_steps(trainer)
        every = max(1, total // UPDATES)
        level = target(trainer.step, total, self.sparsity)
        if event == "train_start" or (trainer.step % every == 0 and level > self.level) or trainer.step == total:
            weights = prunable(trainer.model)
            self.mask, self.level = masks(weights, level, self.scope), level
        models = [trainer.model] + ([trainer.ema.module] if trainer.ema is not None else [])
        with torch.no_grad():
            for model in models:  # the weight average too: either may be saved as the best
                for name, w in prunable(model).items():
                    w.mul_(self.mask[name])


def mark_sparse(model: nn.Module, sparsity: float, scope: str) -> None:
    """Record on `model` that it trains sparse, once (a resumed run's model, or a sparse source, already says
    so)."""
    if not transforms.has(model, "sparse"):
        transforms.record(model, {"kind": "sparse", "sparsity": sparsity, "scope": scope})


def report(model: nn.Module) -> list[dict[str, Any]]:
    """Zeros per prunable layer, and over all of them."""
    rows = [{"layer": n.removesuffix(".weight"), "weights": w.numel(), "zeros": int((w == 0).sum())}
            for n, w in prunable(model).items()]
    rows.append({"layer": "all", "weights": sum(r["weights"] for r in rows), "zeros": sum(r["zeros"] for r in rows)})
    for r in rows:
        r["sparsity"] = r["zeros"] / r["weights"]
    return rows


def zip_bytes(model: nn.Module) -> int:
    """The size of the model's weights under zlib: what sparsity saves on disk and on the wire."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return len(zlib.compress(save(state), 6))


def write_report(model: nn.Module, path: Any) -> list[dict[str, Any]]:
    """sparsity.csv: zeros per layer; returns the rows (the last is the whole network)."""
    rows = report(model)
    write_csv(path, ["layer", "weights", "zeros", "sparsity"],
              ([r["layer"], r["weights"], r["zeros"], f"{r['sparsity']:.4f}"] for r in rows))
    return rows
