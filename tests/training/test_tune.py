"""`resforge tune`: Optuna trials as training runs, pruning from per-epoch validation, resume after a kill,
and a best config that `train --config` takes."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from helpers import cli_flags, make_image_folder

from resforge import ConfigError, DataError, api
from resforge.cli import main
from resforge.config import build_config
from resforge.training import tune
from resforge.training.tune import ReportEpochs

TINY = {"model": "resnet18", "width": 0.125, "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off",
        "epochs": 2}
FLAGS = cli_flags(TINY)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("tune") / "shapes", classes=("a", "b", "c"), per_class=10,
                             size=20)


def test_a_search_writes_its_study_summary_plots_and_a_best_config_train_takes(data, tmp_path, capsys):
    args = ["tune", str(data), "--trials", "3", "--space", "lr,label_smoothing", "--pruner", "none",
            "--search-seed", "0", "--project", str(tmp_path), "--name", "s", *FLAGS]
    assert main(args) == 0
    out = tmp_path / "s"
    assert capsys.readouterr().out.strip() == str(out / "summary.md")
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and len({t.params["lr"] for t in done}) == 3  # three different samples
    for t in done:  # each trial is a run of its own, trained with its sampled values
        cfg = yaml.safe_load((Path(t.user_attrs["run_dir"]) / "config.yaml").read_text())
        assert cfg["optim"]["lr"] == t.params["lr"] and cfg["train"]["label_smoothing"] == t.params["label_smoothing"]
        assert cfg["model"]["width"] == 0.125 and cfg["train"]["epochs"] == 2
    summary = (out / "summary.md").read_text()
    assert f"Best: trial {study.best_trial.number}" in summary and summary.count("| complete |") == 3
    for plot in ("history", "importance", "parallel"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    best = build_config(config_file=out / "best.yaml")
    assert best.optim.lr == study.best_params["lr"] and best.data.img_size == 16
    run = api.train(data, config=out / "best.yaml", epochs=1, project=str(tmp_path), name="again", progress=False)
    assert Path(run["run_dir"], "best.safetensors").is_file()
    assert main(args) == 2 and "already holds a search" in capsys.readouterr().err


def test_a_pruned_trial_stops_after_the_epoch_that_reported_it(data, tmp_path):
    class Weak:
        reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return True

    trial = Weak()
    with pytest.raises(optuna.TrialPruned):
        api.train(data, callbacks=[ReportEpochs(trial, "val_top1")], project=str(tmp_path), name="p", progress=False,
                  **{**TINY, "epochs": 5})
    assert [step for step, _ in trial.reported] == [1]  # one epoch, reported, then stopped
    assert "epoch" in Path(tmp_path, "p", "metrics.csv").read_text().splitlines()[0]


def test_a_killed_search_resumes_and_retries_the_cut_off_trial(data, tmp_path, monkeypatch):
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "resforge", "tune", str(data), "--trials", "3", "--space", "lr", "--pruner", "none",
           "--search-seed", "1", "--project", str(tmp_path), "--name", "k", *FLAGS, "--epochs", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "trials" / "trial-000" / "last.ckpt").is_file():  # the first trial is under way
            assert proc.poll() is None and time.monotonic() < deadline, "the search did not start"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    storage = f"sqlite:///{out / 'study.db'}"
    cut = optuna.load_study(study_name="k", storage=storage).trials[0]
    assert cut.state == optuna.trial.TrialState.RUNNING  # as the kill left it
    monkeypatch.setattr(tune, "GRACE_S", 1)  # its heartbeat stopped with the kill: 3 s later it is abandoned
    time.sleep(3)
    result = api.tune(resume=out, trials=2)
    assert result["complete"] == 2
    trials = optuna.load_study(study_name="k", storage=storage).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert trials[1].params == cut.params and trials[1].state == optuna.trial.TrialState.COMPLETE  # tried again


def test_bad_searches_are_refused_before_anything_is_written(data, tmp_path):
    cases = [(dict(space=["lr", "colour"]), "--space takes names among"),
             (dict(trials=0), "--trials must be at least 1"),
             (dict(pruner="random"), "--pruner must be one of"),
             (dict(space=["lr"], lr=0.1), "is searched (--space): do not fix it too"),
             (dict(time_limit=-1), "--time-limit must be a positive")]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            api.tune(data, project=str(tmp_path), name="bad", **{**TINY, **kwargs})
        assert not (tmp_path / "bad").exists()
    with pytest.raises(DataError, match="no such folder"):
        api.tune(tmp_path / "nowhere", project=str(tmp_path), name="bad", **TINY)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="holds no search to resume"):
        api.tune(resume=tmp_path)


def test_two_processes_given_one_storage_and_folder_share_one_study(data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    shared = ["--storage", storage, "--study", "shared", "--trials", "4", "--space", "lr", "--pruner", "none"]
    first = subprocess.Popen([sys.executable, "-m", "resforge", "tune", str(data), *shared, "--project", str(tmp_path),
                              "--name", "both", *FLAGS, "--epochs", "4"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "both" / "trials" / "trial-000" / "last.ckpt").is_file():  # its first trial runs
            assert first.poll() is None and time.monotonic() < deadline, "the first search did not start"
            time.sleep(0.05)
        second = api.tune(data, trials=4, space=["lr"], storage=storage, study="shared", pruner="none",
                          project=str(tmp_path), name="both", **{**TINY, "epochs": 4})
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    states = [t.state for t in trials]
    # The second process did not take the first one's running trial (of the same folder) for an abandoned one;
    # the count is shared (a trial each process started before the other finished the fourth may make it five)
    assert optuna.trial.TrialState.FAIL not in states and 4 <= states.count(optuna.trial.TrialState.COMPLETE) <= 5
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # two trials ran at once: both processes ran trials
    assert second["complete"] >= 4  # what the second one reports is the study's, not only its own trials


@pytest.mark.parametrize("url, reason", [("foo://host/db", "Can't load plugin"),
                                         ("sqlite:////nonexistent/folder/study.db", "unable to open database file"),
                                         ("postgresql://user:secret@localhost:1/db", ""),  # no driver, or no server
                                         ("not a url", "Could not parse")])
def test_a_storage_that_cannot_be_opened_is_refused_before_anything_is_written(data, tmp_path, capsys, url, reason):
    args = ["tune", str(data), "--storage", url, "--project", str(tmp_path), "--name", "bad", *FLAGS]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("resforge: error: the study storage") and reason in err and len(err.splitlines()) == 1
    assert "secret" not in err and not (tmp_path / "bad").exists()
    old = tune.new_state(str(data), {k: v for k, v in TINY.items() if k != "model"}, ["lr"], "val_top1", 2, "none",
                         url, None, tmp_path / "old", 0)
    tune.write_state(tmp_path / "old", {**old, "model": "resnet18", "recipe": None, "config": None})  # as written
    # by an earlier version, which checked no storage
    assert main(["tune", "--resume", str(tmp_path / "old")]) == 2
    assert "the study storage" in capsys.readouterr().err
