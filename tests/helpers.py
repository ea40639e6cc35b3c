"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

import contextlib
import shutil
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


def make_detection_folder(root, n=16, size=64, classes=("square", "disc"), seed=0, negatives=1):
    """A COCO folder (images/ + annotations/instances.json) of `n` images with one to three shapes each, the
    class set by the shape (a filled square or disc, any colour) so a detector can learn it, each with its
    outline as a polygon; the last `negatives` images hold no objects."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageDraw

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(n):
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(0 if i >= n - negatives else int(rng.integers(1, 4))):
            side = int(rng.integers(size // 5, size // 2))
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            label = int(rng.integers(0, len(classes)))
            colour = tuple(int(v) for v in rng.integers(120, 256, 3))
            (draw.rectangle if label == 0 else draw.ellipse)([x, y, x + side - 1, y + side - 1], fill=colour)
            if label == 0:
                outline = [x, y, x + side, y, x + side, y + side, x, y + side]
            else:
                r, cx, cy = side / 2, x + side / 2, y + side / 2
                outline = [v for a in np.linspace(0, 2 * np.pi, 16, endpoint=False)
                           for v in (cx + r * np.cos(a), cy + r * np.sin(a))]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [x, y, side, side], "area": side * side, "iscrowd": 0,
                                "segmentation": [[float(v) for v in outline]]})
        im.save(root / "images" / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": size, "height": size})
    (root / "annotations" / "instances.json").write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}))
    return str(root)


def make_mask_folder(root, n=12, size=64, classes=("background", "square", "disc"), seed=0, style="palette",
                     splits=False):
    """A segmentation folder (images/ + masks/, classes.txt) of `n` images with one to three shapes each on a
    dark background, the class set by the shape; masks as palette PNGs (`style` "palette"), grey index PNGs
    ("index") or RGB colours listed in classes.yaml ("rgb"); each shape's one-pixel rim is 255 (ignored), as in
    Pascal VOC. `splits` puts the last quarter under val/."""
    from pathlib import Path

    import numpy as np
    import yaml
    from PIL import Image, ImageDraw

    root = Path(root)
    rng = np.random.default_rng(seed)
    colors = [(0, 0, 0), (200, 0, 0), (0, 200, 0), (0, 0, 200)][:len(classes)]
    for i in range(n):
        folder = root / ("val" if splits and i >= n * 3 // 4 else "train") if splits else root
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
        mask = Image.new("L", (size, size), 0)
        draw, mdraw = ImageDraw.Draw(im), ImageDraw.Draw(mask)
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.integers(size // 5, size // 2))
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            label = int(rng.integers(1, len(classes)))
            shape = draw.rectangle if label == 1 else draw.ellipse
            shape([x, y, x + side - 1, y + side - 1], fill=tuple(int(v) for v in rng.integers(120, 256, 3)))
            (mdraw.rectangle if label == 1 else mdraw.ellipse)([x, y, x + side - 1, y + side - 1], fill=label,
                                                                 outline=255)
        im.save(folder / "images" / f"{i:03d}.jpg", quality=95)
        values = np.asarray(mask)
        if style == "rgb":
            rgb = np.zeros((size, size, 3), np.uint8)
            for k, c in enumerate(colors):
                rgb[values == k] = c
            rgb[values == 255] = colors[0]  # an RGB table has no ignored colour: the rim is background
            Image.fromarray(rgb, "RGB").save(folder / "masks" / f"{i:03d}.png")
        elif style == "palette":
            p = Image.fromarray(values, "P")
            p.putpalette([v for c in colors for v in c] + [224, 224, 192] * (256 - len(colors)))
            p.save(folder / "masks" / f"{i:03d}.png")
        else:
            Image.fromarray(values, "L").save(folder / "masks" / f"{i:03d}.png")
    if style == "rgb":
        (root / "classes.yaml").write_text(yaml.safe_dump({c: list(col) for c, col in zip(classes, colors)},
                                                          sort_keys=False))
    else:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return str(root)


def train_logged(data, **options):
    """`resforge.train(data, **options)` and the log lines it wrote at INFO (a module fixture has no caplog)."""
    import logging

    import resforge

    records, logger = [], logging.getLogger("resforge")
    handler, level = logging.Handler(), logger.level
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        run = resforge.train(data, **options)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return run, "\n".join(records)


# The smallest dense runs the tests train: a quarter-width ResNet-18 at 64 px.
DETECT_TINY = {"model": "resnet18", "width": 0.25, "img_size": 64, "batch_size": 4, "workers": 0, "amp": "off",
               "fpn_channels": 32, "box_width": 128, "mask_width": 32, "rois": 128}
SEGMENT_TINY = {"model": "resnet18", "width": 0.25, "img_size": 64, "batch_size": 4, "workers": 0, "amp": "off",
                "head_channels": 32, "output_stride": 16}


@contextlib.contextmanager
def running(app, headers=None):
    """The app on uvicorn as `resforge serve` runs it, in a thread, on a free loopback port: its base URL."""
    import threading

    from resforge.deploy.serve import uvicorn_server

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        wait_ready(url, headers)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_ready(url, headers=None, seconds=120):
    import time

    import httpx

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/ready", headers=headers).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"{url} never became ready")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser_page():
    """A page of Debian's headless Chromium, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield browser.new_page()
        finally:
            browser.close()
