"""eval and predict on a trained run: metrics files, TTA, formats, unreadable inputs."""

import csv
import io
import json

import numpy as np
import pytest
from helpers import make_image_folder

import resforge
from resforge import api
from resforge.cli import main


BATCH_SECONDS = (1.0, 0.25, 0.25, 0.25, 0.25, 0.25)  # a batch's time in each epoch, on the run's clock


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Six epochs on a clock that moves only at the end of a batch, by BATCH_SECONDS of its epoch."""
    from resforge.training import budget

    root = tmp_path_factory.mktemp("ev")
    data = make_image_folder(root / "shapes", classes=("a", "b", "c"), per_class=12, size=20)
    now = [0.0]

    def tick(event, trainer):
        if event == "batch_end":
            now[0] += BATCH_SECONDS[trainer.epoch]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(budget, "clock", lambda: now[0])
        out = api.train(data, model="resnet18", progress=False, width=0.125, img_size=16, batch_size=8, workers=0,
                        epochs=6, lr=0.05, optimizer="sgd", augment="none", small_input=True,
                        project=str(root / "runs"), callbacks=[tick])
    return out["run_dir"], data, root


def test_eval_writes_metrics_confusion_and_grids(run, tmp_path):
    run_dir, data, _ = run
    report = api.evaluate(run_dir, data, out=tmp_path / "ev", workers=0, backend="torch", precision="fp32")
    rows = api.predict(run_dir, [data], topk=1, backend="torch", precision="fp32")  # the same model, image by image
    truth = [r["path"].split("/")[-2] for r in rows]
    guess = [r["top"][0]["class"] for r in rows]
    assert report.num_samples == 36
    assert report.top1 == pytest.approx(sum(t == g for t, g in zip(truth, guess)) / 36)
    classes = ["a", "b", "c"]
    expected = np.zeros((3, 3), int)
    for t, g in zip(truth, guess):
        expected[classes.index(t), classes.index(g)] += 1
    assert report.confusion.tolist() == expected.tolist()
    assert report.top1 >= 0.75  # the run learned the stripes (chance is 1/3)
    for f in ("metrics_shapes.json", "confusion_shapes.csv", "plots/confusion_shapes.png",
              "plots/predictions_shapes.png"):
        assert (tmp_path / "ev" / f).is_file(), f
    saved = json.loads((tmp_path / "ev" / "metrics_shapes.json").read_text())
    assert saved["top1"] == pytest.approx(report.top1) and saved["tta"] is None


def test_tta_changes_the_scores(run, tmp_path):
    import torch

    from resforge.data.loader import ImageDataset, make_loader
    from resforge.data.transforms import eval_transform
    from resforge.runtime.predictor import Predictor
    from resforge.evaluation.evaluate import labelled_samples
    from resforge.runtime.inference import TenCropViews, infer

    run_dir, data, _ = run
    lm = Predictor.load(run_dir, "torch", "cpu", "fp32")
    samples, _ = labelled_samples(data, lm.classes)

    def logits(transform, flip=False):
        loader = make_loader(ImageDataset(samples, transform, lm.pre), 8, train=False, workers=0, seed=0)
        return infer(lm, loader, flip=flip)[0]

    plain, flip = logits(eval_transform(lm.pre)), logits(eval_transform(lm.pre), flip=True)
    crops = logits(TenCropViews(lm.pre))
    assert plain.shape == flip.shape == crops.shape == (36, 3)
    assert not torch.allclose(plain, flip) and not torch.allclose(plain, crops)
    assert torch.allclose(flip.exp().sum(1), torch.ones(36), atol=1e-4)  # averaged probabilities, as logs
    for tta in ("flip", "multicrop"):
        api.evaluate(run_dir, data, out=tmp_path / tta, workers=0, tta=tta, backend="torch")
        assert json.loads((tmp_path / tta / "metrics_shapes.json").read_text())["tta"] == tta


def test_eval_refuses_unknown_classes(run, tmp_path):
    run_dir, _, _ = run
    other = make_image_folder(tmp_path / "other", classes=("a", "zebra"), per_class=2)
    with pytest.raises(resforge.DataError, match="zebra"):
        api.evaluate(run_dir, other)


def test_eval_of_a_subset_of_classes_uses_the_model_indices(run, tmp_path):
    run_dir, _, _ = run
    sub = make_image_folder(tmp_path / "sub", classes=("a", "b", "c"), per_class=3, seed=5)
    import shutil

    shutil.rmtree(sub / "a")
    report = api.evaluate(run_dir, sub, out=tmp_path / "s", workers=0)
    assert report.support.tolist() == [0, 3, 3]


def test_predict_formats_and_an_unreadable_file(run, tmp_path, capsys):
    run_dir, data, _ = run
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    rows = api.predict(run_dir, [str(data / "a"), str(bad)], topk=2)
    assert len(rows) == 13 and rows[-1]["error"].startswith("not an image")
    good = rows[0]
    assert len(good["top"]) == 2 and good["top"][0]["prob"] >= good["top"][1]["prob"]
    assert main(["predict", run_dir, str(data / "b" / "*.png"), "--format", "csv", "--topk", "3"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 12 * 3 and {r["rank"] for r in table} == {"1", "2", "3"}
    out = tmp_path / "p.json"
    assert main(["predict", run_dir, str(data / "c" / "000.png"), "--format", "json", "-o", str(out)]) == 0
    assert json.loads(out.read_text())[0]["top"][0]["class"] in ("a", "b", "c")


def test_predict_matches_the_model_on_its_own(run):
    run_dir, data, _ = run
    import torch

    from resforge.data.folder import load_image
    from resforge.data.loader import pil_to_tensor
    from resforge.data.transforms import Preprocess, eval_transform

    model, meta = resforge.models.load_model(run_dir)
    pre = Preprocess.from_dict(meta["preprocess"])
    path = str(data / "b" / "003.png")
    x = eval_transform(pre)(pil_to_tensor(load_image(path, pre.mode)))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    row = api.predict(run_dir, [path], topk=1, backend="torch", precision="fp32")[0]
    assert row["top"][0]["class"] == meta["classes"][int(probs.argmax())]
    assert row["top"][0]["prob"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_lr_find_suggests_the_steepest_descent(run, tmp_path):
    _, data, _ = run
    result = api.lr_find(data, model="resnet18", steps=30, progress=False, width=0.125, img_size=16, batch_size=8,
                         workers=0, amp="off", start_lr=1e-5, end_lr=10.0, out=tmp_path / "lrf")
    assert len(result.lrs) >= 5 and result.lrs == sorted(result.lrs)
    assert result.suggestion is not None and result.reason == ""
    stop = int(np.argmin(result.losses)) + 1
    slopes = np.gradient(np.asarray(result.losses[:stop]), np.log(np.asarray(result.lrs[:stop])))
    assert result.suggestion == result.lrs[int(np.argmin(slopes))] and slopes.min() < 0  # where the loss fell fastest
    saved = json.loads((tmp_path / "lrf" / "lr_find.json").read_text())
    assert saved["suggestion"] == result.suggestion and (tmp_path / "lrf" / "lr_find.png").is_file()


def test_lr_find_says_why_there_is_no_suggestion():
    from resforge.training.lr_find import suggest_lr

    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    assert suggest_lr(lrs[:3], [2.0, 1.5, 9.0])[1].startswith("the loss diverged after 3 step(s)")
    none, reason = suggest_lr(lrs, [1.0, 1.1, 1.5, 2.0, 3.0, 4.0])
    assert none is None and "lowest at the start" in reason and "fell" not in reason
    none, reason = suggest_lr(lrs, [3.0, 2.0, 2.5, 4.0, 6.0, 9.0])
    assert none is None and "fell for one step only" in reason and "lowest at the start" not in reason
    assert suggest_lr(lrs, [3.0, 2.5, 1.0, 0.9, 2.0, 5.0])[0] == 1e-3  # the steepest fall, before the minimum


def test_lr_find_leaves_the_weights_as_they_were(run, tmp_path):
    import torch

    from resforge.config import build_config
    from resforge.training.lr_find import lr_find
    from resforge.training.trainer import Trainer

    _, data, _ = run
    t = Trainer(build_config(overrides={"data.root": str(data), "model": "resnet18", "width": 0.125,
                                        "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off"}),
                progress=False)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    lr_find(t, steps=10)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def _copy_run(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


@pytest.mark.parametrize("tamper, message", [
    (lambda meta: [meta], "is not a resforge model sidecar"),
    (lambda meta: {**meta, "classes": meta["classes"][:2]}, "names 2 classes but the model has 3 outputs"),
    (lambda meta: {**meta, "preprocess": None}, "unusable preprocessing: expected a mapping"),
    (lambda meta: {**meta, "preprocess": {**meta["preprocess"], "img_size": "16"}},
     "img_size must be a positive whole number, got '16'"),
    (lambda meta: {**meta, "preprocess": {**meta["preprocess"], "mean": [0.5]}}, "mean must be 3 number"),
])
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_tampered_sidecar_is_one_clear_error(run, tmp_path, capsys, tamper, message, command):
    run_dir, data, _ = run
    copy = _copy_run(run_dir, tmp_path)
    meta = json.loads((copy / "best.json").read_text())
    (copy / "best.json").write_text(json.dumps(tamper(meta)))
    args = [str(copy), str(data)] if command == "eval" else [str(copy), str(data / "a" / "000.png")]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resforge: error:") and message in err and "\n" not in err


def test_eval_lists_the_files_it_could_not_read(run, tmp_path):
    import shutil

    run_dir, data, _ = run
    folder = tmp_path / "d"
    shutil.copytree(data, folder)
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    report = api.evaluate(run_dir, folder, out=tmp_path / "ev", workers=0)
    assert report.num_samples == 36
    rows = list(csv.DictReader(open(tmp_path / "ev" / "skipped.csv")))
    assert [r["path"] for r in rows] == ["a/broken.png"] and "corrupt" in rows[0]["reason"]


def test_predict_names_a_decompression_bomb_without_pils_warning(run, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    run_dir, data, _ = run
    big = tmp_path / "big.png"
    Image.new("1", (9500, 9500)).save(big)  # 90.25M pixels: over PIL's warning threshold, small on disk
    r = subprocess.run([sys.executable, "-W", "default", "-m", "resforge", "predict", run_dir, str(big),
                        str(data / "a" / "000.png"), "--format", "json", "--backend", "torch"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert "over the limit of 89,478,485" in rows[0]["error"] and rows[1]["top"]
    assert "DecompressionBombWarning" not in r.stderr


def test_predict_fails_when_no_input_can_be_read(run, tmp_path, capsys):
    run_dir, _, _ = run
    for i in range(2):
        (tmp_path / f"bad{i}.png").write_bytes(b"not a png")
    assert main(["predict", run_dir, str(tmp_path / "bad0.png"), str(tmp_path / "bad1.png")]) == 2
    assert "none of the 2 image(s) could be read" in capsys.readouterr().err


def test_three_classes_are_reported_as_top_3(run, tmp_path):
    run_dir, data, _ = run
    report = api.evaluate(run_dir, data, out=tmp_path / "ev", workers=0)
    assert report.k == 3 and "top-3:" in report.to_markdown() and "top-5" not in report.to_markdown()
    text = open(f"{run_dir}/report.md").read()
    assert "| top-3 |" in text and "top-5" not in text


def test_the_report_gives_images_over_time_not_a_mean_of_rates(run):
    from resforge.report import images_per_second

    rows = [{"img_per_s": 10.0, "train_time_s": 1.0, "train_images": 10},
            {"img_per_s": 1.0, "train_time_s": 9.0, "train_images": 9}]
    assert images_per_second(rows) == pytest.approx(19 / 10)  # a mean of the rates would say 5.5
    # The run's epochs: n full batches of 8 each (a ragged last batch is dropped), at 8 images/s in the
    # first and 32 in the five others. Over the run: 6 x 8n images in n x (1 + 5 x 0.25) s, 21.3 images/s
    # for any n; a mean of the rates would say 28.
    assert "min, 21 training images/s on " in open(f"{run[0]}/report.md").read()
