"""Training in several processes (DDP over gloo on the CPU): the same global batches as one process, resumes
across world sizes, only rank 0 writing, a dead rank failing the job, and two "nodes" on loopback."""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_flags, make_image_folder

from resforge import api
from resforge.data.loader import EpochSampler
from resforge.errors import ConfigError, DataError, ImageError, TrainingError
from resforge.training import distributed
from resforge.training.checkpoint import load_checkpoint
from resforge.training.trainer import Trainer

# Group norm (torch's SyncBatchNorm needs CUDA, so batch norm on the CPU would normalise each rank's half of the
# batch); gradient accumulation (DDP's no_sync); random crops and flips (seeded per sample); a constant learning
# rate, so a run stopped after an epoch and extended goes on exactly as one that was never stopped.
OPTS = {"model": "resnet18", "width": 0.125, "img_size": 16, "small_input": True, "norm": "groupnorm",
        "batch_size": 8, "accum_steps": 2, "workers": 0, "amp": "off", "augment": "standard", "hflip": 0.5,
        "optimizer": "sgd", "lr": 0.05, "schedule": "constant", "warmup_epochs": 0}
CLI = [sys.executable, "-m", "resforge", "train"]
TOLERANCE = 1e-5  # summation order of the gradients is all that differs: measured 5e-7 on weights of scale 1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "shapes", classes=("a", "b", "c"), per_class=16,
                             size=20)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The reference: two epochs in this process."""
    project = tmp_path_factory.mktemp("one")
    return Path(api.train(data, progress=False, project=str(project), epochs=2, **OPTS)["run_dir"])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.ckpt")["model"]


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_each_rank_takes_its_slice_of_the_same_global_batches():
    one = list(EpochSampler(37, shuffle=True, seed=3, batch=8))
    ranks = [list(EpochSampler(37, shuffle=True, seed=3, batch=8, rank=r, world=2)) for r in range(2)]
    assert [len(r) for r in ranks] == [16, 16]  # 4 whole global batches; the ragged 5 images are dropped
    for b in range(4):
        assert ranks[0][4 * b:4 * b + 4] + ranks[1][4 * b:4 * b + 4] == one[8 * b:8 * b + 8]
    shards = [list(EpochSampler(37, shuffle=False, rank=r, world=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(37))


def test_two_processes_train_as_one_and_resume_in_either(data, one_process, tmp_path):
    # 2 processes for the first epoch, then 1 process (in this test's own process) for the second
    two_then_one = api.train(data, progress=False, devices=2, project=str(tmp_path / "a"), epochs=1, **OPTS)
    run = Path(two_then_one["run_dir"])
    assert [p.name for p in (tmp_path / "a").iterdir()] == [run.name]  # one run directory, written by rank 0
    first, reference = _rows(run)[0], _rows(one_process)[0]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1"):
        assert float(first[key]) == pytest.approx(float(reference[key]), abs=TOLERANCE), key
    api.train(resume=run, progress=False, epochs=2)
    assert _max_diff(run, one_process) < TOLERANCE

    # 1 process for the first epoch, then 2
    one_then_two = Path(api.train(data, progress=False, project=str(tmp_path / "b"), epochs=1, **OPTS)["run_dir"])
    api.train(resume=one_then_two, progress=False, devices=2, epochs=2)
    assert _max_diff(one_then_two, one_process) < TOLERANCE
    assert float(_rows(one_then_two)[1]["val_loss"]) == pytest.approx(float(_rows(one_process)[1]["val_loss"]),
                                                                      abs=TOLERANCE)


def test_a_batch_the_processes_cannot_share_is_one_clear_error(data, tmp_path):
    r = subprocess.run(CLI + [str(data), "--devices", "2", "--project", str(tmp_path / "runs"),
                              *cli_flags({**OPTS, "batch_size": 7, "epochs": 1})], capture_output=True, text=True)
    assert r.returncode == 2
    assert "resforge: error: data.batch_size 7 is the global batch, split among 2 processes" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_validation_in_two_processes_is_that_of_the_saved_model(data, tmp_path):
    """With batch norm each process updates its running statistics from its own slice; validation uses rank
    0's (the model that is saved), so the figures equal one process validating the checkpoint."""
    opts = {**OPTS, "norm": "batchnorm", "ema": True, "ema_decay": 0.5, "epochs": 1}
    run = Path(api.train(data, progress=False, devices=2, project=str(tmp_path), **opts)["run_dir"])
    recorded = _rows(run)[0]
    trainer = Trainer.resume(run, {"epochs": 2}, progress=False)
    try:
        again = trainer._validate()
    finally:
        trainer.lock.release()
    for key in ("val_loss", "val_top1", "ema_val_loss", "ema_val_top1"):
        assert float(recorded[key]) == pytest.approx(again[key], abs=1e-6), key


class _Failure:  # what torch's launcher reports of a process
    def __init__(self, exitcode, message="", signal="SIGKILL"):
        self.pid, self.exitcode, self.message, self._signal = 7, exitcode, message, signal

    def signal_name(self):
        return self._signal


def test_a_failed_process_is_reported_as_its_own_error():
    image = distributed._failure_error(1, 2, _Failure(1, {"message": "ImageError: x.jpg is truncated",
                                                          "extraInfo": {"py_callstack": "..."}}))
    assert isinstance(image, ImageError) and isinstance(image, DataError) and str(image) == "x.jpg is truncated"
    bug = distributed._failure_error(0, 2, _Failure(1, {"message": "KeyError: 'x'",
                                                        "extraInfo": {"py_callstack": "Traceback: line 3"}}))
    assert type(bug) is RuntimeError and "training process 0 of 2 (pid 7) failed: KeyError: 'x'" in str(bug)
    assert "Traceback: line 3" in str(bug)  # a bug keeps its stack
    death = distributed._failure_error(1, 4, _Failure(-9))
    assert isinstance(death, TrainingError) and "training process 1 of 4 (pid 7) died (SIGKILL)" in str(death)


def test_sync_bn_is_refused_on_the_cpu():
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        distributed.sync_batchnorm(torch.nn.BatchNorm2d(4), torch.device("cpu"))


def _spawned_children(parent: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


def test_a_dead_rank_fails_the_job_by_name_and_the_checkpoint_resumes(data, tmp_path):
    project = tmp_path / "runs"
    proc = subprocess.Popen(CLI + [str(data), "--devices", "2", "--project", str(project), "--name", "r",
                                   *cli_flags({**OPTS, "epochs": 500})], stderr=subprocess.PIPE, text=True)
    run = project / "r"
    try:
        deadline = time.monotonic() + 300
        while not (run / "last.ckpt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "last.ckpt").is_file(), "no epoch finished"
        rank0 = int((run / ".lock").read_text())  # rank 0 holds the run's lock
        (rank1,) = [pid for pid in _spawned_children(proc.pid) if pid != rank0]
        os.kill(rank1, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # no hang: the launcher stops the survivor at once
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert f"training process 1 of 2 (pid {rank1}) died (SIGKILL)" in err
    assert "Traceback" not in err
    epoch = load_checkpoint(run / "last.ckpt")["epoch"]
    assert api.train(resume=run, progress=False, epochs=epoch + 1)["epochs"] == epoch + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_as_one_process(data, one_process, tmp_path):
    """torchrun's multi-node rendezvous (c10d) with one process per "node", both on this machine."""
    port = _free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "loopback",
            "-m", "resforge", "train", str(data), "--project", str(tmp_path / "runs"), "--epochs", "1",
            *cli_flags(OPTS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs
    (run,) = (tmp_path / "runs").iterdir()
    first, reference = _rows(run)[0], _rows(one_process)[0]
    for key in ("train_loss", "val_loss"):
        assert float(first[key]) == pytest.approx(float(reference[key]), abs=TOLERANCE), key
