"""Monitoring a deployed classifier: the profile in every file, `resforge monitor`, and the server's drift."""

import json
import shutil

import httpx
import numpy as np
from helpers import browser_page, running
from prometheus_client.parser import text_string_to_metric_families

from resforge import api
from resforge.cli import main
from resforge.data.folder import scan_images
from resforge.deploy.serve import ServeOptions, create_app
from resforge.runtime.predictor import Predictor


def test_the_profile_travels_with_the_run_into_onnx_and_openvino_files(fashion_run, tmp_path):
    run, _, folders = fashion_run
    record = json.loads((run / "best.json").read_text())
    assert record["profile"]["images"] == 800 and record["profile"]["ood"]["rate"] == 0.05
    files = scan_images([folders["inverted"]])[:32]
    torch_run = Predictor.load(run, "torch", precision="fp32")
    expected = torch_run.profile.scores(torch_run.logits(files).numpy())
    for fmt, backend in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        path = api.export(run, format=fmt, out=tmp_path / f"m.{'xml' if fmt == 'openvino' else fmt}").path
        loaded = Predictor.load(path, backend, precision="fp32")
        assert loaded.profile.to_dict() == torch_run.profile.to_dict()
        rows = loaded.predict(files)
        np.testing.assert_allclose([r["ood"]["score"] for r in rows], expected, rtol=1e-3, atol=1e-3)
        assert [r["ood"]["flagged"] for r in rows] == list(loaded.profile.flagged(expected))


def test_monitor_reports_a_darkened_folder_by_name_and_passes_an_unchanged_one(fashion_run, tmp_path, capsys):
    run, _, folders = fashion_run
    same = api.monitor(run, folders["same"], out=str(tmp_path / "same"), backend="torch")
    assert same["alarms"] == [] and same["images"] == 200
    assert "No alarm." in (tmp_path / "same" / "report.md").read_text()
    assert main(["monitor", str(run), str(folders["dark"]), "--out", str(tmp_path / "dark"), "--backend",
                 "torch"]) == 0
    printed = capsys.readouterr().out
    assert "brightness moved: PSI" in printed and "contrast moved" in printed
    report = (tmp_path / "dark" / "report.md").read_text()
    assert "**Alarms:** brightness moved" in report and "| brightness |" in report
    page = (tmp_path / "dark" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 + 16 and "src=\"http" not in page
    rows = (tmp_path / "dark" / "images.csv").read_text().splitlines()
    assert len(rows) == 201 and rows[0].startswith("path,top,ood_score,flagged,brightness")


def test_a_run_without_a_profile_is_named_and_gets_one_from_its_recorded_split(fashion_run, tmp_path, capsys,
                                                                              caplog):
    run, data, folders = fashion_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    record = json.loads((old / "best.json").read_text())
    profile = record.pop("profile")
    (old / "best.json").write_text(json.dumps(record))
    assert main(["monitor", str(old), str(folders["dark"])]) == 2
    err = capsys.readouterr().err
    assert "has no monitoring profile" in err and "--profile DATA" in err and "Traceback" not in err
    assert main(["monitor", str(old), str(folders["dark"]), "--profile", str(data)]) == 2
    assert "give a folder of images to judge, or --profile" in capsys.readouterr().err
    assert main(["monitor", str(old), "--profile", str(data), "--backend", "onnxruntime"]) == 2
    assert "backend do not apply" in capsys.readouterr().err
    assert main(["monitor", str(old), "--profile", str(data)]) == 0
    made = json.loads((old / "best.json").read_text())["profile"]
    assert made["images"] == profile["images"] and made["stats"] == profile["stats"]
    np.testing.assert_allclose(made["ood"]["mahalanobis"]["threshold"], profile["ood"]["mahalanobis"]["threshold"],
                               rtol=1e-4)
    assert Predictor.load(old, "torch").profile is not None  # weights and record still match
    made["version"] = 99  # a newer resforge's profile: the model still runs, unmonitored
    (old / "best.json").write_text(json.dumps({**json.loads((old / "best.json").read_text()), "profile": made}))
    assert Predictor.load(old, "torch").profile is None
    assert "version 99" in capsys.readouterr().err + "".join(r.message for r in caplog.records)
    few = tmp_path / "few"
    few.mkdir()
    for f in scan_images([folders["dark"]])[:5]:
        shutil.copy(f, few)
    assert main(["monitor", str(run), str(few)]) == 2
    assert "5 readable image(s); drift is judged on 30 or more" in capsys.readouterr().err


def metric(url, name, **labels):
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return next((s.value for f in families for s in f.samples if s.name == name and s.labels == labels), None)


def post_all(url, files, per_request=8):
    answers = []
    for i in range(0, len(files), per_request):
        r = httpx.post(f"{url}/v1/predict", files=[("files", (f, open(f, "rb").read())) for f in
                                                   files[i:i + per_request]], timeout=60)
        assert r.status_code == 200, r.text
        answers += r.json()["predictions"]
    return answers


def test_the_servers_drift_gauges_and_monitor_route_move_with_what_it_is_shown(fashion_run):
    run, _, folders = fashion_run
    predictor = Predictor.load(run, "torch", precision="fp32")
    with running(create_app(predictor, ServeOptions(max_wait_ms=1, window=80))) as url:
        assert httpx.get(f"{url}/v1/monitor").json()["images_seen"] == 0
        answers = post_all(url, scan_images([folders["same"]])[:80])
        assert all({"score", "flagged"} == a["ood"].keys() for a in answers)
        calm = httpx.get(f"{url}/v1/monitor").json()
        assert calm["alarms"] == [] and calm["window"]["images"] == 80
        assert metric(url, "resforge_drift_alarm", signal="brightness") == 0
        answers = post_all(url, scan_images([folders["dark"]])[:80])
        flagged = sum(a["ood"]["flagged"] for a in answers)
        moved = httpx.get(f"{url}/v1/monitor").json()
        assert any(a.startswith("brightness moved") for a in moved["alarms"])
        assert metric(url, "resforge_drift_alarm", signal="brightness") == 1
        assert metric(url, "resforge_drift", signal="brightness") > metric(url, "resforge_drift_threshold",
                                                                          signal="brightness")
        assert metric(url, "resforge_ood_images_total") == moved["ood_flagged"] >= flagged > 0
    with running(create_app(predictor, ServeOptions(max_wait_ms=1, monitor=False))) as url:
        r = httpx.get(f"{url}/v1/monitor")
        assert r.status_code == 404 and "--no-monitor" in r.json()["error"]
        assert "ood" not in post_all(url, scan_images([folders["same"]])[:1])[0]


def test_the_pages_monitor_tab_shows_the_alarm_and_both_distributions_in_a_real_browser(fashion_run):
    run, _, folders = fashion_run
    predictor = Predictor.load(run, "torch", precision="fp32")
    with running(create_app(predictor, ServeOptions(max_wait_ms=1, window=60))) as url, browser_page() as page:
        post_all(url, scan_images([folders["inverted"]])[:60])
        page.goto(url)
        page.click("#tab-monitor")
        page.wait_for_selector("#signals tr[data-signal='brightness']")
        assert page.is_hidden("#try") and page.is_visible("#monitor")
        assert page.get_attribute("#signals tr[data-signal='brightness']", "class") == "alarm"
        assert "brightness moved" in page.text_content("#alarms")
        chart = page.locator("#charts figure[data-chart='brightness']")
        assert chart.locator("rect[data-series='profile']").count() == chart.locator(
            "rect[data-series='window']").count() > 3
        assert "60 images seen" in page.text_content("#window")
