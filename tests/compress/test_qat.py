"""Quantisation-aware training on a tiny model: folding, learned scales exported as trained, resume, bad input."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import make_image_folder
from onnx import numpy_helper

import resforge
from resforge.cli import main
from resforge.compress import qat
from resforge.runtime.predictor import Predictor
from resforge.models import create_model, load_model
from resforge.models.quantized import (
    QConv2d,
    QuantReLU,
    activation_quantizers,
    fake_quant_weight,
)

TINY = {"model": "resnet18", "width": 0.25, "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off",
        "epochs": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    data = make_image_folder(root / "shapes", classes=("a", "b", "c"), per_class=30, size=20)
    return resforge.train(data, progress=False, project=str(root / "runs"), name="src", **TINY)["run_dir"], root


def test_folding_keeps_the_function_and_rounding_is_int8():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, width=0.25).eval()
    for m in model.modules():  # batch norms with statistics, as a trained network has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 16, 16)
    before = model(x)
    qat.prepare(model, [x])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert [t["kind"] for t in model.transforms] == ["fused", "fakequant"]
    net, learned = qat.plain(model)
    torch.testing.assert_close(net(x), before, atol=1e-4, rtol=1e-4)  # folding alone changes nothing
    # Rounded weights take at most 255 values per output channel, on the grid max|w|/127.
    w = model.layer1[0].conv1.weight
    q = fake_quant_weight(w)
    scale = w.abs().flatten(1).amax(1) / 127
    steps = q / scale[:, None, None, None]
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 127 + 1e-3
    # A ReLU output is uint8 on its scale: at most 256 distinct values, zero point 0.
    relu = model.layer1[0].act1
    assert isinstance(relu, QuantReLU) and int(relu.quant.zero_point) == 0
    assert len(learned) == 1 + sum(isinstance(m, QuantReLU) for m in model.modules())
    out = relu(torch.randn(2, 4, 8, 8) * 3)
    assert torch.unique(out).numel() <= 256


def _val_files(run_dir):
    data = json.loads(Path(f"{run_dir}/best.json").read_text())["trained"]["data"]
    return [f"{data}/{line.split(',')[2]}" for line in Path(f"{run_dir}/split.csv").read_text().splitlines()[1:]
            if line.startswith("val,")]


def test_scales_learn_and_the_int8_file_carries_them(run):
    run_dir, root = run
    result = resforge.quantize(run_dir, qat=True, calib=16, epochs=2, name="q", project=str(root / "runs"),
                               progress=False)
    qat_run = result.path.parent
    assert result.path == qat_run / "best-int8.onnx" and (qat_run / "results.json").is_file()
    model, meta = load_model(qat_run)  # rebuilt from its record, without pickle
    assert [t["kind"] for t in meta["arch"]["transforms"]] == ["fused", "fakequant"]
    assert any(isinstance(m, QConv2d) for m in model.modules())
    start_model, _ = load_model(qat_run / "start.safetensors")
    start = {n: float(q.scale.detach()) for n, q in activation_quantizers(start_model).items()}
    trained = {n: float(q.scale.detach()) for n, q in activation_quantizers(model).items()}
    assert trained.keys() == start.keys() and any(abs(trained[n] - start[n]) > 1e-6 for n in trained)
    # Every learned scale and zero point is an exported one, bit for bit; the input's on the input.
    _, learned = qat.plain(model)
    graph = onnx.load(str(result.path)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    exported = {n.input[0]: (init[n.input[1]].item(), int(init[n.input[2]])) for n in graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] not in init}
    values = {(np.float32(s).item(), z) for s, z in learned.values()}
    assert values <= set(exported.values())
    assert exported["input"] == (np.float32(learned[""][0]).item(), learned[""][1])
    # The int8 file computes what the fake-quantised network trained to compute: near-identical
    # probabilities on the real validation images (int32 accumulation against float rounding).
    files = _val_files(qat_run)
    int8 = Predictor.load(result.path, "onnxruntime").probabilities(files)
    trained_net = Predictor.load(qat_run, "torch", precision="fp32").probabilities(files)
    assert (int8.argmax(1) == trained_net.argmax(1)).mean() >= 17 / 18 and np.abs(int8 - trained_net).max() < 0.1
    record = Predictor.load(result.path, "onnxruntime").info.export["quantized"]
    assert record["learned_scales"] == len(learned) and record["activations"] == "u8"
    assert record["baseline"] == str(run_dir)
    # The QAT run resumes and extends like any run.
    more = resforge.train(resume=qat_run, epochs=3, progress=False)
    assert more["epochs"] == 3


def test_bad_input_is_one_clear_line_and_writes_nothing(run, capsys):
    run_dir, root = run
    runs = root / "runs"
    before = sorted(p.name for p in runs.iterdir())
    cases = [(["--epochs", "1"], "are for quantisation-aware training: add --qat"),
             (["--qat", "--backend", "openvino"], "--qat writes an onnxruntime model"),
             (["--qat", "--calib", "1000"], "fewer than the 1000 asked"),
             (["--qat", "--calib", "8", "--activations", "s8"], "with uint8 activations")]
    for extra, message in cases:
        assert main(["quantize", run_dir, "--project", str(runs), *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert sorted(p.name for p in runs.iterdir()) == before
    gelu = resforge.train(Path(run_dir).parent.parent / "shapes", progress=False, project=str(runs), name="gelu",
                          act="gelu", **{**TINY, "epochs": 1})["run_dir"]
    assert main(["quantize", gelu, "--qat", "--calib", "8", "--project", str(runs), "--name", "g"]) == 2
    assert "maps its learned scales onto ReLU outputs; this model uses GELU" in capsys.readouterr().err
    assert not (runs / "g").exists()


def test_a_model_trained_for_int8_is_not_pruned_or_factorised(run, capsys):
    run_dir, root = run
    qat_run = root / "runs" / "q"  # written by test_scales_learn_and_the_int8_file_carries_them
    if not qat_run.is_dir():
        resforge.quantize(run_dir, qat=True, calib=8, epochs=1, name="q", project=str(root / "runs"), progress=False)
    for command in (["prune", str(qat_run), "--ratio", "0.5"], ["lowrank", str(qat_run)]):
        assert main([*command, "--project", str(root / "runs"), "--name", "x"]) == 2
        assert "was trained for int8" in capsys.readouterr().err
        assert not (root / "runs" / "x").exists()
