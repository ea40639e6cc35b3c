import math

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from resforge.evaluation import plots

HISTORY = [
    {"epoch": 1, "train_loss": 2.0, "val_loss": 1.8, "val_top1": 0.30, "val_top5": 0.8, "lr": 0.01},
    {"epoch": 2, "train_loss": 1.5, "val_loss": math.nan, "val_top1": 0.50, "ema_val_top1": 0.45, "lr": 0.1},
    {"epoch": 3, "train_loss": 1.1, "val_loss": 1.2, "val_top1": 0.62, "ema_val_top1": 0.60, "lr": 0.05},
]


def _check_png(path, min_size=(200, 150)):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert im.width >= min_size[0] and im.height >= min_size[1]
        assert im.width < 6000 and im.height < 6000
        size = im.size
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob(".*"))
    return size


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, for checking what they drew."""
    saved = []
    real_save = plots._save

    def save(fig, path):
        saved.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return saved


def _lines(fig):
    return {line.get_label(): line.get_xydata().tolist() for ax in fig.axes for line in ax.lines}


def test_history(tmp_path, figures):
    path = tmp_path / "plots" / "history.png"
    assert plots.plot_history(HISTORY, path) == path
    drawn = _lines(figures[0])
    width, height = _check_png(path, (1000, 300))
    assert width > 2 * height  # three panels side by side
    assert drawn["val_loss"] == [[1, 1.8], [3, 1.2]]  # NaN left out
    assert drawn["ema_val_top1"] == [[2, 0.45], [3, 0.6]]  # absent in epoch 1
    assert drawn["train_loss"] == [[1, 2.0], [2, 1.5], [3, 1.1]]
    assert {"val_top5", "lr", "val_top1"} <= set(drawn) and "ema_val_loss" not in drawn


def test_history_names_top_k_by_the_class_count(tmp_path, figures):
    plots.plot_history(HISTORY, tmp_path / "h.png", k=3)
    drawn = _lines(figures[0])
    assert "val_top3" in drawn and "val_top5" not in drawn


def test_history_from_csv_strings_and_sparse_rows(tmp_path, figures):
    rows = [{"epoch": "1", "train_loss": "0.9", "val_top1": ""}, {"epoch": "2", "train_loss": "0.7"}]
    _check_png(plots.plot_history(rows, tmp_path / "h.png"))
    assert _lines(figures[0]) == {"train_loss": [[1, 0.9], [2, 0.7]]}
    assert [t.get_text() for t in figures[0].axes[1].texts] == ["no data"]
    with pytest.raises(ValueError, match="no epochs"):
        plots.plot_history([], tmp_path / "empty.png")


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion(tmp_path, figures, normalize):
    path = tmp_path / "confusion.png"
    assert plots.plot_confusion(np.array([[3, 1], [0, 0]]), ["a", "b"], path, normalize=normalize) == path
    _check_png(path, (300, 300))
    ax = figures[0].axes[0]
    texts = [t.get_text() for t in ax.texts]  # a class with no samples: zeros, not NaN
    assert texts == (["0.75", "0.25", "0.00", "0.00"] if normalize else ["3", "1", "0", "0"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"] and ax.get_xticklabels()[0].get_rotation() == 45
    assert len(figures[0].axes) == 2  # with its colour bar


def test_confusion_scales_with_classes(tmp_path, figures):
    small = _check_png(plots.plot_confusion(np.eye(4, dtype=int), list("abcd"), tmp_path / "small.png"))
    confusion = np.random.default_rng(0).integers(0, 20, (30, 30))
    large = _check_png(plots.plot_confusion(confusion, [f"class_{i}" for i in range(30)], tmp_path / "large.png"))
    assert large[0] > 2 * small[0] and large[1] > 2 * small[1]
    assert not figures[1].axes[0].texts  # too many cells to annotate
    with pytest.raises(ValueError, match="2x2"):
        plots.plot_confusion(np.zeros((3, 3)), ["a", "b"], tmp_path / "bad.png")


def test_image_grid(tmp_path, figures):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(3)]
    images += [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(4)]
    titles = [f"true: a\npred: {'a' if i % 2 else 'b'}" for i in range(7)]
    colors = ["green" if i % 2 else "red" for i in range(6)] + [None]
    path = tmp_path / "grid.png"
    assert plots.plot_image_grid(images, titles, path, colors=colors, suptitle="predictions") == path
    square = _check_png(path)
    tiles = [ax for ax in figures[0].axes if ax.images]
    assert [ax.get_title() for ax in tiles] == titles
    assert [ax.title.get_color() for ax in tiles] == colors[:-1] + ["black"]  # None: the default colour
    assert tiles[0].images[0].get_cmap().name == "gray" and not any(ax.axison for ax in figures[0].axes)
    wide = _check_png(plots.plot_image_grid(images, titles, tmp_path / "wide.png", ncols=7))
    assert wide[0] > 1.5 * square[0] and wide[1] < square[1]
    with pytest.raises(ValueError, match="no images"):
        plots.plot_image_grid([], [], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="titles"):
        plots.plot_image_grid(images, titles[:2], tmp_path / "bad.png")


def test_lr_find(tmp_path, figures):
    lrs = list(np.logspace(-6, 1, 50))
    losses = [2.3 - 0.02 * i for i in range(45)] + [3.0, 5.0, 9.0, math.inf, math.nan]
    path = tmp_path / "lr_find.png"
    assert plots.plot_lr_find(lrs, losses, 3e-3, path) == path
    _check_png(path)
    ax = figures[0].axes[0]
    assert ax.get_xscale() == "log" and ax.lines[-1].get_xdata() == [3e-3, 3e-3]
    assert "3.00e-03" in ax.get_legend().texts[0].get_text()
    assert np.isnan(ax.lines[0].get_ydata()[-2:]).all() and ax.get_ylim()[1] < 20  # inf left out, not autoscaled to
    _check_png(plots.plot_lr_find(lrs, losses, None, tmp_path / "none.png"))
    assert len(figures[1].axes[0].lines) == 1
    with pytest.raises(ValueError, match="as many"):
        plots.plot_lr_find(lrs, losses[:-1], None, tmp_path / "bad.png")


@pytest.mark.parametrize("draw", [
    lambda p: plots.plot_history(HISTORY, p),
    lambda p: plots.plot_confusion(np.eye(3, dtype=int), list("abc"), p),
    lambda p: plots.plot_image_grid([np.zeros((8, 8), np.uint8)], ["x"], p),
    lambda p: plots.plot_lr_find([1e-3, 1e-2], [1.0, 0.5], 1e-3, p),
], ids=["history", "confusion", "image_grid", "lr_find"])
def test_failed_drawing_keeps_previous_png(tmp_path, monkeypatch, draw):
    path = tmp_path / "figure.png"
    draw(path)
    before = path.read_bytes()

    def broken(self, fname, **kwargs):
        open(fname, "wb").write(b"half a PNG")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        draw(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


@pytest.mark.filterwarnings("ignore:Glyph")  # the stand-in font below has no CJK glyphs: matplotlib says so
def test_class_names_without_a_font_are_written_out_not_drawn_as_boxes(tmp_path, figures, caplog, monkeypatch):
    names = ["猫", "犬"]
    found = plots._font_for(frozenset(map(ord, "猫犬")))
    plots.plot_confusion(np.eye(2, dtype=int), names, tmp_path / "c.png")
    labels = [t.get_text() for t in figures[-1].axes[0].get_xticklabels()]
    if found is None:  # no installed font has them: each character is written as its code point, said once
        assert labels == ["<U+732B>", "<U+72AC>"] and "no installed font has the characters" in caplog.text
    else:  # the font that has them is used beside the default one
        assert labels == names and found in figures[-1].axes[0].get_xticklabels()[0].get_fontfamily()
    monkeypatch.setattr(plots, "_font_for", lambda chars: "DejaVu Sans")  # as if a CJK font were installed
    plots.plot_image_grid([np.zeros((8, 8), np.uint8)], ["猫"], tmp_path / "g.png")
    title = figures[-1].axes[0].get_title()
    assert title == "猫"
