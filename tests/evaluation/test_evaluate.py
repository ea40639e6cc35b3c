"""eval and predict on a trained run: metrics files, TTA, formats, unreadable inputs."""

import csv
import io
import json

import pytest
from helpers import make_image_folder

import resforge
from resforge import api
from resforge.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    data = make_image_folder(root / "shapes", classes=("a", "b", "c"), per_class=12, size=20)
    out = api.train(data, model="resnet18", progress=False, width=0.125, img_size=16, batch_size=8, workers=0,
                    epochs=3, lr=0.05, augment="none", project=str(root / "runs"))
    return out["run_dir"], data, root


def test_eval_writes_metrics_confusion_and_grids(run, tmp_path):
    run_dir, data, _ = run
    report = api.evaluate(run_dir, data, out=tmp_path / "ev", workers=0)
    assert report.num_samples == 36 and 0 <= report.top1 <= 1
    for f in ("metrics_shapes.json", "confusion_shapes.csv", "plots/confusion_shapes.png",
              "plots/predictions_shapes.png"):
        assert (tmp_path / "ev" / f).is_file(), f
    saved = json.loads((tmp_path / "ev" / "metrics_shapes.json").read_text())
    assert saved["top1"] == pytest.approx(report.top1) and saved["tta"] is None


def test_tta_changes_the_scores(run, tmp_path):
    import torch

    from resforge.data.loader import ImageDataset, make_loader
    from resforge.data.transforms import eval_transform
    from resforge.evaluation.evaluate import LoadedModel, labelled_samples
    from resforge.evaluation.runner import TenCropViews, infer

    run_dir, data, _ = run
    lm = LoadedModel.load(run_dir, torch.device("cpu"))
    samples = labelled_samples(data, lm.classes)

    def logits(transform, flip=False):
        loader = make_loader(ImageDataset(samples, transform, lm.pre), 8, train=False, workers=0, seed=0)
        return infer(lm.model, loader, torch.device("cpu"), flip=flip)[0]

    plain, flip = logits(eval_transform(lm.pre)), logits(eval_transform(lm.pre), flip=True)
    crops = logits(TenCropViews(lm.pre))
    assert plain.shape == flip.shape == crops.shape == (36, 3)
    assert not torch.allclose(plain, flip) and not torch.allclose(plain, crops)
    assert torch.allclose(flip.exp().sum(1), torch.ones(36), atol=1e-4)  # averaged probabilities, as logs
    for tta in ("flip", "multicrop"):
        api.evaluate(run_dir, data, out=tmp_path / tta, workers=0, tta=tta)
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
    from resforge.data.loader import _pil_to_tensor
    from resforge.data.transforms import Preprocess, eval_transform

    model, meta = resforge.models.load_model(run_dir)
    pre = Preprocess.from_dict(meta["preprocess"])
    path = str(data / "b" / "003.png")
    x = eval_transform(pre)(_pil_to_tensor(load_image(path, pre.mode)))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    row = api.predict(run_dir, [path], topk=1, amp="off")[0]
    assert row["top"][0]["class"] == meta["classes"][int(probs.argmax())]
    assert row["top"][0]["prob"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_lr_find_suggests_a_rate_and_restores_the_model(run, tmp_path):
    _, data, _ = run
    result = api.lr_find(data, model="resnet18", steps=30, progress=False, width=0.125, img_size=16, batch_size=8,
                         workers=0, amp="off", out=tmp_path / "lrf")
    assert len(result.lrs) >= 5 and result.lrs == sorted(result.lrs)
    assert result.suggestion is None or result.lrs[0] <= result.suggestion <= result.lrs[-1]
    assert (tmp_path / "lrf" / "lr_find.png").is_file()


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
