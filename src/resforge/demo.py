"""`make demo`: the main job on the embedded default (the bundled Fashion-MNIST sample)."""

from __future__ import annotations

import time

import numpy as np
import torch

from .data.sources import FASHION_MNIST_CLASSES, load_fashion_mnist_sample
from .models import create_model, summarize


def run_demo() -> None:
    model = create_model("resnet50", num_classes=len(FASHION_MNIST_CLASSES)).eval()
    print(summarize(model, 224, "resnet50").table())
    images, labels = load_fashion_mnist_sample()["test"]
    x = torch.from_numpy(np.ascontiguousarray(images[:1])).float().div(255)
    x = torch.nn.functional.interpolate(x[:, None].expand(-1, 3, -1, -1), size=224, mode="bilinear")
    t = time.perf_counter()
    with torch.no_grad():
        logits = model(x.contiguous(memory_format=torch.channels_last))
    ms = (time.perf_counter() - t) * 1e3
    print(f"one forward pass on a real '{FASHION_MNIST_CLASSES[labels[0]]}' image: logits {list(logits.shape)} "
          f"in {ms:.0f} ms (untrained weights)")
