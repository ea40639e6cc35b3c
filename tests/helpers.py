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


def real_photos() -> dict:
    """The photos that ship with scikit-learn and matplotlib (no download)."""
    from pathlib import Path

    import matplotlib
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as im:
        hopper = np.asarray(im.convert("RGB"))
    return {"china": china, "flower": flower, "hopper": hopper}


def write_crops(root, per_class: int, seed: int, sizes=(40, 200)):
    """JPEG crops of each photo at random places, sizes and aspect ratios: root/<photo>/<i>.jpg."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for name, img in real_photos().items():
        (root / name).mkdir(parents=True, exist_ok=True)
        h, w = img.shape[:2]
        for i in range(per_class):
            ch, cw = (int(rng.integers(*sizes)) for _ in range(2))
            y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
            Image.fromarray(img[y:y + ch, x:x + cw]).save(root / name / f"{i:03d}.jpg", quality=90)
    return root


def cli_flags(options: dict) -> list[str]:
    """Training options as the CLI's flags: `{"img_size": 16, "small_input": True}` -> --img-size 16 --small-input."""
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out
