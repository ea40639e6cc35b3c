"""MobileNetV3 students: parity with torchvision, options that do not apply, distillation from a ResNet run."""

import pytest
import torch
import torchvision
from helpers import make_image_folder

import resforge
from resforge.cli import main
from resforge.runtime.predictor import Predictor
from resforge.models import create_model, load_into, load_model, summarize
from resforge.models.mobilenet import MobileNetV3


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_torchvision_checkpoints_load_by_their_keys_and_compute_the_same(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(num_classes=7).eval()
    ours = create_model(name, num_classes=7).eval()
    assert load_into(ours, theirs.state_dict()) == []  # every key, exactly
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    s = summarize(ours, 224)
    assert s.params == sum(p.numel() for p in theirs.parameters()) == sum(r.params for r in s.stages)
    assert [r.output_shape[1:] for r in s.stages[1:5]] == [[56, 56], [28, 28], [14, 14], [7, 7]]  # strides 4..32
    # A checkpoint of another class count gets a fresh head, as for ResNets.
    other = create_model(name, num_classes=3)
    notes = load_into(other, theirs.state_dict())
    assert other.num_classes == 3 and "classifier was replaced" in notes[0]


def test_resnet_options_that_do_not_apply_are_refused(tmp_path, capsys):
    with pytest.raises(resforge.ConfigError, match="drop se, act"):
        MobileNetV3("small", se=True, act="gelu")
    data = make_image_folder(tmp_path / "d", per_class=4, size=20)
    assert main(["train", str(data), "--model", "mobilenet_v3_small", "--norm", "groupnorm",
                 "--project", str(tmp_path / "runs")]) == 2
    assert "drop norm" in capsys.readouterr().err


def test_a_resnet_run_distils_into_a_mobilenet_student(tmp_path, capsys):
    data = make_image_folder(tmp_path / "shapes", classes=("a", "b", "c"), per_class=16, size=20)
    tiny = {"img_size": 32, "batch_size": 8, "workers": 0, "amp": "off", "project": str(tmp_path / "runs"),
            "progress": False}
    teacher = resforge.train(data, model="resnet18", width=0.25, epochs=2, name="teacher", **tiny)["run_dir"]
    student = resforge.train(data, model="mobilenet_v3_small", teacher=teacher, epochs=2, name="student",
                             small_input=True, **tiny)
    model, meta = load_model(student["run_dir"])  # rebuilt from the sidecar, no pickle
    assert isinstance(model, MobileNetV3) and meta["arch"]["name"] == "mobilenet_v3_small"
    assert model.stem_conv.stride == (1, 1)  # the small-input stem, as for ResNets
    out = resforge.export(student["run_dir"], "onnx")  # gated on parity with PyTorch
    files = sorted(str(p) for p in (data / "a").iterdir())[:4]
    torch.testing.assert_close(torch.from_numpy(Predictor.load(out.path, "onnxruntime").probabilities(files)),
                               torch.from_numpy(Predictor.load(student["run_dir"], "torch", precision="fp32")
                                                .probabilities(files)), atol=1e-4, rtol=1e-4)
    assert main(["prune", student["run_dir"], "--ratio", "0.5", "--project", str(tmp_path / "runs"),
                 "--name", "p"]) == 2
    assert "distil a ResNet into it instead" in capsys.readouterr().err and not (tmp_path / "runs" / "p").exists()
