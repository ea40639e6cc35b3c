"""Inference on a CUDA GPU: a GPU-trained run predicted, exported and benched; CUDA graphs. Skipped where
there is no GPU (the reason is in pytest's summary)."""

import pytest
import torch
from helpers import make_image_folder

from resforge import api
from resforge.runtime.backends import TorchRunner
from resforge.runtime.predictor import Predictor

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """A tiny model trained on the GPU in bf16, and its folder of images."""
    root = tmp_path_factory.mktemp("gpu-run")
    data = make_image_folder(root / "stripes", classes=("a", "b", "c"), per_class=12, size=28, fmt="jpg")
    out = api.train(data, model="resnet18", width=0.25, small_input=True, img_size=24, batch_size=8, workers=0,
                    device="cuda", amp="bf16", epochs=2, augment="none", project=str(root / "runs"), progress=False)
    return out["run_dir"], sorted(str(f) for f in data.rglob("*.jpg"))


def test_a_gpu_run_predicts_on_the_gpu_as_on_the_cpu(gpu_run):
    run, files = gpu_run
    gpu = Predictor.load(run, "torch", "cuda", "fp32")
    assert next(gpu.runner.model.parameters()).is_cuda
    cpu = Predictor.load(run, "torch", "cpu", "fp32")
    assert abs(gpu.probabilities(files) - cpu.probabilities(files)).max() < 2e-3  # TF32 convolutions
    auto = Predictor.load(run, "auto", "cuda")
    assert auto.runner.device.type == "cuda" and auto.predict(files[0])["top"]


def test_the_export_of_a_gpu_run_passes_its_parity_gate(gpu_run, tmp_path):
    run, files = gpu_run
    exported = api.export(run, "onnx", tmp_path / "m.onnx", dynamic_batch=True)
    exported = Predictor.load(exported.path, "onnxruntime").probabilities(files)
    torch_cpu = Predictor.load(run, "torch", "cpu", "fp32").probabilities(files)
    assert abs(exported - torch_cpu).max() < 1e-4


def test_cuda_graph_replays_follow_new_inputs(gpu_run):
    run, _ = gpu_run
    model = Predictor.load(run, "torch", "cpu", "fp32").model
    eager = TorchRunner(model, torch.device("cuda"), "bf16")
    graph = TorchRunner(model, torch.device("cuda"), "bf16", cuda_graph=True)
    first, second = (torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    a, b = graph(first), graph(second)  # captured on the first, replayed on the second
    assert len(graph.graphs) == 1
    assert torch.allclose(a, eager(first), atol=1e-2) and torch.allclose(b, eager(second), atol=1e-2)
    assert not torch.allclose(a, b, atol=1e-2)
    graph(first[:1])
    assert len(graph.graphs) == 2  # one graph per batch shape


def test_bench_measures_eager_compiled_and_graphed_models_on_the_gpu(gpu_run):
    run, _ = gpu_run
    rows = []
    for compile, graph in ((False, False), (True, False), (False, True)):
        rows += api.bench([run], ["torch"], device="cuda", precision="bf16", batch_sizes=[1, 8], duration=0.2,
                          warmup=2, isolate=False, progress=False, compile=compile, cuda_graph=graph)
    assert [r.get("error") for r in rows] == [None] * 3
    assert [r["precision"] for r in rows] == ["bf16", "bf16, compiled", "bf16, CUDA graph"]
    for r in rows:
        assert r["device"] == "cuda:0" and r["peak_gpu_mb"] > 0 and set(r["throughput"]) == {"1", "8"}
    from resforge.deploy.bench import table

    assert "torch on cuda:0" in table(rows, [1, 8]) and "peak GPU MB" in table(rows, [1, 8])
