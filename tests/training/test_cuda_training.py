"""Training on a CUDA GPU: mixed precision, channels-last, compile, EMA, the GPU data path, kill and resume,
the launcher. Skipped where there is no GPU (the reason is in pytest's summary)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import make_image_folder

from resforge import api
from resforge.config import build_config
from resforge.training import distributed
from resforge.training.checkpoint import load_checkpoint
from resforge.training.step import update_ema
from resforge.training.trainer import SYNC_EVERY, Trainer

pytestmark = pytest.mark.cuda
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before any cuBLAS handle: deterministic runs

GPU = {"model": "resnet18", "width": 0.25, "small_input": True, "img_size": 24, "batch_size": 16, "workers": 0,
       "device": "cuda", "optimizer": "sgd", "lr": 0.05, "augment": "none", "epochs": 6}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("gpu") / "stripes", classes=("a", "b", "c"), per_class=24,
                             size=28, fmt="jpg")


def _opts(tmp_path, **kw):
    return {**GPU, "project": str(tmp_path / "runs"), **kw}


class Seen:
    """What the network's stem and head saw on the last training batch."""

    def __init__(self):
        self.stem_channels_last = self.head_dtype = self.weights_device = None

    def __call__(self, event, trainer):
        if event == "train_start":
            model = trainer.model
            model.stem_conv.register_forward_hook(self._stem)
            model.fc.register_forward_hook(self._head)
            self.weights_device = model.fc.weight.device

    def _stem(self, module, inputs, output):
        self.stem_channels_last = inputs[0].is_contiguous(memory_format=torch.channels_last)

    def _head(self, module, inputs, output):
        self.head_dtype = output.dtype


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_channels_last_training_learns_on_the_gpu(data, tmp_path, amp, dtype):
    seen = Seen()
    out = api.train(data, progress=False, callbacks=[seen], **_opts(tmp_path, amp=amp, channels_last=True, epochs=8))
    assert seen.weights_device.type == "cuda" and seen.stem_channels_last and seen.head_dtype == dtype
    assert out["results"]["val"]["top1"] >= 0.75  # chance is 1/3
    state = load_checkpoint(os.path.join(out["run_dir"], "last.ckpt"))
    assert bool(state["scaler"]) == (amp == "fp16")  # the grad scaler runs, and resumes, with fp16 only
    if amp == "fp16":
        assert 0 < state["scaler"]["scale"] <= 65536.0


def test_a_training_step_never_waits_for_the_gpu(data, tmp_path):
    """Between the loss checks every SYNC_EVERY batches the host only queues work: a step that read a value
    back (loss.item(), a mask, the EMA's counter) would stall the GPU while the next step is launched."""
    cfg = build_config(overrides={"data.root": str(data), **_opts(tmp_path, amp="bf16", ema=True, mixup=0.2,
                                                                  epochs=1)})
    t = Trainer(cfg, progress=False)
    batches = list(t.train_loader)[:3]

    def step(x, y):
        x, y = t.stepper.prepare_batch(x, y)
        loss, _ = t.stepper.compute_loss(x, y)
        t.stepper.backward(loss, first=True)
        t.stepper.optimizer_step(1.0)
        update_ema(t.ema, t.model, 0.99)

    step(*batches[0])  # the first step allocates, and chooses kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches[1:]:
            step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert SYNC_EVERY > 1 and int(t.ema.n_averaged) == 3


def test_a_compiled_run_saves_plain_weights_that_predict_alike_on_gpu_and_cpu(data, tmp_path):
    from safetensors.torch import load_file

    from resforge.runtime.predictor import Predictor

    out = api.train(data, progress=False, **_opts(tmp_path, amp="bf16", compile=True, epochs=3, ema=True))
    keys = load_file(os.path.join(out["run_dir"], "best.safetensors")).keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    files = sorted(str(f) for f in data.rglob("*.jpg"))
    gpu = Predictor.load(out["run_dir"], "torch", "cuda", "fp32").probabilities(files)
    cpu = Predictor.load(out["run_dir"], "torch", "cpu", "fp32").probabilities(files)
    assert abs(gpu - cpu).max() < 2e-3  # TF32 convolutions on the GPU
    on_gpu = api.evaluate(out["run_dir"], data, device="cuda", out=tmp_path / "eval-gpu")
    on_cpu = api.evaluate(out["run_dir"], data, device="cpu", precision="fp32", out=tmp_path / "eval-cpu")
    assert abs(on_gpu.top1 - on_cpu.top1) <= 1 / len(files)


KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from resforge import api

    def kill_mid_epoch(event, trainer):
        if event == "batch_end" and trainer.epoch == 2 and trainer.batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    api.train(sys.argv[1], progress=False, callbacks=[kill_mid_epoch], **json.loads(sys.argv[2]))
""")


def test_sigkill_then_resume_on_the_gpu_ends_with_the_same_weights(data, tmp_path):
    opts = dict(epochs=4, deterministic=True, ema=True, amp="fp16", mixup=0.4, label_smoothing=0.1, drop_rate=0.2,
                augment="standard", warmup_epochs=1)
    straight = api.train(data, progress=False, **_opts(tmp_path, name="straight", **opts))
    killed = _opts(tmp_path, name="killed", **opts)
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    r = subprocess.run([sys.executable, "-c", KILLER, str(data), json.dumps(killed)], capture_output=True, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    run = tmp_path / "runs" / "killed"
    assert load_checkpoint(run / "last.ckpt")["epoch"] == 2
    assert api.train(resume=run, progress=False)["epochs"] == 4
    a = load_checkpoint(os.path.join(straight["run_dir"], "last.ckpt"))
    b = load_checkpoint(run / "last.ckpt")
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k}"
    assert a["scaler"]["scale"] == b["scaler"]["scale"]
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]


def test_gpu_decode_trains_on_jpegs_and_the_files_nvjpeg_is_not_given(data, tmp_path):
    from PIL import Image

    folder = tmp_path / "mixed"
    for cls in ("a", "b", "c"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((data / cls).iterdir()):
            (folder / cls / f.name).write_bytes(f.read_bytes())
    with Image.open(sorted((data / "a").iterdir())[0]) as im:  # PIL decodes these, in the same batches
        im.save(folder / "a" / "x.png")
        im.convert("CMYK").save(folder / "a" / "cmyk.jpg")
        im.save(folder / "a" / "progressive.jpg", progressive=True)
    out = api.train(folder, progress=False, **_opts(tmp_path, decode="gpu", amp="bf16", augment="standard",
                                                    scale=[0.8, 1.0], hflip=0.5, epochs=10))
    assert out["results"]["val"]["top1"] >= 0.6  # chance is 1/3


def test_the_launcher_trains_one_process_on_the_gpu(data, tmp_path):
    """`--devices N` starts N processes through torch's elastic launcher; one GPU here, so one process."""
    out = distributed.launch(api.train, {"data": str(data), "progress": False, **_opts(tmp_path, epochs=2)}, 1)
    run = out["run_dir"]
    state = load_checkpoint(os.path.join(run, "last.ckpt"))
    assert state["epoch"] == 2 and os.path.isfile(os.path.join(run, "best.safetensors"))
