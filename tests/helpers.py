"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

import socket

import torch


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def dead_url(path: str = "x.pth") -> str:
    """A URL on a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


def make_image_folder(root, classes=("a", "b"), per_class=6, size=24, fmt="png", mode="RGB", seed=0):
    """Write root/<class>/<i>.<fmt>: noise plus a class-specific bright stripe, so classes are learnable."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            band = slice(c * size // len(classes), (c + 1) * size // len(classes))
            a[band, :, :] = 220
            im = Image.fromarray(a)
            im = im.convert(mode) if mode != "RGB" else im
            im.save(root / name / f"{i:03d}.{fmt}")
    return root
