"""One Predictor for every backend: the same answers from every engine and every kind of input."""

import io
import json
import logging
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from resforge import CheckpointError, ConfigError, DataError, api
from resforge.cli import main
from resforge.data.folder import scan_images
from resforge.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def onnx_file(photo_run, tmp_path_factory):
    run, _, _ = photo_run
    return api.export(run, "onnx", tmp_path_factory.mktemp("onnx") / "model.onnx").path


@pytest.fixture(scope="module")
def pixels_file(photo_run, tmp_path_factory):
    """The run exported with its preprocessing in the graph: it takes uint8 pixels of any size."""
    run, _, _ = photo_run
    return api.export(run, "onnx", tmp_path_factory.mktemp("px") / "px.onnx", embed_preprocessing=True).path


def test_every_backend_gives_the_same_answers(photo_run, onnx_file):
    run, _, test = photo_run
    files = scan_images([test])
    reference = Predictor.load(run, "torch", "cpu", "fp32").probabilities(files)
    for source, backend in ((run, "onnxruntime"), (run, "openvino"), (onnx_file, "onnxruntime"),
                            (onnx_file, "openvino")):
        p = Predictor.load(source, backend, precision="fp32")
        assert p.backend == backend and p.precision == "fp32"
        probs = p.probabilities(files)
        assert (probs.argmax(1) == reference.argmax(1)).all(), (source, backend)
        assert np.abs(probs - reference).max() < 1e-4, (source, backend)
    bf16 = Predictor.load(run, "torch", "cpu", "bf16").probabilities(files)
    assert (bf16.argmax(1) == reference.argmax(1)).mean() >= 0.9 and np.abs(bf16 - reference).max() > 0


def test_every_kind_of_image_input_gives_the_same_answer(photo_run):
    run, _, test = photo_run
    p = Predictor.load(run, "torch", "cpu", "fp32")
    # a JPEG small enough to be decoded at full scale, so every input below holds the very same pixels
    path = min(scan_images([test]), key=lambda f: max(Image.open(f).size))
    assert max(Image.open(path).size) < 2 * p.pre.resize_size
    data = open(path, "rb").read()
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    hwc = np.asarray(pil)
    chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1)
    expected = p.predict(path, topk=3)
    for image in (data, bytearray(data), pil, hwc, chw, np.asarray(pil.convert("RGBA"))):
        assert p.predict(image, topk=3) == expected
    gray = p.predict(np.asarray(pil.convert("L")), topk=3)  # converted to RGB, as a gray file would be
    assert gray == p.predict(pil.convert("L"), topk=3) != expected
    many = p.predict([path, data, hwc], topk=3)  # one batch of three: the kernels may sum in another order
    for row in many:
        assert [t["class"] for t in row["top"]] == [t["class"] for t in expected["top"]]
        assert [t["prob"] for t in row["top"]] == pytest.approx([t["prob"] for t in expected["top"]], abs=1e-5)
    assert p.probabilities([path, chw]).shape == (2, len(p.classes))


def test_labelled_files_and_images_go_through_the_same_preprocessing(photo_run, pixels_file):
    run, _, test = photo_run
    files = scan_images([test])
    samples = [(f, i % 3) for i, f in enumerate(files)]
    for p in (Predictor.load(run, "torch", "cpu", "fp32"), Predictor.load(pixels_file, "onnxruntime")):
        logits, labels = p.infer(samples, batch_size=4, workers=0)
        assert labels.tolist() == [y for _, y in samples]
        assert torch.allclose(logits, p.logits(files), atol=1e-5)
        assert np.allclose(logits.softmax(-1).numpy(), p.probabilities(files), atol=1e-6)
    with pytest.raises(ConfigError, match="multicrop needs a model that takes tensors"):
        p.infer(samples, tta="multicrop")
    with pytest.raises(DataError, match="unknown test-time augmentation"):
        p.infer(samples, tta="mirror")


def test_bad_images_are_named_not_raised_mid_batch(photo_run):
    run, _, test = photo_run
    p = Predictor.load(run, "torch", "cpu", "fp32")
    good = scan_images([test])[0]
    rows = p.predict([good, b"not an image", np.zeros((8, 8), np.float32), np.zeros((8, 8, 2), np.uint8), b""],
                     names=["good", "junk", "floats", "two-channel", "empty"])
    assert "top" in rows[0]
    assert rows[1]["error"] == "not an image in a format accepted here (JPEG, PNG, WEBP, BMP, TIFF, GIF)"
    assert rows[2]["error"] == "expected uint8 pixels (0-255), got float32"
    assert rows[3]["error"].startswith("expected an image of 1, 3 or 4 channels")
    assert rows[4]["error"] == "empty file"
    with pytest.raises(DataError, match="image 1: not an image"):
        p.probabilities([good, b"junk"])


def test_auto_measures_the_backends_keeps_the_fastest_and_remembers(photo_run, caplog, tmp_path, monkeypatch):
    run, _, _ = photo_run
    monkeypatch.setenv("RESFORGE_CACHE", str(tmp_path))  # nothing measured before
    caplog.set_level(logging.INFO, logger="resforge")
    p = Predictor.load(run, "auto", batch_size=2)
    rates = p.auto["img_per_s"]
    assert {name.split()[0] for name in rates} == {"torch", "onnxruntime", "openvino"}
    assert f"{p.backend} {p.precision}" == max(rates, key=rates.get)
    assert "the fastest here at batch 2" in caplog.text
    caplog.clear()
    again = Predictor.load(run, "auto", batch_size=2)
    assert again.backend == p.backend and "measured before at batch 2" in caplog.text


def test_a_fixed_batch_graph_takes_any_number_of_images(photo_run, onnx_file):
    run, _, test = photo_run
    files = scan_images([test])[:5]
    p = Predictor.load(onnx_file, "onnxruntime")
    assert p.runner.max_batch == 1  # exported without --dynamic-batch
    reference = Predictor.load(run, "torch", "cpu", "fp32").probabilities(files)
    assert np.abs(p.probabilities(files, batch_size=4) - reference).max() < 1e-4  # slices of one, in order


def test_a_foreign_onnx_file_names_what_it_lacks(photo_run, onnx_file, tmp_path):
    run, _, test = photo_run
    proto = onnx.load(str(onnx_file))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(CheckpointError, match=r"carries no resforge metadata.*class names \(--classes\)"):
        Predictor.load(bare, "onnxruntime")
    with pytest.raises(CheckpointError, match="names 2 classes but the model has 3 outputs"):
        Predictor.load(bare, "onnxruntime", metadata={"classes": "a,b"})
    ours = Predictor.load(run, "torch", "cpu", "fp32")
    p = Predictor.load(bare, "onnxruntime", metadata={"classes": ",".join(ours.classes), "crop_pct": 0.875})
    assert p.pre.img_size == 32  # read from the graph
    files = scan_images([test])
    assert (p.probabilities(files).argmax(1) == ours.probabilities(files).argmax(1)).all()
    (tmp_path / "classes.txt").write_text("\n".join(ours.classes) + "\n")
    assert Predictor.load(bare, "onnxruntime", metadata={"classes": str(tmp_path / "classes.txt")}).classes == \
        ours.classes


def test_broken_model_files_are_one_clear_error(onnx_file, tmp_path):
    data = onnx_file.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.onnx").write_text("hello")
    for name in ("cut.onnx", "text.onnx"):
        with pytest.raises(CheckpointError, match="not a readable ONNX file|onnxruntime cannot load"):
            Predictor.load(tmp_path / name, "onnxruntime")
    proto = onnx.load(str(onnx_file))
    proto.opset_import[0].version = 99
    onnx.save(proto, str(tmp_path / "future.onnx"))
    with pytest.raises(CheckpointError, match="uses ONNX opset 99"):
        Predictor.load(tmp_path / "future.onnx", "onnxruntime")
    proto = onnx.load(str(onnx_file))
    proto.graph.node[0].op_type = "NoSuchOp"
    onnx.save(proto, str(tmp_path / "invalid.onnx"))
    with pytest.raises(ConfigError, match=r"no backend here can run .*invalid.onnx on cpu: onnxruntime: onnxruntime "
                                          r"cannot load .*NoSuchOp.*; openvino: "):  # each engine's own reason
        Predictor.load(tmp_path / "invalid.onnx", "auto")
    (tmp_path / "m.xml").write_text("<net>")
    with pytest.raises(CheckpointError, match="has no weights file m.bin"):
        Predictor.load(tmp_path / "m.xml", "openvino")
    (tmp_path / "m.bin").write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match="not a readable OpenVINO IR"):
        Predictor.load(tmp_path / "m.xml", "openvino")
    (tmp_path / "model.pkl").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a model resforge can load"):
        Predictor.load(tmp_path / "model.pkl")
    with pytest.raises(ConfigError, match="runs on onnxruntime, openvino, tensorrt, not on torch"):
        Predictor.load(onnx_file, "torch")
    with pytest.raises(ConfigError, match="onnxruntime runs a model in the precision it was exported in"):
        Predictor.load(onnx_file, "onnxruntime", precision="bf16")


def test_a_missing_backend_package_names_what_to_install(onnx_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ConfigError, match="the openvino backend needs the openvino package: pip install openvino"):
        Predictor.load(onnx_file, "openvino")


def test_tensorrt_says_plainly_when_it_is_not_there(onnx_file):
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT")
    with pytest.raises(ConfigError, match="TensorRT is not available here"):
        Predictor.load(onnx_file, "tensorrt")


def test_predict_and_eval_from_the_command_line_on_an_onnx_file(photo_run, onnx_file, tmp_path, capsys):
    run, _, test = photo_run
    assert main(["predict", str(onnx_file), str(test), "--format", "json", "--backend", "onnxruntime"]) == 0
    rows = json.loads(capsys.readouterr().out)
    torch_rows = api.predict(run, [test], backend="torch", precision="fp32")
    assert [r["top"][0]["class"] for r in rows] == [r["top"][0]["class"] for r in torch_rows]
    assert main(["eval", str(onnx_file), str(test), "--out", str(tmp_path / "ev"), "--workers", "0",
                 "--backend", "onnxruntime"]) == 0
    assert "top-1" in capsys.readouterr().out
    from_file = json.loads((tmp_path / "ev" / f"metrics_{test.name}.json").read_text())
    from_run = api.evaluate(run, test, out=tmp_path / "run", workers=0, backend="torch", precision="fp32")
    assert from_file["top1"] == from_run.top1 and from_file["confusion"] == from_run.confusion.tolist()


def test_what_cannot_work_is_refused_before_loading(photo_run, onnx_file):
    run, _, _ = photo_run
    with pytest.raises(ConfigError, match="compile applies to the torch backend"):
        Predictor.load(run, "onnxruntime", compile=True)
    with pytest.raises(ConfigError, match="batch_size must be at least 1"):
        Predictor.load(run, "torch", batch_size=0)
    p = Predictor.load(run, "torch", "cpu", "fp32")
    assert p.predict(12345)["error"].startswith("int is not an image type")
    assert p.predict([None], names=["x"])[0]["error"].startswith("NoneType is not an image type")


def test_a_record_can_be_renamed_but_keeps_its_preprocessing(photo_run, onnx_file, pixels_file, tmp_path, capsys):
    run, _, test = photo_run
    # Another input size or normalisation than the model was trained with changes every answer: refused, named.
    assert main(["predict", str(run), str(test), "--img-size", "64"]) == 2
    assert "img_size 64 (recorded: 32)" in capsys.readouterr().err
    renamed = Predictor.load(onnx_file, "onnxruntime", metadata={"classes": "x,y,z", "img_size": 32})
    assert renamed.classes == ["x", "y", "z"] and renamed.pre.img_size == 32  # the recorded value passes
    with pytest.raises(ConfigError, match=r"records the preprocessing it was trained with, and img_size 48 "
                                          r"\(recorded: 32\)"):
        Predictor.load(onnx_file, "onnxruntime", metadata={"img_size": 48})
    with pytest.raises(ConfigError, match=r"mean 0.5,0.5,0.5 \(recorded: [0-9.,]+\)"):
        Predictor.load(run, "torch", metadata={"mean": [0.5, 0.5, 0.5]})
    pixels = pixels_file
    with pytest.raises(ConfigError, match="does its own preprocessing: only its class names and image formats"):
        Predictor.load(pixels, "onnxruntime", metadata={"img_size": 32})  # even the recorded value
    proto = onnx.load(str(pixels))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare-px.onnx"))
    with pytest.raises(CheckpointError, match="takes uint8 input without a resforge record"):
        Predictor.load(tmp_path / "bare-px.onnx", "onnxruntime", metadata={"classes": "a,b,c"})


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n0 0 moveto 8 8 lineto stroke\nshowpage\n"


def encoded(image, fmt):
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def test_files_decode_only_in_the_records_formats(photo_run, onnx_file):
    run, _, _ = photo_run
    jpeg, png = (encoded(Image.new("RGB", (40, 40), "red"), fmt) for fmt in ("JPEG", "PNG"))
    p = Predictor.load(onnx_file, "onnxruntime")
    assert p.info.formats == ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"]  # the record's: read from the file
    rows = p.predict([EPS, jpeg, png])  # PIL's EPS plugin would hand the file to Ghostscript: never tried
    assert rows[0]["error"] == "not an image in a format accepted here (JPEG, PNG, WEBP, BMP, TIFF, GIF)"
    assert "top" in rows[1] and "top" in rows[2]
    only_png = Predictor.load(run, "torch", "cpu", metadata={"formats": "png"})
    assert only_png.info.formats == ["PNG"] and only_png.info.to_dict()["formats"] == ["PNG"]
    rows = only_png.predict([jpeg, png])
    assert rows[0]["error"] == "not an image in a format accepted here (PNG)" and "top" in rows[1]
    with pytest.raises(ConfigError, match="not formats PIL opens: PSX"):
        Predictor.load(run, "torch", "cpu", metadata={"formats": "png,psx"})


def test_an_elongated_image_is_refused_before_decoding_for_either_preprocessing(photo_run, pixels_file):
    run, _, _ = photo_run
    long = encoded(Image.new("L", (1, 2000)), "PNG")  # its short side resized to 36: 36 x 72,000 pixels
    for p in (Predictor.load(run, "torch", "cpu"), Predictor.load(pixels_file, "onnxruntime")):
        assert "top" in p.predict(long)  # a Predictor's own caller decides, by default
        p.max_aspect = 20
        for image, size in ((long, "1x2000"), (np.zeros((1, 2000, 3), np.uint8), "2000x1"),
                            (Image.new("RGB", (2000, 1)), "2000x1")):
            assert p.predict(image)["error"] == f"{size} pixels is over the aspect-ratio limit of 20 (its long " \
                                                "side is resized in proportion to its short side)"
        assert "top" in p.predict(encoded(Image.new("RGB", (200, 10)), "PNG"))  # 20:1 passes


def test_a_foreign_graph_of_any_size_asks_for_its_size(photo_run, tmp_path):
    run, _, test = photo_run
    dynamic = api.export(run, "onnx", tmp_path / "dyn.onnx", dynamic_batch=True).path
    proto = onnx.load(str(dynamic))
    del proto.metadata_props[:]
    for d in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "side"  # a graph that takes any size
    onnx.save(proto, str(tmp_path / "any.onnx"))
    with pytest.raises(CheckpointError, match=r"input size \(--img-size; the graph's input size is not fixed\)"):
        Predictor.load(tmp_path / "any.onnx", "onnxruntime", metadata={"classes": "a,b,c"})
    p = Predictor.load(tmp_path / "any.onnx", "onnxruntime", metadata={"classes": "a,b,c", "img_size": 32})
    assert p.pre.img_size == 32 and len(p.predict(scan_images([test])[:3])) == 3


def test_openvino_predictors_freed_in_load_order_leave_signals_safe(onnx_file):
    """Each OpenVINO Core swapped the thread's signal stack and put back its predecessor's when freed:
    two freed in load order left a freed stack in place, and the next handled signal crashed the
    process (the test suite died so at a child's SIGCHLD). Run in a child: the failure is a crash."""
    import subprocess

    script = f"""
import gc, os, signal
from resforge.runtime.predictor import Predictor
a = Predictor.load({str(onnx_file)!r}, "openvino", precision="fp32")
b = Predictor.load({str(onnx_file)!r}, "openvino", precision="fp32")
del a; gc.collect(); del b; gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: None)
for _ in range(200):
    os.kill(os.getpid(), signal.SIGUSR1)
    junk = [list(range(100)) for _ in range(2000)]
print("survived")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "survived", (r.returncode, r.stderr[-2000:])


def test_auto_device_is_the_cpu_for_an_engine_that_cannot_use_the_gpu(monkeypatch):
    """On a GPU machine, onnxruntime without its CUDA provider and OpenVINO run on the CPU when no device is named
    (an H200 with the plain onnxruntime wheel refused `--backend onnxruntime` before)."""
    import onnxruntime

    from resforge.runtime.build import backend_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert backend_device("onnxruntime", "auto") == torch.device("cpu")
    assert backend_device("openvino", "auto") == torch.device("cpu")
    assert backend_device("onnxruntime", "cpu") == torch.device("cpu")
