"""Low-rank factorisation: exact on low-rank layers, rebuilt from the sidecar, fine-tuned, exported."""

import copy

import pytest
import torch
from helpers import make_image_folder

import resforge
from resforge.cli import main
from resforge.compress.lowrank import ENERGIES, energy_rank, factorize_model, latency_energy
from resforge.models import load_model
from resforge.models.lowrank import LowRankConv, LowRankLinear
from resforge.models.summary import summarize
from resforge.models.weights import arch_record, build_from_arch

TINY = {"model": "resnet18", "width": 0.25, "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off"}


def test_energy_picks_the_fewest_singular_values():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: 64%, 93%, 100%
    assert [energy_rank(s, e) for e in (0.5, 0.9, 0.95)] == [1, 2, 3]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_layers_of_low_rank_factorise_exactly_and_rebuild_from_the_record(name):
    torch.manual_seed(0)
    model = resforge.create_model(name, width=0.5, num_classes=5).eval()
    conv, fc = model.layer3[0].conv2, model.fc
    with torch.no_grad():  # a 3x3 conv of Tucker ranks (3, 4) and a classifier of rank 2
        out_c, in_c = conv.weight.shape[:2]
        conv.weight.copy_(torch.einsum("rskl,or,is->oikl", torch.randn(4, 3, 3, 3), torch.randn(out_c, 4),
                                       torch.randn(in_c, 3)))
        fc.weight.copy_(torch.randn(5, 2) @ torch.randn(2, fc.in_features))
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    record = factorize_model(model, 32, energy=0.99999)
    assert record["ranks"] == {"layer3.0.conv2": [3, 4], "fc": [2]}  # the random, full-rank layers stay
    assert isinstance(model.layer3[0].conv2, LowRankConv) and isinstance(model.fc, LowRankLinear)
    assert torch.allclose(model(x), reference, rtol=1e-4, atol=1e-3 * reference.abs().max().item())
    assert record["macs"][1] < record["macs"][0]
    rebuilt = build_from_arch(arch_record(model), "test")
    rebuilt.load_state_dict(model.state_dict())  # strict: the record rebuilds every factor
    assert torch.equal(rebuilt.eval()(x), model(x))


def test_a_latency_target_finds_the_highest_energy_that_meets_it():
    # A fake clock: "milliseconds" proportional to the MACs, so the search is judged without the machine's speed.
    torch.manual_seed(0)
    model = resforge.create_model("resnet18", width=0.25, num_classes=4)
    base = summarize(model, 32).macs
    timer = lambda net: 10 * summarize(net, 32).macs / base  # noqa: E731 - 10 ms unfactorised
    energy, (t0, t1) = latency_energy(model, 7.0, timer, 32)
    assert summarize(model, 32).macs == base  # the model itself is not touched
    assert t0 == 10 and t1 <= 7.0 and ENERGIES[-1] <= energy < ENERGIES[0]
    factorize_model(chosen := copy.deepcopy(model), 32, energy)
    assert timer(chosen) == t1
    factorize_model(richer := copy.deepcopy(model), 32, round(energy + 0.01, 2))  # the next energy up misses it
    assert timer(richer) > 7.0
    with pytest.raises(resforge.ConfigError, match="nothing to compress"):
        latency_energy(model, 10.0, timer, 32)
    with pytest.raises(resforge.ConfigError, match="the lowest tried"):
        latency_energy(model, 0.01, timer, 32)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank")
    data = make_image_folder(root / "shapes", classes=("a", "b", "c"), per_class=16, size=20)
    run = resforge.train(data, progress=False, project=str(root / "runs"), name="src", epochs=1, **TINY)
    return run["run_dir"], root


def test_lowrank_run_fine_tunes_saves_without_pickle_and_exports(source, capsys):
    run_dir, root = source
    assert main(["lowrank", run_dir, "--energy", "0.6", "--epochs", "1", "--project", str(root / "runs")]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith("src-lowrank")
    model, meta = load_model(out)
    record = meta["arch"]["transforms"][-1]
    assert record["kind"] == "lowrank" and record["ranks"]
    assert any(isinstance(m, LowRankConv) for m in model.modules())
    exported = resforge.export(out, "onnx")  # the parity gate passes on the factorised network
    assert exported.parity.top1_agreement == 1.0
    assert main(["lowrank", out, "--energy", "0.6", "--project", str(root / "runs"), "--name", "again"]) == 2
    assert "already factorised" in capsys.readouterr().err and not (root / "runs" / "again").exists()
    assert main(["prune", out, "--ratio", "0.5", "--project", str(root / "runs"), "--name", "again"]) == 2
    assert "factorised (low-rank)" in capsys.readouterr().err and not (root / "runs" / "again").exists()
    assert main(["lowrank", run_dir, "--energy", "1.5", "--project", str(root / "runs"), "--name", "again"]) == 2
    assert "--energy must lie between 0 and 1" in capsys.readouterr().err
    cases = [(["--energy", "0.5", "--latency", "3"], "give one low-rank target"),
             (["--latency", "0"], "--latency is milliseconds at batch 1 and must be positive"),
             (["--latency", "100000"], "within the 100000 ms asked: nothing to compress"),  # measured, any machine
             (["--latency", "1e-9"], "not the 1e-09 ms asked")]
    for extra, message in cases:
        assert main(["lowrank", run_dir, *extra, "--project", str(root / "runs"), "--name", "again"]) == 2
        assert message in capsys.readouterr().err and not (root / "runs" / "again").exists()
