"""int8 post-training quantisation on a tiny trained model: files, agreement with fp32, bad input."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_image_folder
from PIL import Image

import resforge
import resforge.compress.quantize as quantize_module
from resforge.cli import main
from resforge.runtime.predictor import Predictor
from resforge.io import temp_dir

TINY = {"model": "resnet18", "width": 0.25, "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off",
        "epochs": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    data = make_image_folder(root / "shapes", classes=("a", "b", "c"), per_class=30, size=20)
    return resforge.train(data, progress=False, project=str(root / "runs"), name="src", **TINY)["run_dir"], root


def _val_files(run_dir):
    data = json.loads(Path(f"{run_dir}/best.json").read_text())["trained"]["data"]
    return [f"{data}/{line.split(',')[2]}" for line in Path(f"{run_dir}/split.csv").read_text().splitlines()[1:]
            if line.startswith("val,")]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_agrees_with_fp32_on_real_images(run, backend):
    run_dir, _ = run
    result = resforge.quantize(run_dir, backend, calib=32)
    assert result.path.name == ("best-int8.onnx" if backend == "onnxruntime" else "best-int8.xml")
    # The file is self-describing and runs through the Predictor like any export.
    int8 = Predictor.load(result.path, backend, precision="fp32" if backend == "openvino" else "auto")
    fp32 = Predictor.load(run_dir, "torch", precision="fp32")
    files = _val_files(run_dir)
    p8, p32 = int8.probabilities(files), fp32.probabilities(files)
    # Tolerance: int8 may flip at most one near-tie among the 18 validation images, and no
    # probability moves by more than 0.15.
    assert (p8.argmax(1) == p32.argmax(1)).mean() >= 17 / 18
    assert np.abs(p8 - p32).max() < 0.15
    assert result.agreement >= 17 / 18 and abs(result.drop) <= 100 / 18 + 1e-9
    record = int8.info.export["quantized"]
    assert record["calibration_images"] == 32 and record["backend"] == backend
    if backend == "onnxruntime":
        graph = onnx.load(str(result.path)).graph
        assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10
        assert record["activations"] in ("u8", "s8") and set(record["img_per_s_batch1"]) == {"u8", "s8"}


@pytest.mark.parametrize("rates", [{"u8": 40.0, "s8": 90.0}, {"u8": 90.0, "s8": 40.0}])
def test_auto_keeps_the_activation_type_measured_faster(run, tmp_path, monkeypatch, rates):
    """The measurement is faked (each candidate file gets a known rate): the choice follows the rates,
    whichever type is the faster, and the file written is that type's."""
    run_dir, _ = run
    measured = []

    def rate(path, x):
        measured.append(len(x))
        return rates["s8" if "s8" in Path(path).name else "u8"]

    monkeypatch.setattr(quantize_module, "_images_per_second", rate)
    result = resforge.quantize(run_dir, out=tmp_path / "q.onnx", calib=8)
    faster = max(rates, key=rates.get)
    assert measured == [1, 1]  # both candidates, at batch 1
    assert result.activations == faster and result.timings == rates
    record = Predictor.load(result.path, "onnxruntime").info.export["quantized"]
    assert record["activations"] == faster and record["img_per_s_batch1"] == rates
    graph = onnx.load(str(result.path)).graph
    weights = {i.name for i in graph.initializer}
    zero_points = [i for i in graph.initializer if i.name in
                   {n.input[2] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in weights}]
    kind = onnx.TensorProto.INT8 if faster == "s8" else onnx.TensorProto.UINT8
    assert zero_points and all(z.data_type == kind for z in zero_points)


def test_a_chosen_activation_type_is_used(run, tmp_path, capsys):
    run_dir, _ = run
    result = resforge.quantize(run_dir, out=tmp_path / "s8.onnx", calib=16, activations="s8", method="percentile")
    assert capsys.readouterr().out == ""  # onnxruntime's histogram progress lines are not on our stdout
    graph = onnx.load(str(result.path)).graph
    weights = {i.name: i for i in graph.initializer}
    activation_zero_points = [weights[n.input[2]] for n in graph.node
                              if n.op_type == "QuantizeLinear" and n.input[0] not in weights]
    assert result.activations == "s8" and result.timings == {} and activation_zero_points
    assert all(z.data_type == onnx.TensorProto.INT8 for z in activation_zero_points)


def test_bad_input_is_one_clear_line_and_writes_nothing(run, capsys):
    run_dir, root = run
    out = root / "bad.onnx"
    cases = [(["--calib", "1000"], "has 72 image(s), fewer than the 1000 asked"),
             (["--calib", "0"], "--calib must be a positive number"),
             (["--max-drop", "-1"], "--max-drop is the points (of top-1, mIoU or AP@.5) int8 may lose and cannot be "
                                    "negative"),
             (["--backend", "openvino", "--method", "entropy"], "NNCF (openvino) estimates its own ranges"),
             (["--images", str(root / "empty")], "no images found in")]
    (root / "empty").mkdir()
    for extra, message in cases:
        assert main(["quantize", run_dir, "-o", str(out), *extra]) == 2, extra
        assert message in capsys.readouterr().err
        assert not out.exists()
    int8 = root / "q.onnx"
    assert main(["quantize", run_dir, "-o", str(int8), "--calib", "8", "--activations", "u8"]) == 0
    assert main(["quantize", str(int8), "-o", str(out)]) == 2
    assert "already quantised" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_max_drop_keeps_sensitive_layers_in_fp32_until_it_holds(run, tmp_path, backend):
    run_dir, _ = run
    # Calibrated on white images, int8 clips the real activations: a loss to win back.
    white = tmp_path / "white"
    white.mkdir()
    for i in range(16):
        Image.new("RGB", (20, 20), (255, 255, 255)).save(white / f"{i}.png")
    suffix = ".onnx" if backend == "onnxruntime" else ".xml"
    plain = resforge.quantize(run_dir, backend, tmp_path / f"plain{suffix}", calib=16, images=white)
    assert plain.drop > 0 and not plain.kept_fp32
    held = resforge.quantize(run_dir, backend, tmp_path / f"held{suffix}", calib=16, images=white, max_drop=0)
    assert held.drop <= 0 and held.kept_fp32
    record = Predictor.load(held.path, backend, precision="fp32" if backend == "openvino" else "auto").info.export[
        "quantized"]
    assert record["max_drop"] == 0 and record["kept_fp32"] == held.kept_fp32
    if backend == "onnxruntime":  # the convolutions kept compute in fp32: their weights are the float ones
        graph = onnx.load(str(held.path)).graph
        floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
        kept = [n for n in graph.node if n.name in held.kept_fp32]
        assert len(kept) == len(held.kept_fp32)
        convs = [n for n in kept if n.op_type == "Conv"]
        assert convs and all(n.input[1] in floats for n in convs)
        assert all(n.input[1] not in floats for n in graph.node if n.op_type == "Conv" and n not in kept)


def test_a_killed_quantize_leaves_a_temp_folder_that_the_next_one_there_removes(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        import resforge.compress.quantize as q
        q._measure = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed with its graphs written
        q.quantize({run_dir!r}, out={str(out / "killed.onnx")!r}, calib=8, activations="u8")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    [left] = out.iterdir()
    assert left.is_dir() and (left / "fp32.onnx").is_file()
    (out / ".export.x.tmp").mkdir()  # another command's kind is not this one's to judge
    with temp_dir(out, "quantize") as running:  # a quantize still at work beside it keeps its folder
        resforge.quantize(run_dir, out=out / "q.onnx", calib=8, activations="u8")
        assert running.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [".export.x.tmp", "q.onnx"]


def test_a_runs_split_is_found_from_the_model_never_the_working_directory(run, tmp_path, monkeypatch):
    run_dir, root = run
    copy = tmp_path / "elsewhere" / "src"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("split.csv"))
    side = json.loads((copy / "best.json").read_text())
    side["trained"]["run"] = "runs/src"  # as older runs recorded it: relative to where training ran
    (copy / "best.json").write_text(json.dumps(side))
    monkeypatch.chdir(root)  # where runs/src/split.csv is another run's (here, the source's)
    with pytest.raises(resforge.ConfigError, match="no training images of .* were found"):
        resforge.quantize(copy, out=tmp_path / "q.onnx", calib=8, activations="u8")
