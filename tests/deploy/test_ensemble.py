"""Ensembles: the mean of the members' probabilities, weighted or fitted, exported as one ONNX model."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from resforge import ConfigError, api
from resforge.cli import main
from resforge.data.folder import scan_images
from resforge.deploy.ensemble import check_weights, fit_weights
from resforge.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def second_run(photo_run):
    run, data, _ = photo_run
    out = api.train(data, model="resnet18", width=0.125, img_size=32, crop_pct=0.875, batch_size=8, workers=0,
                    epochs=2, lr=0.05, optimizer="sgd", augment="none", amp="off", seed=7,
                    project=str(run.parent), name="r2", progress=False)
    return out["run_dir"]


def test_the_ensemble_is_the_mean_of_its_members_in_one_onnx_file(photo_run, second_run, tmp_path, capsys):
    run, _, test = photo_run
    assert main(["ensemble", str(run), second_run, "--data", str(test), "--out", str(tmp_path / "e"),
                 "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| **ensemble** |" in printed and printed.strip().endswith("ensemble.onnx")
    record = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    assert record["weights"] == [0.5, 0.5] and len(record["members"]) == 2
    files = scan_images([test])
    members = [Predictor.load(r, "torch", precision="fp32").probabilities(files) for r in (run, second_run)]
    onnx = Predictor.load(tmp_path / "e" / "ensemble.onnx", "onnxruntime")
    probs = onnx.probabilities(files)
    assert np.abs(probs - (members[0] + members[1]) / 2).max() < 1e-4
    assert onnx.info.arch["name"] == "ensemble" and onnx.info.classes == Predictor.load(run, "torch").classes
    labels = np.array([onnx.classes.index(f.split("/")[-2]) for f in files])
    assert record["ensemble"]["top1"] == pytest.approx((probs.argmax(1) == labels).mean())
    assert api.predict(tmp_path / "e" / "ensemble.onnx", files[:2])[0]["top"]  # predict takes it like any model


def test_weights_pick_the_mix(photo_run, second_run, tmp_path):
    run, _, test = photo_run
    out = api.ensemble([run, second_run], test, weights=[3, 0], out=tmp_path / "w", workers=0)
    assert out["weights"] == [1.0, 0.0]
    assert out["ensemble"]["top1"] == out["members"][0]["top1"]
    fitted = api.ensemble([run, second_run], test, fit=True, out=tmp_path / "f", workers=0)
    assert sum(fitted["weights"]) == pytest.approx(1) and min(fitted["weights"]) >= 0


def test_fitted_weights_favour_the_member_that_is_right():
    torch.manual_seed(0)
    targets = torch.randint(0, 4, (200,))
    right = torch.nn.functional.one_hot(targets, 4).double() * 0.9 + 0.025
    noise = torch.rand(200, 4).double().softmax(-1)
    w = fit_weights([noise, right], targets)
    assert w[1] > 0.9 and sum(w) == pytest.approx(1)


def test_bad_ensembles_are_refused_with_one_message(photo_run, second_run, tmp_path, capsys):
    run, _, test = photo_run
    with pytest.raises(ConfigError, match="at least two models"):
        api.ensemble([run], test)
    with pytest.raises(ConfigError, match="one weight per model"):
        api.ensemble([run, second_run], test, weights=[1])
    with pytest.raises(ConfigError, match="non-negative"):
        api.ensemble([run, second_run], test, weights=[1, -1])
    other = tmp_path / "other"
    other.mkdir()
    for f in (run / "best.safetensors", run / "best.json"):
        shutil.copy(f, other / f.name)
    meta = json.loads((other / "best.json").read_text())
    meta["classes"] = meta["classes"][::-1]
    (other / "best.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="other classes"):
        api.ensemble([run, other / "best.safetensors"], test)
    onnx = api.export(run, "onnx", tmp_path / "m.onnx").path
    assert main(["ensemble", str(run), str(onnx), "--data", str(test), "--out", str(tmp_path / "bad")]) == 2
    assert "exported onnx file" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["ensemble", str(run), second_run, "--data", str(test), "--weights", "1,1", "--fit-weights"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_weights_are_finite_and_checked_before_any_model_is_read(tmp_path, capsys):
    assert check_weights([1e308, 1e308], 2) == [0.5, 0.5]  # their sum overflows: they were once both 0
    assert check_weights([3, 1], 2) == [0.75, 0.25]
    for weights in ([math.inf, 1], [math.nan, 1], [-1, 2], [0, 0]):
        with pytest.raises(ConfigError, match="must be finite, non-negative and not all zero"):
            check_weights(weights, 2)
    missing = [str(tmp_path / "a"), str(tmp_path / "b")]
    for weights, message in (("inf,1", "argument --weights: --weights must be a comma-separated list of finite numbers"),
                             ("-1,2", "--weights must be finite, non-negative"),  # a value, not taken for a flag
                             ("1", "one weight per model")):
        assert main(["ensemble", *missing, "--data", str(tmp_path), "--weights", weights]) == 2
        err = capsys.readouterr().err
        assert err.startswith("resforge: error: ") and message in err and len(err.strip().splitlines()) == 1
