"""bench: every model on every backend, measured in processes of their own, side by side."""

import json

import numpy as np
import pytest

from resforge import ConfigError, api, timing
from resforge.cli import main
from resforge.deploy.bench import PERCENTILES, table
from resforge.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def models(photo_run, tmp_path_factory):
    run, _, _ = photo_run
    return run, api.export(run, "onnx", tmp_path_factory.mktemp("bench") / "m.onnx", dynamic_batch=True).path


def test_bench_measures_models_and_backends_side_by_side(photo_run, models):
    run, onnx_file = models
    _, _, test = photo_run
    rows = api.bench([run, onnx_file], ["torch", "onnxruntime"], batch_sizes=[1, 4], duration=0.2, warmup=1,
                     images=test, progress=False)
    assert [(r["name"], r["asked"]) for r in rows] == [(run.name, "torch"), (run.name, "onnxruntime"),
                                                      ("m.onnx", "torch"), ("m.onnx", "onnxruntime")]
    bad = rows[2]  # an ONNX file cannot run on torch: said in its row, the others still measured
    assert "runs on onnxruntime, openvino, tensorrt, not on torch" in bad["error"]
    for r in (rows[0], rows[1], rows[3]):
        assert set(r["latency_ms"]) == {"p50", "p90", "p99", "p99.9"} and r["latency_samples"] >= 3
        assert set(r["throughput"]) == set(r["end_to_end"]) == {"1", "4"}
        assert r["peak_rss_mb"] > 50  # measured in a process that imported torch, not this one's figure
    assert rows[0]["file_mb"] == pytest.approx(((run / "best.safetensors").stat().st_size +
                                                (run / "best.json").stat().st_size) / 1e6)
    assert rows[3]["file_mb"] == pytest.approx(onnx_file.stat().st_size / 1e6)
    lines = table(rows, [1, 4]).splitlines()
    assert "b1 img/s" in lines[0] and "b4 files img/s" in lines[0] and "peak RSS MB" in lines[0]
    assert "error: " in lines[4]


class ModelClock:
    """A clock that moves only while the model runs: each call at batch b takes the next of `durations[b]`
    seconds, and the calls are logged as (batch, seconds). Bench's figures are then known in advance,
    whatever the machine and however its timing loop is written."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, {b: iter(d) for b, d in durations.items()}, []

    def __call__(self):
        return self.now

    def run(self, x):
        seconds = next(self.durations[len(x)])
        self.calls.append((len(x), seconds))
        self.now += seconds


def test_bench_figures_are_those_of_the_timed_calls(photo_run, monkeypatch):
    run, _, _ = photo_run
    rng = np.random.default_rng(0)
    at_batch_1 = rng.lognormal(np.log(0.01), 0.5, 1000)
    at_batch_1[::7] = 0.05  # a slow tail, so that the high percentiles are not the bulk's
    clock = ModelClock({1: at_batch_1, 4: [0.04] * 1000})
    monkeypatch.setattr(timing, "clock", clock)
    real = Predictor.__call__
    monkeypatch.setattr(Predictor, "__call__", lambda self, x: clock.run(x) or real(self, x))
    (row,) = api.bench([run], ["torch"], batch_sizes=[1, 4], duration=0.2, warmup=1, isolate=False, progress=False)
    first_at_4 = [b for b, _ in clock.calls].index(4)
    timed = np.array([s for b, s in clock.calls[:first_at_4] if b == 1][-row["latency_samples"]:])
    assert timed.sum() >= 0.2 and timed.sum() - timed[-1] < 0.2  # timed until the duration had passed, no longer
    assert row["latency_ms"] == pytest.approx({f"p{q:g}": np.percentile(timed * 1000, q) for q in PERCENTILES},
                                              rel=1e-9)
    assert row["throughput"]["1"] == pytest.approx(len(timed) / timed.sum(), rel=1e-9)
    assert row["throughput"]["4"] == pytest.approx(4 / 0.04, rel=1e-9)


def test_the_table_gives_each_rate_against_the_first_rows():
    def row(name, b1, b4):
        return {"name": name, "asked": "torch", "backend": "torch", "precision": "fp32", "cold_start_s": 0.5,
                "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p99.9": 4.0}, "throughput": {"1": b1, "4": b4},
                "file_mb": 1.0, "peak_rss_mb": 300.0}

    lines = table([row("base", 100.0, 200.0), {"name": "bad", "asked": "openvino", "error": "no"},
                   row("fast", 250.0, 100.0)], [1, 4]).splitlines()
    assert "| base | torch | fp32 | 0.50 | 1.00 | 2.00 | 3.00 | 4.00 | 100.0 (1.00x) | 200.0 (1.00x) |" in lines[2]
    assert "| bad | openvino | - | error: no |" in lines[3]
    assert "| fast | torch | fp32 | 0.50 | 1.00 | 2.00 | 3.00 | 4.00 | 250.0 (2.50x) | 100.0 (0.50x) |" in lines[4]


def test_bench_auto_says_what_it_chose(models):
    run, _ = models
    (row,) = api.bench([run], ["auto"], batch_sizes=[1, 2], duration=0.1, warmup=1, progress=False)
    assert set(row["chosen"]) == {"1", "2"} and row["asked"] == "auto"
    assert all(c.split()[0] in ("torch", "onnxruntime", "openvino") for c in row["chosen"].values())
    assert "auto: b1 " in table([row], [1, 2])


def test_bench_from_the_command_line_writes_json_and_markdown(models, tmp_path, capsys):
    _, onnx_file = models
    args = ["bench", str(onnx_file), "--backends", "onnxruntime", "--batch-sizes", "1,2", "--duration", "0.1",
            "--warmup", "1", "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| m.onnx | onnxruntime | fp32 |" in out and "warm-up 1 calls, then 0.1 s per figure" in out
    rows = json.loads((tmp_path / "b.json").read_text())
    assert rows[0]["backend"] == "onnxruntime" and (tmp_path / "b.md").read_text().strip() == out.strip()


@pytest.mark.parametrize("kwargs, message", [
    ({"backends": ["fast"]}, "backends must be among auto, torch"),
    ({"batch_sizes": [0]}, "batch sizes must be positive"),
    ({"duration": 0}, "duration must be above 0"),
    ({"threads": 0}, "threads must be a positive count"),
])
def test_bench_refuses_settings_that_cannot_work(models, kwargs, message):
    run, _ = models
    with pytest.raises(ConfigError, match=message):
        api.bench([run], **{"backends": ["torch"], **kwargs})


def test_bench_names_a_missing_model(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.onnx")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_compile_and_cuda_graphs_are_refused_where_they_cannot_apply(photo_run):
    run, _, _ = photo_run
    with pytest.raises(ConfigError, match="--cuda-graph applies to the torch backend alone"):
        api.bench([run], ["onnxruntime"], cuda_graph=True, isolate=False, progress=False)
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        api.Predictor.load(run, "torch", "cpu", cuda_graph=True)
