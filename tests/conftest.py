import functools
import http.server
import threading

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where a GPU is; elsewhere they are skipped, and -ra's summary says why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Downloads, ONNX exports and auto-backend measurements go to a folder of the session, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RESFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture
def http_root(tmp_path):
    """Serve a folder on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def tiny_kwargs():
    """A narrow network for fast tests of behaviour, not of capacity."""
    return dict(width=0.125, num_classes=5)


@pytest.fixture(scope="session")
def photo_run(tmp_path_factory):
    """(run directory, training folder, folder of other crops): a tiny model trained on crops of real photos,
    shared by the runtime and deploy tests: resnet18 at 1/8 width, 32 px, centre crop."""
    from pathlib import Path

    from helpers import write_crops

    from resforge import api

    root = tmp_path_factory.mktemp("photos")
    data = write_crops(root / "train", per_class=16, seed=0)
    test = write_crops(root / "test", per_class=8, seed=1, sizes=(24, 300))
    out = api.train(data, model="resnet18", width=0.125, img_size=32, crop_pct=0.875, batch_size=8, workers=0,
                    epochs=4, lr=0.02, optimizer="sgd", augment="none", amp="off", project=str(root / "runs"),
                    name="r", progress=False)
    return Path(out["run_dir"]), data, test


@pytest.fixture(scope="session")
def fashion_run(tmp_path_factory):
    """(run directory, data folder, {name: folder of 200 test images}): a tiny classifier trained on the bundled
    Fashion-MNIST sample, with its monitoring profile, and test images as they are ("same"), darkened to a third
    ("dark") and inverted ("inverted"), in a shuffled order, for the monitoring tests."""
    from pathlib import Path

    from PIL import Image, ImageOps

    from resforge import api
    from resforge.data.sources import import_dataset

    root = tmp_path_factory.mktemp("fashion")
    data = import_dataset("fashion-mnist-sample", root / "data")
    out = api.train(data, model="resnet18", width=0.125, img_size=28, batch_size=64, workers=0, epochs=2, lr=0.01,
                    augment="none", amp="off", project=str(root / "runs"), name="r", progress=False)
    import random

    files = sorted(Path(data, "test").rglob("*.png"))[::5]
    random.Random(0).shuffle(files)  # any first few are of every class, as a stream's would be
    shifts = {"same": lambda im: im, "dark": lambda im: im.point(lambda v: v // 3), "inverted": ImageOps.invert}
    folders = {}
    for name, shift in shifts.items():
        folders[name] = root / name
        folders[name].mkdir()
        for i, f in enumerate(files):
            shift(Image.open(f).convert("L")).save(folders[name] / f"{i:03d}.png")
    return Path(out["run_dir"]), Path(data), folders
