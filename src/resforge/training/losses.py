"""Training losses, each called as `loss(logits, target, images)` so one that needs the input (a
teacher's) plugs into the step without touching the loop. Logits are taken to float32 here, whatever
precision the forward pass ran in."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationLoss(nn.Module):
    """Cross-entropy with label smoothing; `target` is class indices or (mixed) class probabilities."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


class DistillationLoss(nn.Module):
    """alpha x CE(student, labels) + (1 - alpha) x T^2 x KL(teacher_T || student_T) (Hinton et al. 2015).

    The teacher sees the very batch the student sees, augmented and mixed alike ("consistent
    teaching", Beyer et al. 2022): a function matched on the same inputs, not on other views of them.
    T^2 keeps the soft term's gradients at the scale of the hard one's as T changes.
    """

    def __init__(self, teacher: Callable[[torch.Tensor], torch.Tensor], alpha: float, temperature: float,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.teacher = teacher
        self.alpha, self.temperature = alpha, temperature
        self.hard = ClassificationLoss(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        t, logits = self.temperature, logits.float()
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        reduction="batchmean", log_target=True) * t * t
        if self.alpha == 0:
            return soft
        return self.alpha * self.hard(logits, target, images) + (1 - self.alpha) * soft
