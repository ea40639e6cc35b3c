"""Structured pruning end to end on tiny models: shapes, targets, files, fine-tune, resume, bad input."""

from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_image_folder
from safetensors.torch import load_file

import resforge
from resforge.cli import main
from resforge.compress.prune import latency_steps, prune_model
from resforge.models import ResNet, load_model
from resforge.models.summary import summarize

TINY = {"model": "resnet18", "width": 0.25, "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    data = make_image_folder(root / "shapes", classes=("a", "b", "c"), per_class=16, size=20)
    run = resforge.train(data, progress=False, project=str(root / "runs"), name="src", epochs=2, **TINY)
    return run["run_dir"], root


@pytest.mark.parametrize("name,kw", [("resnet18", {}), ("resnet50", {"variant": "d", "se": True})])
def test_pruned_networks_keep_residual_coupling_and_rebuild_from_their_spec(name, kw):
    model = resforge.create_model(name, width=0.5, num_classes=4, **kw)
    before = summarize(model, 32)
    record = prune_model(model, 32, ratio=0.5)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        widths = {b.last_norm.num_features for b in stage}  # every block of a stage adds into one width
        assert len(widths) == 1 and all(w % 8 == 0 for w in widths)
    unpruned = resforge.create_model(name, width=0.5, **kw)
    assert model.layer2[0].conv1.out_channels == unpruned.layer2[0].conv1.out_channels // 2
    assert record["macs"][1] == summarize(model, 32).macs < 0.4 * before.macs
    rebuilt = ResNet(**model.spec())
    rebuilt.load_state_dict(model.state_dict())  # strict: the spec is the whole architecture
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rebuilt.eval()(x), model.eval()(x), atol=1e-5)


def test_a_macs_target_is_met(source):
    model = resforge.create_model("resnet50", width=0.5, num_classes=4)
    base = summarize(model, 32).macs
    record = prune_model(model, 32, macs=0.6)
    assert 0.45 * base < record["macs"][1] <= 0.6 * base


def test_a_latency_target_finds_the_fewest_channels_that_meet_it():
    # A fake clock: "milliseconds" proportional to the MACs, so the search is judged without the machine's speed.
    model = resforge.create_model("resnet18", width=0.5, num_classes=4)
    base = summarize(model, 32).macs
    timer = lambda net: 10 * summarize(net, 32).macs / base  # noqa: E731 - 10 ms unpruned
    found = latency_steps(model, 5.0, timer, 32)
    assert summarize(model, 32).macs == base  # the model itself is not touched
    assert found["latency_ms"][0] == 10 and found["latency_ms"][1] <= 5.0
    pruned = resforge.create_model("resnet18", width=0.5, num_classes=4)
    record = prune_model(pruned, 32, steps=found["steps"])
    assert timer(pruned) == found["latency_ms"][1] <= 5.0 and record["steps"] == found["steps"]
    slower = resforge.create_model("resnet18", width=0.5, num_classes=4)
    prune_model(slower, 32, steps=found["steps"] - 1)  # one step fewer misses it
    assert timer(slower) > 5.0


def test_prune_fine_tunes_on_the_source_split_distilled_and_saves_without_pickle(source):
    run_dir, root = source
    out = resforge.prune(run_dir, ratio=0.5, epochs=1, progress=False, project=str(root / "runs"))
    pruned = out["run_dir"]
    assert pruned.endswith("src-pruned")
    cfg = yaml.safe_load(Path(f"{pruned}/config.yaml").read_text())
    assert cfg["train"]["teacher"].endswith("src/best.safetensors")
    assert cfg["model"]["init_from"] == f"{pruned}/start.safetensors"
    assert Path(f"{pruned}/split.csv").read_text() == Path(f"{run_dir}/split.csv").read_text()
    model, meta = load_model(pruned)  # safetensors + sidecar: no pickle anywhere
    assert meta["arch"]["transforms"][0]["kind"] == "pruned" and meta["arch"]["transforms"][0]["ratio"] == 0.5
    src_model, _ = load_model(run_dir)
    assert model.layer3[0].conv1.out_channels == src_model.layer3[0].conv1.out_channels // 2
    start = load_file(f"{pruned}/start.safetensors")
    assert start["layer3.0.conv1.weight"].shape == model.layer3[0].conv1.weight.shape
    # The pruned run resumes and extends like any run.
    more = resforge.train(resume=pruned, epochs=2, progress=False)
    assert more["epochs"] == 2 and load_model(pruned)[0].spec() == model.spec()


def test_taylor_and_l1_choose_different_channels(source):
    run_dir, root = source
    picks = {}
    for importance in ("l1", "taylor"):
        out = resforge.prune(run_dir, ratio=0.5, importance=importance, epochs=1, progress=False,
                             project=str(root / "runs"), name=f"imp-{importance}", distill=False)
        picks[importance] = load_file(f"{out['run_dir']}/start.safetensors")
        assert yaml.safe_load(Path(f"{out['run_dir']}/config.yaml").read_text())["train"]["teacher"] is None
    assert picks["l1"].keys() == picks["taylor"].keys()
    assert any(not torch.equal(picks["l1"][k], picks["taylor"][k]) for k in picks["l1"] if k.endswith("conv1.weight"))


def test_cli_prune_and_its_bad_input(source, capsys):
    run_dir, root = source
    project = root / "cli-runs"
    assert main(["prune", run_dir, "--macs", "0.6", "--epochs", "1", "--project", str(project), "--workers", "0"]) == 0
    assert capsys.readouterr().out.strip().endswith("src-pruned")
    cases = [(["--ratio", "1.5"], "--ratio must lie between 0 and 1"),
             (["--macs", "0"], "--macs must lie between 0 and 1"),
             (["--latency", "0"], "--latency is milliseconds at batch 1 and must be positive"),
             (["--latency", "100000"], "within the 100000 ms asked: nothing to compress"),  # measured, any machine
             (["--latency", "1e-9"], "not the 1e-09 ms asked"),
             (["--ratio", "0.5", "--importance", "bn-scale", "--data", "/nonexistent"], "nonexistent")]
    for extra, message in cases:
        assert main(["prune", run_dir, *extra, "--project", str(project), "--name", "bad"]) == 2
        assert message in capsys.readouterr().err
        assert not (project / "bad").exists()  # no half-written run directory
    onnx = root / "m.onnx"
    onnx.write_bytes(b"not a resforge model")
    assert main(["prune", str(onnx), "--ratio", "0.5", "--project", str(project), "--name", "bad"]) == 2
    assert "holds no resforge spec" in capsys.readouterr().err and not (project / "bad").exists()


def test_bn_scale_needs_batch_norm_and_slimming_penalises_the_scales(source, tmp_path):
    gn = resforge.create_model("resnet18", width=0.25, num_classes=3, norm="groupnorm")
    with pytest.raises(resforge.ConfigError, match="no batch norm"):
        prune_model(gn, 16, ratio=0.5, importance="bn-scale")
    bn = resforge.create_model("resnet18", width=0.25, num_classes=3)
    for m in bn.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand_like(m.weight)  # distinct scales to rank
    prune_model(bn, 16, ratio=0.5, importance="bn-scale")
    assert bn.layer1[0].bn1.num_features == 8


def test_a_failed_run_removes_only_what_it_made_and_never_writes_over_its_source(source, capsys):
    run_dir, root = source
    project = root / "kept"
    victim = project / "victim"
    victim.mkdir(parents=True)
    (victim / "notes.txt").write_text("an earlier run's file")
    # --exist-ok reuses the folder; the target fails (and is printed with the digits it has): the folder stays
    assert main(["prune", run_dir, "--macs", "0.0001", "--project", str(project), "--name", "victim",
                 "--exist-ok", "--workers", "0"]) == 2
    assert "not the 0.01% asked" in capsys.readouterr().err
    assert (victim / "notes.txt").read_text() == "an earlier run's file"
    before = sorted(p.name for p in Path(run_dir).iterdir())
    runs = str(Path(run_dir).parent)
    for extra in (["--project", runs, "--name", "src", "--exist-ok"], ["--project", run_dir, "--name", "sub"]):
        assert main(["prune", run_dir, "--macs", "0.0001", "--workers", "0", *extra]) == 2  # a run that would fail
        assert "of the model it starts from: give another --name or --project" in capsys.readouterr().err
    assert sorted(p.name for p in Path(run_dir).iterdir()) == before  # the source run untouched
