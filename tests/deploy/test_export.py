"""Export: self-describing files that agree with the PyTorch model, or no file at all."""

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
import torch
from helpers import real_photos
from PIL import Image

from resforge import ConfigError, api
from resforge.cli import main
from resforge.data.folder import scan_images
from resforge.data.transforms import Preprocess
from resforge.deploy import export as export_module
from resforge.deploy.export import read_pt2_info
from resforge.runtime.record import ONNX_KEY, ModelInfo
from resforge.runtime.predictor import Predictor
from resforge.errors import ExportError
from resforge.io import temp_dir
from resforge.models import load_model


def test_onnx_carries_its_record_and_agrees_with_pytorch(photo_run, tmp_path):
    run, _, _ = photo_run
    result = api.export(run, "onnx", tmp_path / "m.onnx", dynamic_batch=True)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    props = {p.key: p.value for p in proto.metadata_props}
    info = ModelInfo.from_json(props[ONNX_KEY], "m.onnx")
    _, meta = load_model(run)
    assert info.classes == meta["classes"] and info.pre == Preprocess.from_dict(meta["preprocess"])
    record = json.loads(props[ONNX_KEY])
    assert record["schema"] == "resforge.model" and record["version"] == 2
    assert record["preprocess"]["crop"] == "center" and record["preprocess"]["channel_order"] == "RGB"
    assert record["arch"]["name"] == "resnet18" and record["metrics"]["val_top1"] == meta["metrics"]["val_top1"]
    assert record["export"]["opset"] == 18 and record["export"]["torch"] == torch.__version__
    assert "Image.BitmapPixelFormat" not in props  # the input is a normalised tensor, not an image
    p = result.parity
    assert p.images == len([1 for line in (run / "split.csv").read_text().splitlines() if line.startswith("val,")])
    assert p.top1_agreement == 1.0 and p.max_abs_diff < 1e-4
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # --dynamic-batch


def _crops_of_many_shapes(tmp_path):
    """Real photos cut to many sizes and aspect ratios, from tall to wide, small to large."""
    out = tmp_path / "shapes"
    out.mkdir()
    rng = np.random.default_rng(5)
    for name, img in real_photos().items():
        for i, (h, w) in enumerate([(33, 33), (40, 160), (160, 40), (121, 97), (300, 420), (37, 1000 // 3),
                                    (427, 640)]):
            h, w = min(h, img.shape[0]), min(w, img.shape[1])
            y, x = rng.integers(0, img.shape[0] - h + 1), rng.integers(0, img.shape[1] - w + 1)
            Image.fromarray(img[y:y + h, x:x + w]).save(out / f"{name}-{i}.png")
    return out


def test_embedded_preprocessing_matches_the_pytorch_pipeline_on_photos_of_any_shape(photo_run, tmp_path):
    run, _, _ = photo_run
    shapes = _crops_of_many_shapes(tmp_path)
    files = scan_images([shapes])
    reference = Predictor.load(run, "torch", "cpu", "fp32")
    ref = reference.probabilities(files)
    for fmt in ("onnx", "openvino"):
        result = api.export(run, fmt, tmp_path / f"pixels.{'onnx' if fmt == 'onnx' else 'xml'}",
                            embed_preprocessing=True, images=shapes)
        assert result.parity.top1_agreement >= 0.995
        p = Predictor.load(result.path, "onnxruntime" if fmt == "onnx" else "openvino", precision="fp32")
        assert p.takes_pixels
        got = p.probabilities(files)
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.995, fmt
        assert np.abs(got - ref).max() < 0.02, fmt  # a grey level of difference in the resize, at most
    props = {x.key: x.value for x in onnx.load(str(tmp_path / "pixels.onnx")).metadata_props}
    assert props["Image.BitmapPixelFormat"] == "Rgb8" and props["Image.NominalPixelRange"] == "NominalRange_0_255"
    # any language can feed it raw pixels: ONNX Runtime alone, no resforge, no preprocessing
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "pixels.onnx"))
    pixels = np.asarray(Image.open(files[0]).convert("RGB"))[None]
    logits = session.run(None, {"pixels": pixels})[0]
    assert logits.shape == (1, 3) and int(logits.argmax()) == int(ref[0].argmax())


def test_openvino_ir_carries_the_record_in_rt_info(photo_run, tmp_path):
    import openvino as ov

    run, _, test = photo_run
    result = api.export(run, "openvino", tmp_path / "m.xml")
    assert result.path.is_file() and result.path.with_suffix(".bin").is_file()
    model = ov.Core().read_model(str(result.path))
    info = ModelInfo.from_json(model.get_rt_info("resforge").astype(str), "m.xml")
    assert info.classes == ["china", "flower", "hopper"] and info.export["format"] == "openvino"
    assert result.parity.top1_agreement == 1.0 and result.parity.max_abs_diff < 1e-4


def test_pt2_program_carries_the_record(photo_run, tmp_path):
    run, _, _ = photo_run
    result = api.export(run, "pt2", tmp_path / "m.pt2")
    info = read_pt2_info(result.path)
    assert info.classes == ["china", "flower", "hopper"] and info.pre.img_size == 32
    assert result.parity.max_abs_diff < 1e-4


def test_fp16_exports_stay_close(photo_run, tmp_path):
    import openvino as ov

    run, _, _ = photo_run
    result = api.export(run, "onnx", tmp_path / "h.onnx", dtype="fp16")
    assert result.parity.top1_agreement >= 0.99 and 0 < result.parity.max_abs_diff <= result.parity.tolerance
    weights = [i for i in onnx.load(str(result.path)).graph.initializer if i.dims and len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert Predictor.load(result.path, "onnxruntime", precision="fp16").precision == "fp16"
    ir = api.export(run, "openvino", tmp_path / "h.xml", dtype="fp16")
    assert ir.parity.top1_agreement >= 0.99
    consts = [op for op in ov.Core().read_model(str(ir.path)).get_ops() if op.get_type_name() == "Constant"]
    assert any(op.get_output_element_type(0) == ov.Type.f16 for op in consts)
    assert ir.path.with_suffix(".bin").stat().st_size < 0.6 * (run / "best.safetensors").stat().st_size


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory):
    """A grayscale model (in_chans 1) trained on grayscale crops of the photos."""
    root = tmp_path_factory.mktemp("gray")
    data = root / "data"
    for name, img in real_photos().items():
        (data / name).mkdir(parents=True)
        gray = Image.fromarray(img).convert("L")
        for i in range(10):
            gray.crop((i * 20, i * 15, i * 20 + 120, i * 15 + 90)).save(data / name / f"{i}.png")
    out = api.train(data, model="resnet18", width=0.125, img_size=24, in_chans=1, batch_size=8, workers=0, epochs=2,
                    amp="off", project=str(root / "runs"), name="g", progress=False)
    return Path(out["run_dir"]), data


def test_a_grayscale_model_exports_with_one_channel_pixels(gray_run, tmp_path):
    run, data = gray_run
    result = api.export(run, "onnx", tmp_path / "g.onnx", embed_preprocessing=True, dynamic_batch=True)
    proto = onnx.load(str(result.path))
    props = {x.key: x.value for x in proto.metadata_props}
    assert props["Image.BitmapPixelFormat"] == "Gray8"
    assert json.loads(props[ONNX_KEY])["preprocess"]["channel_order"] == "L"
    assert proto.graph.input[0].type.tensor_type.shape.dim[3].dim_value == 1
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # any batch
    files = scan_images([data])
    ref = Predictor.load(run, "torch", "cpu", "fp32").probabilities(files)
    p = Predictor.load(result.path, "onnxruntime")
    assert (p.probabilities(files, batch_size=8).argmax(1) == ref.argmax(1)).mean() >= 0.95
    ir = api.export(run, "openvino", tmp_path / "g.xml", embed_preprocessing=True)
    assert ir.parity.top1_agreement >= 0.995


def test_eval_of_each_exported_file_equals_eval_of_the_run(photo_run, tmp_path):
    run, _, test = photo_run
    onnx_path = api.export(run, "onnx", tmp_path / "e.onnx").path
    xml_path = api.export(run, "openvino", tmp_path / "e.xml").path
    reports = [api.evaluate(run, test, out=tmp_path / "a", workers=0, backend="torch", precision="fp32"),
               api.evaluate(onnx_path, test, out=tmp_path / "b", workers=0, backend="onnxruntime"),
               api.evaluate(xml_path, test, out=tmp_path / "c", workers=0, backend="openvino", precision="fp32")]
    for r in reports[1:]:
        assert r.top1 == reports[0].top1 and r.confusion.tolist() == reports[0].confusion.tolist()
        assert r.macro["f1"] == pytest.approx(reports[0].macro["f1"])


def test_the_parity_gate_refuses_a_graph_that_disagrees_and_leaves_no_file(photo_run, tmp_path, monkeypatch):
    run, _, _ = photo_run
    real = export_module.to_onnx

    def drifted(model, info, **kw):  # a conversion bug: the graph computes something else
        other = type(model)(**model.spec())
        return real(other, info, **kw)

    monkeypatch.setattr(export_module, "to_onnx", drifted)
    target = tmp_path / "out" / "m.onnx"
    with pytest.raises(ExportError, match="disagrees with the PyTorch model.*m.onnx was not written"):
        api.export(run, "onnx", target)
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []  # no file, no temp folder


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "tflite"}, "format must be one of onnx, openvino, pt2"),
    ({"format": "tensorrt"}, "--backend tensorrt"),
    ({"dtype": "int4"}, "dtype must be one of fp32, fp16"),
    ({"opset": 17}, "opset must lie in 18.."),
    ({"format": "pt2", "embed_preprocessing": True}, "a pt2 program takes the preprocessed tensor"),
    ({"out": "model.onnx.txt"}, "onnx exports are .onnx files"),
])
def test_export_options_that_cannot_work_are_refused(photo_run, kwargs, message, tmp_path):
    run, _, _ = photo_run
    kwargs = {"out": None, **kwargs}
    if kwargs["out"]:
        kwargs["out"] = tmp_path / kwargs["out"]
    with pytest.raises(ConfigError, match=message):
        api.export(run, **kwargs)


def test_export_without_the_runs_images_asks_for_them(photo_run, tmp_path):
    import shutil

    run, _, test = photo_run
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("split.csv", "last.ckpt"))
    side = json.loads((moved / "best.json").read_text())
    side["trained"]["run"] = str(moved)
    (moved / "best.json").write_text(json.dumps(side))
    with pytest.raises(ConfigError, match="give a folder of images with --images DIR"):
        api.export(moved, "onnx")
    assert api.export(moved, "onnx", images=test).parity.where == f"images from {test}"
    onnx_file = moved / "best.onnx"
    with pytest.raises(ConfigError, match="already an exported onnx file"):
        api.export(onnx_file, "openvino")


def test_export_from_the_command_line(photo_run, tmp_path, capsys):
    run, _, _ = photo_run
    out = tmp_path / "cli.onnx"
    assert main(["export", str(run), "--format", "onnx", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    assert main(["export", str(run), "--format", "onnx", "--opset", "12", "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resforge: error: opset must lie in") and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_a_runs_files_are_found_from_the_run_never_the_working_directory(photo_run, tmp_path, monkeypatch):
    run, _, _ = photo_run
    copy = tmp_path / "a" / "runs" / "r"
    copy.mkdir(parents=True)
    for name in ("best.safetensors", "best.json", "split.csv"):
        shutil.copy(run / name, copy / name)
    side = json.loads((copy / "best.json").read_text())
    side["trained"]["run"] = "runs/r"  # as older runs recorded it: relative to where training ran
    (copy / "best.json").write_text(json.dumps(side))
    rows = (run / "split.csv").read_text().splitlines()
    val = [r for r in rows if r.startswith("val,")]
    decoy = tmp_path / "cwd" / "runs" / "r"  # another run of that name where the command is run
    decoy.mkdir(parents=True)
    (decoy / "split.csv").write_text("\n".join([rows[0], val[0]]) + "\n")
    monkeypatch.chdir(tmp_path / "cwd")
    parity = api.export(copy, "onnx", tmp_path / "m.onnx").parity
    assert parity.where == f"validation images of {copy}" and parity.images == len(val)


def test_an_unreadable_parity_image_is_skipped_and_named(photo_run, tmp_path, caplog):
    run, _, test = photo_run
    folder = tmp_path / "images"
    folder.mkdir()
    for i, f in enumerate(scan_images([test])[:5]):
        shutil.copy(f, folder / f"{i}.jpg")
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level("WARNING", logger="resforge"):
        result = api.export(run, "onnx", tmp_path / "m.onnx", images=folder)
    assert result.parity.images == 5 and f"{folder / 'bad.jpg'}: not an image" in caplog.text
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="none of the 1 images from .* could be read"):
        api.export(run, "onnx", tmp_path / "n.onnx", images=only_bad)
    assert not (tmp_path / "n.onnx").exists()


def test_a_temp_folder_left_by_a_killed_export_is_removed_by_the_next_export_there(photo_run, tmp_path):
    run, _, _ = photo_run
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        import resforge.deploy.export as e
        e.check_parity = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed with the graph written
        e.export({str(run)!r}, "onnx", {str(out / "k.onnx")!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    [left] = out.iterdir()
    assert left.is_dir() and (left / "k.onnx").is_file()
    (out / ".quantize.x.tmp").mkdir()  # another command's kind is not this one's to judge
    (out / ".mine").mkdir()
    with temp_dir(out, "export") as running:  # an export still at work beside it keeps its folder
        api.export(run, "onnx", out / "m.onnx")
        assert running.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [".mine", ".quantize.x.tmp", "m.onnx"]


def test_a_run_without_its_best_model_says_what_it_holds(photo_run, tmp_path, capsys):
    run, _, _ = photo_run
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(run / "last.ckpt", cut / "last.ckpt")
    assert main(["export", str(cut), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "holds a training checkpoint (last.ckpt) but no best model" in err
    assert f"resforge train --resume {cut}" in err and "Traceback" not in err
