"""`optimize` end to end on a tiny run: every variant measured, the report with its Pareto plot, the pick,
a kill and a resume, bad targets; a detector's and a segmenter's chains, scored in AP@.5 and mIoU."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import DETECT_TINY, SEGMENT_TINY, make_detection_folder, make_image_folder, make_mask_folder

import resforge
from resforge import timing
from resforge.cli import main
from resforge.compress import quantize as quantize_module
from resforge.compress.optimize import Target, _pick
from resforge.evaluation.plots import pareto_front
from resforge.models import load_model
from resforge.runtime.predictor import Predictor

TINY = {"model": "resnet18", "width": 0.25, "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off"}


def test_targets_parse_with_their_units():
    assert Target.parse("latency=5ms") == Target("latency", 5.0)
    assert Target.parse("latency=0.01s") == Target("latency", 10.0)
    assert Target.parse("size=512kb") == Target("size", 0.512)
    assert Target.parse("macs=300M") == Target("macs", 0.3)
    assert Target.parse("accuracy-drop=1.0") == Target("accuracy-drop", 1.0)
    assert Target.parse("latency=.5ms") == Target("latency", 0.5)
    assert Target.parse("size=1e3KB") == Target("size", 1.0)
    for bad in ("speed=5ms", "latency=5kg", "latency=-1ms", "latency", "", "latency=1.2.3ms", "latency=.ms",
                "latency=infms", "latency=nan", "size=1e400MB", "size=1e306GB", "macs=0G"):
        with pytest.raises(resforge.ConfigError, match="--target"):
            Target.parse(bad)


def test_a_bad_target_is_one_line_before_anything_is_read(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "no-run"), "--target", "latency=1.2.3ms"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resforge: error: --target takes") and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_the_pick_is_the_most_accurate_within_the_target_or_the_closest_miss():
    variants = [{"name": "fp32", "backend": "torch", "dtype": "fp32", "score": 0.90, "drop": 0.0,
                 "latency_ms": 10.0, "file_mb": 40.0},
                {"name": "int8", "backend": "onnxruntime", "dtype": "int8", "score": 0.89, "drop": 1.0,
                 "latency_ms": 3.0, "file_mb": 10.0},
                {"name": "pruned", "backend": "onnxruntime", "dtype": "int8", "score": 0.86, "drop": 4.0,
                 "latency_ms": 1.5, "file_mb": 5.0}]
    within = _pick(variants, Target("latency", 5.0))
    assert within["variant"] == "int8 onnxruntime" and "(1.00 pt lost against fp32)" in within["line"]
    assert _pick(variants, Target("accuracy-drop", 2.0))["variant"] == "int8 onnxruntime"  # the fastest within
    miss = _pick(variants, Target("size", 1.0))
    assert not miss["met"] and miss["variant"] == "pruned onnxruntime" and "+4 over" in miss["line"]
    assert pareto_front([(v["latency_ms"], v["score"]) for v in variants]) == [2, 1, 0]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimize")
    data = make_image_folder(root / "shapes", classes=("a", "b", "c"), per_class=16, size=20)
    run = resforge.train(data, progress=False, project=str(root / "runs"), name="src", epochs=1, **TINY)
    return run["run_dir"], root


class EngineClock:
    """A clock that moves only while a model runs, by a known time for each engine and batch size: the
    figures every variant should report are known in advance, whatever the machine."""

    SECONDS = {"torch": 0.05, "onnxruntime": 0.04, "openvino": 0.025}  # at batch 1; 4.75 times that at 16

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def seconds(self, backend, batch):
        return self.SECONDS[backend] * (3 + batch) / 4

    def run(self, backend, batch):
        self.now += self.seconds(backend, batch)


def test_a_killed_optimize_resumes_where_it_stopped(source, monkeypatch):
    run_dir, root = source
    project = root / "killed"
    script = textwrap.dedent(f"""
        import os, signal, resforge
        def kill(event, trainer):
            if event == "epoch_end" and trainer.epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        import resforge.compress.runs as runs
        real = runs.prune
        runs.prune = lambda *a, **k: real(*a, callbacks=[kill], **k)
        resforge.optimize({run_dir!r}, "size=100MB", project={str(project)!r}, name="opt", epochs=2, calib=16,
                          duration=0.2, progress=False)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    state = json.loads((project / "opt" / "optimize.json").read_text())
    assert list(state["stages"]) == ["baseline", "int8"]  # the pruning fine-tune was cut after its first epoch
    assert (project / "opt" / "pruned" / "last.ckpt").is_file()
    clock = EngineClock()
    monkeypatch.setattr(timing, "clock", clock)
    real = Predictor.__call__
    monkeypatch.setattr(Predictor, "__call__", lambda self, x: clock.run(self.backend, len(x)) or real(self, x))
    # quantize's choice of activation type times onnxruntime sessions of its own, which this clock would never
    # see move (that choice is test_quantize's): u8 is given as the faster here
    monkeypatch.setattr(quantize_module, "_images_per_second", lambda path, x: 2.0 if "u8" in Path(path).name else 1.0)
    assert main(["optimize", run_dir, "--target", "size=100MB", "--project", str(project), "--name", "opt",
                 "--epochs", "2", "--calib", "16", "--duration", "0.2"]) == 0
    state = json.loads((project / "opt" / "optimize.json").read_text())
    assert list(state["stages"]) == ["baseline", "int8", "pruned", "pruned-int8", "lowrank"]
    metrics = (project / "opt" / "pruned" / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in metrics[1:]] == ["1", "2"]  # resumed at epoch 2, not started again
    # Every variant measured alike, in the report with its Pareto plot, and the pick named.
    variants = [v for stage in state["stages"].values() for v in stage]
    assert {(v["name"], v["backend"]) for v in variants} == {
        ("fp32", "torch"), ("fp32", "onnxruntime"), ("fp32", "openvino"), ("int8", "onnxruntime"),
        ("int8", "openvino"), ("pruned", "onnxruntime"), ("pruned", "openvino"), ("pruned-int8", "onnxruntime"),
        ("pruned-int8", "openvino"), ("lowrank", "onnxruntime"), ("lowrank", "openvino")}
    for v in variants:  # bench's figures, each variant on its own engine, and its own file and network
        latency = pytest.approx(1000 * clock.seconds(v["backend"], 1))
        assert v["latency_ms"] == latency and v["latency_p99_ms"] == latency
        assert v["img_per_s_16"] == pytest.approx(16 / clock.seconds(v["backend"], 16))
        path = Path(v["path"])
        files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
        if path.suffix == ".safetensors":
            files.append(path.with_suffix(".json"))
        assert v["file_mb"] == pytest.approx(sum(f.stat().st_size for f in files) / 1e6)
    for v in variants[:3]:  # the baseline: the run's own network, on three engines
        assert v["params"] == sum(p.numel() for p in load_model(run_dir)[0].parameters())
    by = {(v["name"], v["backend"]): v for v in variants}
    assert by["pruned", "onnxruntime"]["gmacs"] < 0.6 * by["fp32", "torch"]["gmacs"]
    assert by["int8", "onnxruntime"]["file_mb"] < 0.5 * by["fp32", "onnxruntime"]["file_mb"]
    assert state["pick"]["met"]  # every tiny variant is under 100 MB: the most accurate is picked
    assert by[tuple(state["pick"]["variant"].split())]["score"] == max(v["score"] for v in variants)
    report = (project / "opt" / "report.md").read_text()
    assert state["pick"]["line"] in report and report.count("\n| ") == len(variants) + 1
    page = (project / "opt" / "report.html").read_text()
    assert "data:image/png;base64," in page and "src='http" not in page and "<link" not in page  # self-contained
    assert (project / "opt" / "pareto.png").stat().st_size > 10_000


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_dense_run_goes_through_its_own_chain_scored_in_its_own_metric(tmp_path, task):
    """A detector: fp32 on three engines, NNCF int8, pruned (and its int8), each in AP@.5 (and AP) on the run's
    validation images; a segmenter: both quantisers, in mIoU. No low-rank stage: it is for classifiers."""
    if task == "detect":
        data, options = make_detection_folder(tmp_path / "data", n=12), {**DETECT_TINY, "detector": "fasterrcnn"}
    else:
        data, options = make_mask_folder(tmp_path / "data", n=10), SEGMENT_TINY
    run = resforge.train(data, progress=False, project=str(tmp_path / "runs"), name="src", epochs=1, **options)
    state = resforge.optimize(run["run_dir"], "size=100MB", project=str(tmp_path), name="opt", epochs=1, calib=4,
                              duration=0.05, progress=False)
    assert list(state["stages"]) == ["baseline", "int8", "pruned", "pruned-int8"]
    variants = [v for stage in state["stages"].values() for v in stage]
    int8 = {"openvino"} if task == "detect" else {"onnxruntime", "openvino"}
    assert {v["backend"] for v in variants if v["dtype"] == "int8"} == int8
    by = {(v["name"], v["backend"]): v for v in variants}
    assert by["pruned", "openvino"]["gmacs"] <= 0.5 * by["fp32", "torch"]["gmacs"]  # the backbone's MACs, halved
    assert by["fp32", "onnxruntime"]["score"] == pytest.approx(by["fp32", "torch"]["score"], abs=1e-3)
    metric = "AP@.5" if task == "detect" else "mIoU"
    report = (tmp_path / "opt" / "report.md").read_text()
    assert f"| {metric} |" in report and "backbone GMACs" in report and "top-1" not in report
    if task == "detect":
        assert all(0 <= v["ap"] <= v["score"] for v in variants)  # AP@[.5:.95] never above AP@.5


def test_bad_input_writes_nothing(source, capsys):
    run_dir, root = source
    for args, message in ((["--target", "speed=1"], "--target takes"), (["--target", "size=1MB", "--budget", "0"],
                                                                          "--budget must be")):
        assert main(["optimize", run_dir, *args, "--project", str(root / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert main(["optimize", str(root / "shapes"), "--target", "size=1MB", "--project", str(root / "bad")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    # more calibration images than the training split holds: refused before a baseline is exported
    assert main(["optimize", run_dir, "--target", "size=1MB", "--calib", "100000", "--project",
                 str(root / "bad")]) == 2
    assert "fewer than the 100000 asked" in capsys.readouterr().err
    assert not (root / "bad").exists()
    before = {p.name: p.stat().st_mtime_ns for p in Path(run_dir).iterdir()}
    for project, name in ((Path(run_dir).parent, Path(run_dir).name), (run_dir, "opt")):  # the run, or inside it
        assert main(["optimize", run_dir, "--target", "size=1MB", "--project", str(project), "--name", name,
                     "--calib", "100000"]) == 2  # refused before the calibration is even checked
        assert "the run it optimizes" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in Path(run_dir).iterdir()} == before
