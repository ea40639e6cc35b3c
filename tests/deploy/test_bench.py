"""bench: every model on every backend, measured in processes of their own, side by side."""

import json

import pytest

from resforge import ConfigError, api
from resforge.cli import main
from resforge.deploy.bench import table


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
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"]
        assert r["latency_samples"] >= 3 and r["cold_start_s"] > 0
        assert set(r["throughput"]) == set(r["end_to_end"]) == {"1", "4"}
        assert all(v > 0 for v in r["throughput"].values()) and all(v > 0 for v in r["end_to_end"].values())
        assert r["peak_rss_mb"] > 50  # a process that imported torch
    assert rows[0]["file_mb"] == pytest.approx(((run / "best.safetensors").stat().st_size +
                                                (run / "best.json").stat().st_size) / 1e6)
    assert rows[3]["file_mb"] == pytest.approx(onnx_file.stat().st_size / 1e6)
    text = table(rows, [1, 4])
    lines = text.splitlines()
    assert "b1 img/s" in lines[0] and "b4 files img/s" in lines[0] and "peak RSS MB" in lines[0]
    assert "(1.00x)" in lines[2]  # ratios are against the first row
    assert "error: " in lines[4]


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
