"""Training runs end to end on tiny models and tiny images: files, options, faults, resumes."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make_image_folder
from safetensors.torch import load_file

import resforge
from resforge import api
from resforge.config import build_config
from resforge.training.checkpoint import load_checkpoint
from resforge.training.rundir import new_run_dir
from resforge.training.trainer import Trainer

TINY = {"model": "resnet18", "width": 0.125, "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off",
        "epochs": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "shapes", classes=("a", "b", "c"), per_class=16,
                             size=20)


def _opts(tmp_path, **kw):
    return {**TINY, "project": str(tmp_path / "runs"), **kw}


def test_a_run_writes_its_directory(data, tmp_path):
    out = api.train(data, progress=False, **_opts(tmp_path, ema=True))
    run = tmp_path / "runs" / "resnet18-shapes"
    assert out["run_dir"] == str(run)
    for f in ("config.yaml", "classes.json", "split.csv", "metrics.csv", "best.safetensors", "best.json",
              "last.ckpt", "results.json", "report.md", "confusion_val.csv", "plots/history.png",
              "plots/confusion_val.png", "plots/predictions_val.png"):
        assert (run / f).is_file(), f
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1", "lr", "img_per_s",
                "epoch_time_s"):
        assert col in header
    assert json.loads((run / "classes.json").read_text()) == ["a", "b", "c"]
    assert "| val |" in (run / "report.md").read_text()
    # A second run with the same name gets a numbered directory, never overwriting the first.
    assert api.train(data, progress=False, **_opts(tmp_path, epochs=1))["run_dir"].endswith("resnet18-shapes-2")


def test_the_saved_model_rebuilds_from_its_sidecar_alone(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = api.train(data, progress=False, **{**_opts(tmp_path, variant="d", act="silu"), "project": "runs"})
    model, meta = resforge.models.load_model(out["run_dir"])
    assert meta["classes"] == ["a", "b", "c"] and meta["preprocess"]["img_size"] == 16
    assert meta["trained"]["run"] == str(tmp_path.resolve() / out["run_dir"])  # not relative to where it ran
    assert meta["arch"]["kwargs"]["variant"] == "d" and meta["arch"]["kwargs"]["act"] == "silu"
    state = load_file(os.path.join(out["run_dir"], "best.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_it_learns(data, tmp_path):
    out = api.train(data, progress=False, **_opts(tmp_path, epochs=8, lr=0.05, optimizer="sgd", augment="none", small_input=True))
    assert out["results"]["val"]["top1"] >= 0.75  # chance is 1/3


def test_sidecar_and_weights_torn_apart_are_detected(data, tmp_path):
    run = api.train(data, progress=False, **_opts(tmp_path, epochs=1))["run_dir"]
    other = api.train(data, progress=False, **_opts(tmp_path, epochs=1))["run_dir"]
    os.replace(os.path.join(other, "best.json"), os.path.join(run, "best.json"))
    with pytest.raises(resforge.CheckpointError, match="ids differ"):
        resforge.models.load_model(run)


KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import resforge
    from resforge import api

    def kill_mid_epoch(event, trainer):
        if event == "batch_end" and trainer.epoch == 2 and trainer.batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    def kill_during_save(obj, f, *args, **kwargs):  # the second checkpoint: half a file, then death
        kill_during_save.calls += 1
        if kill_during_save.calls == 2:
            with open(f, "wb") as fh:
                fh.write(b"PK\\x03\\x04 half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        return save(obj, f, *args, **kwargs)
    kill_during_save.calls = 0

    def kill_during_first_save(obj, f, *args, **kwargs):  # the first checkpoint: half a file, then death
        with open(f, "wb") as fh:
            fh.write(b"PK\\x03\\x04 half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_during_best_save(tensors, filename, metadata=None):  # the first best model: half a file, then death
        with open(filename, "wb") as fh:
            fh.write(b"half a safetensors file")
        os.kill(os.getpid(), signal.SIGKILL)

    mode = sys.argv[3]
    if mode == "save":
        import torch
        save = torch.save
        torch.save = kill_during_save
    elif mode == "first-save":
        import torch
        torch.save = kill_during_first_save
    elif mode == "best-save":
        import safetensors.torch
        safetensors.torch.save_file = kill_during_best_save
    api.train(sys.argv[1], progress=False, callbacks=[kill_mid_epoch] if mode == "batch" else [],
              **json.loads(sys.argv[2]))
""")

RESUMABLE = dict(epochs=4, deterministic=True, ema=True, mixup=0.4, label_smoothing=0.1, drop_rate=0.2,
                 augment="strong", warmup_epochs=1)


def test_sigkill_mid_epoch_then_resume_ends_with_the_same_weights(data, tmp_path):
    straight = api.train(data, progress=False, **_opts(tmp_path, name="straight", **RESUMABLE))
    opts = _opts(tmp_path, name="killed", **RESUMABLE)
    r = subprocess.run([sys.executable, "-c", KILLER, str(data), json.dumps(opts), "batch"], capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    run = tmp_path / "runs" / "killed"
    assert load_checkpoint(run / "last.ckpt")["epoch"] == 2
    resumed = api.train(resume=run, progress=False)
    assert resumed["epochs"] == 4
    a = load_checkpoint(os.path.join(straight["run_dir"], "last.ckpt"))
    b = load_checkpoint(run / "last.ckpt")
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(data, tmp_path):
    opts = _opts(tmp_path, name="torn", epochs=3)
    r = subprocess.run([sys.executable, "-c", KILLER, str(data), json.dumps(opts), "save"], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "torn"
    assert load_checkpoint(run / "last.ckpt")["epoch"] == 1
    assert api.train(resume=run, progress=False)["epochs"] == 3
    assert not list(run.glob(".*.tmp"))  # the torn temp file was cleared on resume


@pytest.mark.parametrize("mode", ["first-save", "best-save"])
def test_sigkill_during_the_first_save_leaves_a_run_that_resumes(data, tmp_path, mode):
    """Killed while writing the first checkpoint (or best model): no last.ckpt, temp files left behind.
    --resume starts the run again from its config.yaml and cleans up."""
    opts = _opts(tmp_path, name="first", epochs=2)
    r = subprocess.run([sys.executable, "-c", KILLER, str(data), json.dumps(opts), mode], capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    run = tmp_path / "runs" / "first"
    assert not (run / "last.ckpt").exists() and list(run.glob(".*.tmp"))
    if mode == "first-save":  # metrics.csv follows the checkpoint: no row for an epoch that was not saved
        assert not (run / "metrics.csv").exists()
    (run / "plots").mkdir(exist_ok=True)
    (run / "plots" / ".history.png.x1.tmp").write_bytes(b"half a plot")
    out = api.train(resume=run, progress=False)
    assert out["epochs"] == 2 and len((run / "metrics.csv").read_text().splitlines()) == 3
    assert not list(run.rglob(".*.tmp"))
    resforge.models.load_model(run)


def test_ctrl_c_before_the_first_checkpoint_says_what_resume_will_do(data, tmp_path, caplog):
    def interrupt(event, trainer):
        if event == "batch_end" and trainer.batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.train(data, progress=False, callbacks=[interrupt], **_opts(tmp_path, name="early", epochs=2))
    run = tmp_path / "runs" / "early"
    assert "resforge train --resume" in caplog.text and "starts the run again from its config.yaml" in caplog.text
    assert api.train(resume=run, progress=False)["epochs"] == 2  # what the message said is true


def test_resume_keeps_the_recorded_split(tmp_path):
    """Five images of a class deleted, five new ones added: resume trains and validates on the split it
    recorded, so no image it trained on moves into validation."""
    import csv

    folder = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=12, size=20)
    api.train(folder, progress=False, **_opts(tmp_path, name="r", epochs=1))
    run = tmp_path / "runs" / "r"
    before = {(row["split"], row["path"]) for row in csv.DictReader(open(run / "split.csv"))}
    train_a = sorted(p for s, p in before if s == "train" and p.startswith("a/"))
    for rel in train_a[:5]:
        (folder / rel).unlink()
    make_image_folder(tmp_path / "more", classes=("a",), per_class=5, size=20, seed=3)
    added = []
    for f in sorted((tmp_path / "more" / "a").iterdir()):
        f.rename(folder / "a" / f"new-{f.name}")
        added.append(f"a/new-{f.name}")
    assert api.train(resume=run, epochs=2, progress=False)["epochs"] == 2
    after = {(row["split"], row["path"]) for row in csv.DictReader(open(run / "split.csv"))}
    assert after == before - {("train", p) for p in train_a[:5]}
    assert not any("new-" in p for _, p in after)
    skipped = {row["path"]: row["reason"] for row in csv.DictReader(open(run / "skipped.csv"))}
    assert sorted(p for p, r in skipped.items() if "added since the run started" in r) == added
    assert sorted(p for p, r in skipped.items() if "no longer in the folder" in r) == train_a[:5]


def test_resume_without_its_best_model_rewrites_it_from_the_checkpoint(data, tmp_path, caplog):
    api.train(data, progress=False, **_opts(tmp_path, name="nobest", epochs=1))
    run = tmp_path / "runs" / "nobest"
    (run / "best.safetensors").unlink()
    out = api.train(resume=run, epochs=2, progress=False)
    assert out["epochs"] == 2 and "rewritten from last.ckpt (epoch 1)" in caplog.text
    resforge.models.load_model(run)


def test_resume_when_the_best_model_is_lost_forgets_it_and_completes(data, tmp_path, caplog):
    api.train(data, progress=False, **_opts(tmp_path, name="lost", epochs=2))
    run = tmp_path / "runs" / "lost"
    state = load_checkpoint(run / "last.ckpt")
    state["best"] = {**state["best"], "epoch": 1}  # as if epoch 1 had been the best and its file were gone
    torch.save(state, run / "last.ckpt")
    (run / "best.safetensors").unlink()
    out = api.train(resume=run, epochs=3, progress=False)
    assert out["epochs"] == 3 and out["best_epoch"] == 3 and "that model is lost" in caplog.text
    assert resforge.models.load_model(run)[1]["trained"]["epoch"] == 3


def test_a_corrupt_checkpoint_is_named_as_such(data, tmp_path):
    api.train(data, progress=False, **_opts(tmp_path, name="bad", epochs=1))
    run = tmp_path / "runs" / "bad"
    (run / "last.ckpt").write_bytes((run / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(resforge.CheckpointError) as e:
        api.train(resume=run, epochs=2, progress=False)
    assert "is corrupt or not a resforge checkpoint" in str(e.value) and "weights_only" not in str(e.value)


def test_two_processes_cannot_train_one_run_at_once(data, tmp_path):
    from resforge.training.checkpoint import RunLock

    api.train(data, progress=False, **_opts(tmp_path, name="busy", epochs=1))
    run = tmp_path / "runs" / "busy"
    held = RunLock(run)
    try:
        with pytest.raises(resforge.CheckpointError, match=f"being trained by another process \\(pid {os.getpid()}\\)"):
            api.train(resume=run, epochs=2, progress=False)
    finally:
        held.release()
    assert api.train(resume=run, epochs=2, progress=False)["epochs"] == 2  # free again once released


def test_more_workers_than_cores_are_capped(data, tmp_path, caplog):
    from resforge.data.loader import resolve_workers
    from resforge.device import cpu_cores

    cfg = build_config("fast", overrides={**_opts(tmp_path), "data.root": str(data), "workers": cpu_cores() + 5,
                                          "cache": "off"})
    t = Trainer(cfg, progress=False)
    assert t.train_loader.num_workers == t.val_loader.num_workers == cpu_cores()
    assert f"data.workers {cpu_cores() + 5} is more than the {cpu_cores()} CPU core(s)" in caplog.text
    assert resolve_workers(-1) == max(0, min(8, cpu_cores() - 1)) and resolve_workers(0) == 0
    # decoded images in memory: on a machine with few cores the model keeps every core
    assert resolve_workers(-1, cached=True) == (0 if cpu_cores() < 4 else max(0, min(8, cpu_cores() - 1)))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path):
    def poison(event, trainer):
        if event == "batch_end" and trainer.epoch == 1 and trainer.batch == 1:
            with torch.no_grad():
                trainer.model.fc.weight.fill_(math.nan)

    with pytest.raises(resforge.TrainingError, match=r"nan at epoch 2, batch 3.*last\.ckpt \(epoch 1\)"):
        api.train(data, progress=False, callbacks=[poison], **_opts(tmp_path, name="nan", epochs=3))
    state = load_checkpoint(tmp_path / "runs" / "nan" / "last.ckpt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_early_stopping_then_extending_the_stopped_run(data, tmp_path):
    out = api.train(data, progress=False, **_opts(tmp_path, name="stop", epochs=10, lr=1e-9, patience=2,
                                                   schedule="constant"))
    assert out["stopped_early"] and out["epochs"] == 3
    state = load_checkpoint(tmp_path / "runs" / "stop" / "last.ckpt")
    assert state["finished"]
    more = api.train(resume=tmp_path / "runs" / "stop", epochs=4, progress=False)
    assert more["epochs"] == 4
    # Now it has reached its length: going on needs a larger --epochs.
    with pytest.raises(resforge.ConfigError, match="already trained 4 epochs"):
        api.train(resume=tmp_path / "runs" / "stop", progress=False)


@pytest.mark.parametrize("keep,kept", [("best", 1), ("last", 3)])
def test_keep_chooses_the_best_rated_or_the_last_epoch(data, tmp_path, monkeypatch, keep, kept):
    monkeypatch.setattr(Trainer, "_score", lambda self, row, prefix: -row["epoch"])  # each epoch rated worse
    out = api.train(data, progress=False, **_opts(tmp_path, name=keep, epochs=3, keep=keep, patience=5))
    assert out["best_epoch"] == kept
    run = tmp_path / "runs" / keep
    assert json.loads((run / "best.json").read_text())["trained"]["epoch"] == kept
    assert f"{keep} epoch {kept} " in (run / "report.md").read_text()
    with pytest.raises(resforge.ConfigError, match="keep"):
        api.train(data, progress=False, **_opts(tmp_path, keep="first"))


def test_resume_refuses_to_change_the_experiment(data, tmp_path):
    api.train(data, progress=False, **_opts(tmp_path, name="fixed", epochs=1))
    with pytest.raises(resforge.ConfigError, match="optim.lr cannot change when resuming"):
        api.train(resume=tmp_path / "runs" / "fixed", lr=0.5, progress=False)


def _trainer(data, tmp_path, **kw):
    return Trainer(build_config(overrides={"data.root": str(data), **_opts(tmp_path, **kw)}),
                   progress=False)


def test_options_reach_the_loop(data, tmp_path):
    t = _trainer(data, tmp_path, label_smoothing=0.2, accum_steps=2, freeze="stem,layer1", backbone_lr_mult=0.5,
                 ema=True, amp="bf16", lr=0.1)
    assert t.stepper.criterion.label_smoothing == 0.2
    assert t.steps_per_epoch == math.ceil(len(t.train_loader) / 2)
    assert sorted({g["lr"] for g in t.stepper.optimizer.param_groups}) == [0.05, 0.1]
    assert t.amp_dtype == torch.bfloat16 and t.ema is not None
    assert t.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = _trainer(data, tmp_path, channels_last=False, amp="off")
    assert not plain.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.amp_dtype is None
    before = t.model.layer1[0].conv1.weight.clone()
    t.run_dir = tmp_path / "opts"
    t.run_dir.mkdir()
    t.cfg.train.epochs = 1
    t.fit()
    assert torch.equal(before, t.model.layer1[0].conv1.weight)  # frozen
    assert t.step == t.steps_per_epoch


def test_l1_and_clipping_change_the_update(data, tmp_path):
    """L1 pulls weights towards zero; clipping the gradient norm shortens every step."""
    def run(**kw):
        t = _trainer(data, tmp_path, epochs=1, deterministic=True, lr=0.05, optimizer="sgd", momentum=0.0,
                     weight_decay=0.0, augment="none", **kw)
        start = {k: v.clone() for k, v in t.model.state_dict().items()}
        t.run_dir = tmp_path / f"u{len(kw)}{sorted(kw)}"
        t.run_dir.mkdir()
        t.fit()
        return start, {k: v for k, v in t.model.state_dict().items()}

    start, base = run()
    _, l1 = run(l1=1e-3)
    _, clipped = run(clip_grad=1e-3)
    convs = [k for k in start if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert sum(l1[k].abs().sum() for k in convs) < sum(base[k].abs().sum() for k in convs)
    moved = sum((base[k] - start[k]).norm() for k in convs)
    moved_clipped = sum((clipped[k] - start[k]).norm() for k in convs)
    assert moved_clipped < 0.1 * moved  # 4 steps of at most lr x 1e-3 each


def test_dataset_normalisation_is_measured_and_recorded(data, tmp_path):
    t = _trainer(data, tmp_path, normalize="dataset")
    assert t.pre.mean != list(resforge.data.transforms.IMAGENET_MEAN)
    assert all(0 < m < 1 for m in t.pre.mean) and all(0 < s < 0.6 for s in t.pre.std)


def test_no_cuda_device_is_a_clear_error(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(resforge.ConfigError, match="no CUDA device"):
        _trainer(data, tmp_path, device="cuda")


class FakeClock:
    """Seconds that pass only when the test says so: a budget test independent of the machine's speed."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _timed_run(data, tmp_path, monkeypatch, step_seconds, val_seconds=3.0, **kw):
    """Train under a fake clock: each optimiser step of epoch e (from 0) takes step_seconds(e), each
    validation val_seconds."""
    from resforge.training import budget

    clock = FakeClock()
    monkeypatch.setattr(budget, "clock", clock)
    lrs = []

    def tick(event, trainer):
        if event == "batch_end":
            clock.now += step_seconds(trainer.epoch)
            lrs.append(trainer.stepper.optimizer.param_groups[-1]["lr"])
        elif event == "epoch_end":
            clock.now += val_seconds

    out = api.train(data, progress=False, callbacks=[tick], **_opts(tmp_path, **kw))
    return out, lrs, clock


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """Enough images for 12 steps an epoch at batch 8."""
    return make_image_folder(tmp_path_factory.mktemp("wide") / "shapes", classes=("a", "b", "c"), per_class=40,
                             size=20)


def test_time_limit_fits_the_epochs_and_completes_the_schedule(wide_data, tmp_path, monkeypatch):
    out, lrs, clock = _timed_run(wide_data, tmp_path, monkeypatch, lambda epoch: 1.0, name="timed", epochs=500,
                                 time_limit=1.0, warmup_epochs=0.5, lr=0.01)
    assert 3 <= out["epochs"] < 500 and not out["stopped_early"]
    # 60 s at 1 s a step and 3 s a validation: 12 + 3 per epoch, so four whole epochs fit.
    assert out["epochs"] == 4 and len(lrs) == 48
    assert clock.now - 1000 <= 60
    assert max(lrs) == pytest.approx(0.01, rel=0.02) and lrs[-1] < 0.01 * 0.02  # the decay ends with the budget
    assert all(a >= b for a, b in zip(lrs[6:], lrs[7:]))  # after the warm-up, only down: no restart, no jump
    assert load_checkpoint(tmp_path / "runs" / "timed" / "last.ckpt")["config"]["train"]["epochs"] == 4


def test_time_limit_cuts_a_slower_epoch_and_still_ends_the_decay(wide_data, tmp_path, monkeypatch):
    """The second epoch runs at half the pace of the first: the plan shrinks within it, and the epoch
    in which the budget runs out is cut there, with the lr at the end of its decay."""
    out, lrs, clock = _timed_run(wide_data, tmp_path, monkeypatch, lambda epoch: 1.0 if epoch == 0 else 2.0,
                                 name="slower", epochs=500, time_limit=1.0, lr=0.01, warmup_epochs=0.5)
    # 15 s for the first epoch; then 27 s an epoch: one more whole, and 7 steps of the third.
    assert out["epochs"] == 3 and 12 + 12 + 5 <= len(lrs) <= 12 + 12 + 8
    assert 57 <= clock.now - 1000 <= 62
    assert lrs[-1] < 0.01 * 0.05
    assert all(a >= b for a, b in zip(lrs[6:], lrs[7:]))  # after the warm-up (6 steps), only down
    rows = out["history"]
    assert rows[-1]["train_images"] < rows[0]["train_images"]  # the last epoch was cut


def test_finetune_from_a_torchvision_checkpoint_served_over_http(data, tmp_path, http_root, monkeypatch):
    """A 1000-class torchvision checkpoint, fetched by URL, fine-tuned on 3 classes with frozen early stages."""
    import torchvision

    root, base = http_root
    monkeypatch.setenv("RESFORGE_CACHE", str(tmp_path / "cache"))
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), root / "resnet18-tv.pth")
    out = api.train(data, recipe="finetune", pretrained=f"{base}/resnet18-tv.pth", progress=False,
                    **_opts(tmp_path, name="ft", width=1.0, img_size=32, small_input=False, epochs=1))
    state = load_checkpoint(tmp_path / "runs" / "ft" / "last.ckpt")["model"]
    assert state["fc.weight"].shape == (3, 512)
    for k in ("conv1.weight", "layer1.0.conv1.weight", "layer1.1.bn2.running_mean"):  # frozen, BN stats too
        assert torch.equal(state[k], ref.state_dict()[k]), k
    assert not torch.equal(state["layer3.0.conv1.weight"], ref.state_dict()["layer3.0.conv1.weight"])
    assert load_file(os.path.join(out["run_dir"], "best.safetensors"))["fc.weight"].shape == (3, 512)


def test_resume_cannot_shorten_below_what_was_trained(data, tmp_path):
    api.train(data, progress=False, **_opts(tmp_path, name="short", epochs=2))
    with pytest.raises(resforge.ConfigError, match="already trained 2 epochs"):
        api.train(resume=tmp_path / "runs" / "short", epochs=1, progress=False)


def test_resume_refuses_a_folder_whose_classes_changed(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=8, size=20)
    api.train(folder, progress=False, **_opts(tmp_path, name="r", epochs=1))
    make_image_folder(folder, classes=("c",), per_class=8, size=20)
    with pytest.raises(resforge.DataError, match="classes .* changed"):
        api.train(resume=tmp_path / "runs" / "r", epochs=2, progress=False)


def test_run_dirs_are_claimed_and_numbered(tmp_path):
    cfg = build_config(overrides={"data.root": "x", "project": str(tmp_path), "name": "group/run"})
    assert new_run_dir(cfg) == (tmp_path / "group" / "run", True)
    assert new_run_dir(cfg) == (tmp_path / "group" / "run-2", True)
    cfg.train.exist_ok = True
    assert new_run_dir(cfg) == (tmp_path / "group" / "run", False)  # reused: not this run's to remove


def test_time_limit_holds_when_each_epoch_is_one_step(wide_data, tmp_path, monkeypatch):
    """No step but an epoch's first: the pace is taken from those (a run of a few large batches, as detection's
    tiles give), so the budget still plans the run instead of running its default epochs."""
    out, lrs, clock = _timed_run(wide_data, tmp_path, monkeypatch, lambda epoch: 2.0, name="one-step", epochs=500,
                                 time_limit=1.0, lr=0.01, batch_size=96)
    assert len(lrs) == out["epochs"]  # one step an epoch
    # 60 s at 2 s a step and 3 s a validation: 12 epochs fit
    assert 11 <= out["epochs"] <= 12 and clock.now - 1000 <= 61
    assert lrs[-1] < 0.01 * 0.1  # the decay ends with the budget
