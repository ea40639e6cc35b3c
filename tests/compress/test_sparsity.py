"""Unstructured (gradual magnitude) pruning: the schedule, the zeros it leaves, their report and resume."""

import csv
from pathlib import Path

import pytest
import torch
from helpers import make_image_folder

import resforge
from resforge.models import load_model
from resforge.training.sparsity import masks, prunable, target, zip_bytes

TINY = {"model": "resnet18", "width": 0.25, "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    data = make_image_folder(root / "shapes", classes=("a", "b", "c"), per_class=16, size=20)
    return resforge.train(data, progress=False, project=str(root / "runs"), name="src", epochs=1, **TINY)["run_dir"], root


def test_the_schedule_is_zhu_and_guptas_cubic():
    assert target(0, 100, 0.8) == 0 and target(100, 100, 0.8) == target(150, 100, 0.8) == pytest.approx(0.8)
    assert target(50, 100, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))


def test_global_scope_ranks_all_layers_together():
    small, large = torch.full((10,), 0.1), torch.arange(1.0, 11.0)
    per_layer, overall = masks({"a": small, "b": large}, 0.5, "layer"), masks({"a": small, "b": large}, 0.5, "global")
    assert int(per_layer["a"].sum()) == 0 or int(per_layer["a"].sum()) == 10  # ties: all or none of a's
    assert int(per_layer["b"].sum()) == 5
    assert int(overall["a"].sum()) == 0 and int(overall["b"].sum()) == 10  # a's small weights go first


def test_prune_to_a_sparsity_zeroes_each_layer_and_resumes_sparse(source):
    run_dir, root = source
    best_after = []
    out = resforge.prune(run_dir, sparsity=0.6, epochs=2, batch_size=8, progress=False, project=str(root / "runs"),
                         callbacks=[lambda e, t: e == "epoch_end" and best_after.append(t.best["epoch"])])
    sparse_dir = out["run_dir"]
    # 5 steps per epoch, the sparsity grows over 7: epoch 1 cannot be the best, however it scores
    assert sparse_dir.endswith("src-sparse") and best_after == [None, 2]
    model, meta = load_model(sparse_dir)
    for name, w in prunable(model).items():
        assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=1 / w.numel() + 1e-6), name
    assert meta["arch"]["transforms"][-1] == {"kind": "sparse", "sparsity": 0.6, "scope": "layer"}
    rows = list(csv.DictReader(Path(f"{sparse_dir}/sparsity.csv").read_text().splitlines()))
    assert rows[-1]["layer"] == "all" and float(rows[-1]["sparsity"]) == pytest.approx(0.6, abs=0.01)
    assert zip_bytes(model) < 0.75 * zip_bytes(load_model(run_dir)[0])
    more = resforge.train(resume=sparse_dir, epochs=3, progress=False)  # the sparsity callback comes back
    assert more["epochs"] == 3
    resumed, _ = load_model(sparse_dir)
    assert all((w == 0).float().mean().item() >= 0.59 for w in prunable(resumed).values())


def test_sparsity_out_of_range_is_refused_before_anything_is_written(source):
    run_dir, root = source
    with pytest.raises(resforge.ConfigError, match="--sparsity must lie between 0 and 1"):
        resforge.prune(run_dir, sparsity=1.0, project=str(root / "bad"))
    with pytest.raises(resforge.ConfigError, match="one pruning target"):
        resforge.prune(run_dir, sparsity=0.5, ratio=0.5, project=str(root / "bad"))
    assert not (root / "bad").exists()
