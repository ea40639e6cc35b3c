"""The Fashion-MNIST importer: idx files (the Debian package's format) in, an image folder out."""

import gzip

import numpy as np
import pytest
from PIL import Image

from resforge import DataError
from resforge.data.folder import scan_folder
from resforge.data.sources import FASHION_MNIST_CLASSES, import_dataset, load_fashion_mnist_sample, read_idx


def _write_idx(path, array, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _fake_set(folder, n_train=20, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir()
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10, gz)
    return folder


@pytest.mark.parametrize("gz", [True, False])
def test_import_writes_the_official_split_pixel_exact(tmp_path, gz):
    src = _fake_set(tmp_path / "idx", gz=gz)
    out = import_dataset("fashion-mnist", tmp_path / "fm", source=src)
    scan = scan_folder(out)
    assert scan.classes == sorted(FASHION_MNIST_CLASSES)
    assert sum(scan.counts("test")) == 10 and sum(scan.counts("train")) + sum(scan.counts("val")) == 20
    images = read_idx(src / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}")
    first = np.asarray(Image.open(out / "test" / FASHION_MNIST_CLASSES[0] / "00000.png"))
    assert np.array_equal(first, images[0])


def test_truncated_idx_and_wrong_files(tmp_path):
    src = _fake_set(tmp_path / "idx", gz=False)
    path = src / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    (tmp_path / "junk").write_bytes(b"\x89PNG....")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "junk")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        import_dataset("fashion-mnist", tmp_path / "out", source=tmp_path / "nothing-here")


def test_output_folder_is_never_clobbered_or_half_written(tmp_path):
    src = _fake_set(tmp_path / "idx")
    out = tmp_path / "fm"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        import_dataset("fashion-mnist", out, source=src)
    assert (out / "mine.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bundled_sample_is_real_and_stratified(tmp_path):
    sample = load_fashion_mnist_sample()
    images, labels = sample["train"]
    assert images.shape[1:] == (28, 28) and images.dtype == np.uint8 and len(images) >= 2000
    assert np.bincount(labels).tolist() == [len(labels) // 10] * 10
    assert len(set(map(bytes, images[:200]))) == 200  # real, distinct images
    out = import_dataset("fashion-mnist-sample", tmp_path / "s")
    assert sum(scan_folder(out).counts("test")) == len(sample["test"][1])


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        import_dataset("cifar10", tmp_path / "x")
