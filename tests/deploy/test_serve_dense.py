"""`resforge serve` for dense models: a detector answers its objects (Mask R-CNN's masks as COCO RLE) and a
segmenter its class map as a palette PNG, equal to what `predict` writes, from a run and from an exported graph;
options of another task are refused by name; the page draws the boxes and lays the map over the image."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import CHROMIUM, DETECT_TINY, SEGMENT_TINY, browser_page, make_detection_folder, make_mask_folder, running
from PIL import Image

import resforge
from resforge.cli import main
from resforge.data.masks import palette
from resforge.deploy.serve import ServeOptions, create_app
from resforge.tasks.detect_infer import predict_boxes
from resforge.tasks.segment_infer import predict_masks


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_detection_folder(tmp_path_factory.mktemp("detect") / "shapes", n=12)


@pytest.fixture(scope="module")
def detector(shapes, tmp_path_factory):
    """A tiny Mask R-CNN run and its ONNX graph."""
    project = tmp_path_factory.mktemp("detector")
    run = resforge.train(shapes, progress=False, project=str(project), name="det", epochs=1, detector="maskrcnn",
                         **DETECT_TINY)["run_dir"]
    return {"run": run, "onnx": resforge.export(run, "onnx", out=str(project / "det.onnx")).path}


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return make_mask_folder(tmp_path_factory.mktemp("segment") / "shapes", n=10)


@pytest.fixture(scope="module")
def segmenter(masks, tmp_path_factory):
    """A tiny DeepLabV3+ run and its OpenVINO IR."""
    project = tmp_path_factory.mktemp("segmenter")
    run = resforge.train(masks, progress=False, project=str(project), name="seg", epochs=1, **SEGMENT_TINY)["run_dir"]
    return {"run": run, "openvino": resforge.export(run, "openvino", out=str(project / "seg.xml")).path}


def images_of(folder, n=3):
    return [str(p) for p in sorted(Path(folder, "images").glob("*"))[:n]]


def post(url, files, **params):
    """The files as one multipart request."""
    parts = [("files", (Path(f).name, Path(f).read_bytes(), "application/octet-stream")) for f in files]
    return httpx.post(f"{url}/v1/predict", files=parts, params=params, timeout=120)


@pytest.mark.parametrize("form, backend", [("run", "torch"), ("onnx", "onnxruntime"), ("run", "openvino")])
def test_a_served_detector_answers_the_objects_predict_finds(detector, shapes, form, backend):
    """From a run or an exported file, on its own engine or another (a run's graph converted once)."""
    files = images_of(shapes)
    expected = predict_boxes(detector[form], files, conf=0.1, batch_size=1, backend=backend)
    assert sum(len(r["objects"]) for r in expected) > 0
    with running(create_app(str(detector[form]), ServeOptions(max_batch=1, backend=backend))) as url:
        body = post(url, files, conf=0.1).json()
        metadata = httpx.get(f"{url}/v1/metadata").json()
    assert (body["task"], body["backend"], metadata["task"]) == ("detect", backend, "detect")
    assert [p["name"] for p in body["predictions"]] == [Path(f).name for f in files]
    for served, row in zip(body["predictions"], expected):
        assert served["objects"] == row["objects"]  # classes, scores, boxes and the masks' RLE
        assert all("mask" in o and o["mask"]["size"] == [64, 64] for o in served["objects"])


@pytest.mark.parametrize("form, backend", [("run", "torch"), ("openvino", "openvino")])
def test_a_served_segmenter_answers_the_class_map_predict_writes(segmenter, masks, tmp_path, form, backend):
    files = images_of(masks)
    expected = predict_masks(segmenter[form], files, tmp_path / "maps")
    with running(create_app(str(segmenter[form]), ServeOptions())) as url:
        body = post(url, files).json()
        alone = httpx.post(f"{url}/v1/predict", content=Path(files[0]).read_bytes(), headers={"accept": "image/png"})
    assert (body["task"], body["backend"]) == ("segment", backend)
    for served, row in zip(body["predictions"], expected):
        written = np.asarray(Image.open(row["mask"]))
        png = Image.open(io.BytesIO(base64.b64decode(served["mask"]["data"])))
        assert png.mode == "P" and np.array_equal(np.asarray(png), written)
        assert (served["mask"]["height"], served["mask"]["width"]) == written.shape
        assert served["pixels"] == row["pixels"]
    assert alone.status_code == 200 and alone.headers["content-type"] == "image/png"
    first = np.asarray(Image.open(expected[0]["mask"]))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(alone.content))), first)


def test_options_of_another_task_are_refused_by_name(detector, segmenter, shapes, masks):
    image = Path(images_of(shapes, 1)[0]).read_bytes()
    with running(create_app(str(detector["run"]), ServeOptions(max_pixels=5000))) as url:
        topk = httpx.post(f"{url}/v1/predict", content=image, params={"topk": 3})
        png = httpx.post(f"{url}/v1/predict", content=image, headers={"accept": "image/png"})
        big = httpx.post(f"{url}/v1/predict", content=_png(100, 100))
        conf = httpx.post(f"{url}/v1/predict", content=image, params={"conf": 1.5})
    assert (topk.status_code, topk.json()["error"]) == (422, "topk applies to classifiers; this server runs a detect "
                                                             "model")
    assert png.status_code == 406 and "answers JSON" in png.json()["error"]
    assert big.status_code == 413 and "pixels" in big.json()["error"]
    assert conf.status_code == 422 and "conf must be a score from 0 to 1" in conf.json()["error"]
    with running(create_app(str(segmenter["run"]), ServeOptions())) as url:
        refused = httpx.post(f"{url}/v1/predict", content=Path(images_of(masks, 1)[0]).read_bytes(),
                             params={"conf": 0.5})
    assert (refused.status_code, refused.json()["error"]) == (422, "conf applies to detectors; this server runs a "
                                                                   "segment model")


def test_the_cli_refuses_a_detector_on_an_engine_it_cannot_run_on_before_it_serves(detector, tmp_path, capsys):
    xml = resforge.export(detector["run"], "openvino", out=str(tmp_path / "det.xml")).path
    assert main(["serve", str(xml), "--backend", "onnxruntime", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "is a detector that runs on openvino, not on onnxruntime" in err and "Traceback" not in err


def _png(w, h):
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is missing: `make test` installs it (as root)")
def test_the_page_draws_boxes_and_lays_the_class_map_over_the_image(detector, segmenter, shapes, masks):
    with running(create_app(str(detector["run"]), ServeOptions(max_wait_ms=1))) as url, browser_page() as page:
        file = images_of(shapes, 1)[0]
        objects = post(url, [file]).json()["predictions"][0]["objects"]
        assert objects, "the tiny detector finds nothing at the default confidence"
        page.goto(url)
        page.wait_for_function("document.querySelector('#model').dataset.task === 'detect'")
        page.set_input_files("#files", [file])
        canvas = page.wait_for_selector(".result canvas[data-boxes]")
        assert int(canvas.get_attribute("data-boxes")) == len(objects)
        assert [li.get_attribute("data-class") for li in page.query_selector_all(".found li")] == \
            [o["class"] for o in objects]
        assert page.text_content("#error") == ""
    with running(create_app(str(segmenter["run"]), ServeOptions(max_wait_ms=1))) as url, browser_page() as page:
        file = images_of(masks, 1)[0]
        served = post(url, [file]).json()["predictions"][0]
        page.goto(url)
        page.wait_for_function("document.querySelector('#model').dataset.task === 'segment'")
        page.set_input_files("#files", [file])
        page.wait_for_selector(".result canvas[data-overlay='drawn']")
        shown = {li.get_attribute("data-class"): float(li.get_attribute("data-share"))
                 for li in page.query_selector_all(".found li")}
        assert shown == served["pixels"]
        # every pixel half the image's colour and half its class's
        drawn = np.array(page.evaluate("""() => { const c = document.querySelector('.result canvas');
            return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }"""), np.float32)
        classes = np.asarray(Image.open(io.BytesIO(base64.b64decode(served["mask"]["data"]))))
        image = np.asarray(Image.open(file).convert("RGB"), np.float32)
        colours = palette(3)[classes].astype(np.float32)
        drawn = drawn.reshape(*classes.shape, 4)[..., :3]
        assert np.abs(drawn - (image + colours) / 2).mean() < 2


def test_a_detector_refuses_a_precision_it_does_not_run_in(detector, shapes):
    from resforge.deploy.serve.service import load_service

    refusal = "a detector runs in fp32 .its boxes are decoded in float32., not bf16"
    with pytest.raises(resforge.ConfigError, match=refusal):
        load_service(detector["run"], precision="bf16")
    with pytest.raises(resforge.ConfigError, match=refusal):
        resforge.predict(detector["run"], images_of(shapes, 1), precision="bf16")


def test_eval_runs_a_detector_run_on_the_engine_asked(detector, shapes, tmp_path, monkeypatch):
    """--backend onnxruntime on a run converts its graph as export does, and the graph answers every image."""
    from resforge.tasks import detect_infer

    engines, real = [], detect_infer.ExportedDetector.__call__
    monkeypatch.setattr(detect_infer.ExportedDetector, "__call__",
                        lambda self, images: engines.extend([self.runner.backend] * len(images)) or real(self, images))
    resforge.evaluate(detector["run"], shapes, out=str(tmp_path / "torch"))
    assert engines == []
    on_ort = resforge.evaluate(detector["run"], shapes, out=str(tmp_path / "ort"), backend="onnxruntime")
    assert len(engines) == 12 and set(engines) == {"onnxruntime"}
    by_file = resforge.evaluate(detector["onnx"], shapes, out=str(tmp_path / "file"))
    assert on_ort.metrics["map"] == by_file.metrics["map"]
