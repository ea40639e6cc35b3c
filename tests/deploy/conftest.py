"""A tiny model trained on crops of real photos, shared by the deploy tests."""

from pathlib import Path

import pytest
from helpers import write_crops

from resforge import api


@pytest.fixture(scope="session")
def photo_run(tmp_path_factory):
    """(run directory, training folder, folder of other crops): resnet18 at 1/8 width, 32 px, centre crop."""
    root = tmp_path_factory.mktemp("photos")
    data = write_crops(root / "train", per_class=16, seed=0)
    test = write_crops(root / "test", per_class=8, seed=1, sizes=(24, 300))
    out = api.train(data, model="resnet18", width=0.125, img_size=32, crop_pct=0.875, batch_size=8, workers=0,
                    epochs=4, lr=0.02, optimizer="sgd", augment="none", amp="off", project=str(root / "runs"),
                    name="r", progress=False)
    return Path(out["run_dir"]), data, test
