import json
import shutil

import pytest
from helpers import make_image_folder
from PIL import Image

import resforge
from resforge.cli import main
from resforge.data.folder import scan_folder


def test_inspect_counts_sizes_duplicates_and_leaks(tmp_path):
    root = tmp_path / "d"
    make_image_folder(root / "train", classes=("cat", "dog"), per_class=6, size=24)
    make_image_folder(root / "test", classes=("cat", "dog"), per_class=2, size=24, seed=9)
    shutil.copy(root / "train" / "cat" / "000.png", root / "test" / "cat" / "leak.png")  # a test image seen in training
    shutil.copy(root / "train" / "dog" / "001.png", root / "train" / "dog" / "copy.png")
    Image.new("L", (40, 30)).save(root / "train" / "dog" / "gray.png")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    report = resforge.inspect_data(root, out=tmp_path / "out", per_class=3)
    assert report.counts == {"train": [6, 8], "test": [3, 2]}
    assert report.imbalance == 10 / 9
    assert len(report.duplicates) == 2 and report.cross_split_duplicates == 1
    assert report.modes == {"RGB": 18, "L": 1}
    assert report.width["max"] == 40 and report.height["min"] == 24
    assert [p.endswith("broken.jpg") for p, _ in report.skipped] == [True]
    text = report.to_text()
    assert "leaks into training" in text and "broken.jpg" in text
    saved = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert saved["counts"]["train"] == [6, 8]
    with Image.open(tmp_path / "out" / "samples.png") as grid:
        assert grid.width > 200


def test_cli_data_inspect(tmp_path, capsys):
    make_image_folder(tmp_path / "d", per_class=3)
    assert main(["data", "inspect", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "samples.png").is_file()


def test_inspect_reports_what_training_would_refuse(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("cat",), per_class=3)
    (root / "dog").mkdir()
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    report = resforge.inspect_data(root, out=tmp_path / "out")
    assert report.counts == {"train": [3, 0]} and [p.endswith("broken.jpg") for p, _ in report.skipped] == [True]
    assert report.imbalance is None and "a class has no images" in report.to_text()
    with pytest.raises(resforge.DataError, match="no readable images in .*dog"):
        scan_folder(root)


def test_inspect_warns_where_flips_would_change_labels(tmp_path):
    import numpy as np

    root = tmp_path / "digits"
    rng = np.random.default_rng(0)
    for c in ("3", "7"):  # characters: a mirrored 3 is no 3
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / c / f"{i}.png")
    report = resforge.inspect_data(root, out=tmp_path / "out")
    assert report.warnings and "horizontal flips may change labels" in report.to_text()
    plain = make_image_folder(tmp_path / "bands", classes=("cat", "dog"), per_class=6)
    assert resforge.inspect_data(plain, out=tmp_path / "out2").warnings == []
