"""The step seam and what plugs into it: lr-find's probes, distillation, starting from a saved model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import make_image_folder

import resforge
from resforge import api
from resforge.config import build_config
from resforge.data.transforms import Preprocess
from resforge.models import ResNet, load_model, save_model
from resforge.training.checkpoint import load_checkpoint
from resforge.training.losses import DistillationLoss
from resforge.training.lr_find import lr_find
from resforge.training.trainer import Trainer

TINY = {"model": "resnet18", "width": 0.125, "img_size": 16, "batch_size": 8, "workers": 0, "amp": "off",
        "epochs": 1, "recipe": "fast"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "shapes", classes=("a", "b", "c"), per_class=16,
                             size=20)


@pytest.fixture(scope="module")
def teacher_run(data, tmp_path_factory):
    project = tmp_path_factory.mktemp("teacher")
    return api.train(data, progress=False, project=str(project), name="teacher", **TINY)["run_dir"]


def _trainer(data, tmp_path, **kw):
    opts = {**TINY, "project": str(tmp_path / "runs"), **kw}
    recipe = opts.pop("recipe")
    return Trainer(build_config(recipe, overrides={"data.root": str(data), **opts}), progress=False)


def test_lr_find_probes_the_trainers_own_step(data, tmp_path, monkeypatch):
    """Each probe is one real optimiser step: accumulated micro-batches, with the L1 penalty in its loss."""
    plain = _trainer(data, tmp_path, deterministic=True, accum_steps=2)
    penalised = _trainer(data, tmp_path, deterministic=True, l1=1e-3, accum_steps=2)
    calls = {"loss": 0, "step": 0}
    compute, step = penalised.stepper.compute_loss, penalised.stepper.optimizer_step
    monkeypatch.setattr(penalised.stepper, "compute_loss", lambda *a: calls.__setitem__("loss", calls["loss"] + 1) or compute(*a))
    monkeypatch.setattr(penalised.stepper, "optimizer_step", lambda f: calls.__setitem__("step", calls["step"] + 1) or step(f))
    l1 = 1e-3 * sum(w.abs().sum().item() for w in penalised.stepper.l1_weights)
    a = lr_find(plain, steps=6, end_lr=1e-5)
    b = lr_find(penalised, steps=6, end_lr=1e-5)
    assert calls == {"loss": 2 * len(b.lrs), "step": len(b.lrs)} and len(b.lrs) == 6
    # Same seed, so the same weights and batches: the first probes differ by the penalty alone.
    assert b.losses[0] - a.losses[0] == pytest.approx(l1, rel=1e-3)


def test_callbacks_hear_every_epoch_start_and_optimiser_step(data, tmp_path):
    events = []
    out = api.train(data, progress=False, project=str(tmp_path / "runs"), callbacks=[lambda e, t: events.append(e)],
                    **{**TINY, "epochs": 2, "accum_steps": 2})
    t_steps = load_checkpoint(f"{out['run_dir']}/last.ckpt")["step"]
    assert events.count("epoch_start") == 2 and events.count("step_end") == t_steps > 0
    assert events.index("epoch_start") < events.index("step_end") < events.index("epoch_end")


def test_distillation_loss_is_the_formula(data):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    images = torch.randn(6, 1, 4, 4)
    seen = []
    loss = DistillationLoss(lambda x: seen.append(x) or teacher, alpha=0.3, temperature=4.0)(student, y, images)
    p_teacher = F.softmax(teacher / 4, 1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / 4, 1))).sum(1).mean()
    assert loss.item() == pytest.approx(0.3 * F.cross_entropy(student, y).item() + 0.7 * 16 * kl.item(), rel=1e-5)
    assert seen[0] is images  # the teacher is shown the student's own batch


def _distillation(logits, y, teacher_logits):
    """Hinton et al.'s loss at alpha 0.25 and temperature 3, written out."""
    soft = F.kl_div(F.log_softmax(logits / 3, 1), F.log_softmax(teacher_logits / 3, 1), reduction="batchmean",
                    log_target=True) * 9
    return 0.25 * F.cross_entropy(logits, y) + 0.75 * soft


def test_training_with_a_teacher_uses_its_soft_targets(data, tmp_path, teacher_run):
    """The trainer's loss is the distillation loss, and its steps are plain SGD steps on it: two of them
    (the second uses the momentum of the first) equal torch.optim.SGD's on a copy of the student; the
    teacher does not move."""
    t = _trainer(data, tmp_path, teacher=teacher_run, kd_alpha=0.25, kd_temperature=3.0, augment="none",
                 label_smoothing=0.0, optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.0)
    teacher, _ = load_model(teacher_run)
    teacher_before = copy.deepcopy(teacher.state_dict())
    student = copy.deepcopy(t.model)
    start = t.model.fc.weight.detach().clone()
    sgd = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x, y = t.stepper.prepare_batch(*next(iter(t.train_loader)))
    with torch.no_grad():
        teacher_logits = teacher(x)
    for _ in range(2):
        loss, logits = t.stepper.compute_loss(x, y)
        assert loss.item() == pytest.approx(_distillation(logits, y, teacher_logits).item(), rel=1e-4)
        t.stepper.backward(loss, first=True)
        t.stepper.optimizer_step(1.0)
        sgd.zero_grad()
        _distillation(student(x), y, teacher_logits).backward()
        sgd.step()
    assert (t.model.fc.weight - start).abs().max() > 1e-3  # the steps moved the weights
    expected = dict(student.named_parameters())
    for name, param in t.model.named_parameters():
        assert torch.allclose(param, expected[name], atol=1e-6), name
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_a_teacher_of_other_classes_is_refused(tmp_path, teacher_run):
    other = make_image_folder(tmp_path / "other", classes=("x", "y", "z"), per_class=8, size=20)
    with pytest.raises(resforge.ConfigError, match="teacher .* knows other classes"):
        _trainer(other, tmp_path, teacher=teacher_run)


def test_init_rebuilds_a_narrower_model_trains_it_and_resumes_without_its_source(data, tmp_path, teacher_run):
    """A model with other widths (as pruning leaves it) starts a run; the checkpoint carries its spec."""
    source, meta = load_model(teacher_run)
    spec = source.spec()
    narrow = ResNet(**{**spec, "inner_widths": [[[4], [8]], [[16], [8]], [[16], [24]], [[32], [16]]],
                       "stem_width": 8, "stage_widths": [8, 16, 24, 48]})
    narrow.model_name = "resnet18"
    path = save_model(narrow, tmp_path / "narrow.safetensors", {k: meta[k] for k in ("classes", "preprocess")})
    out = api.train(data, progress=False, project=str(tmp_path / "runs"), name="narrow", init=str(path),
                    **{k: v for k, v in TINY.items() if k not in ("model", "width", "img_size")})
    trained, trained_meta = load_model(out["run_dir"])
    assert trained.spec()["inner_widths"] == narrow.spec()["inner_widths"]
    assert trained.layer4[0].conv1.out_channels == 32 and trained.fc.in_features == 48
    assert trained_meta["preprocess"] == meta["preprocess"]
    path.unlink()  # resume needs only the run's own checkpoint
    resumed = api.train(resume=out["run_dir"], epochs=2, progress=False)
    assert resumed["epochs"] == 2
    assert load_model(out["run_dir"])[0].spec() == trained.spec()


def test_init_refuses_architecture_options_that_contradict_it(data, tmp_path, teacher_run):
    with pytest.raises(resforge.ConfigError, match="fixes the architecture"):
        _trainer(data, tmp_path, init=teacher_run, se=True)
    with pytest.raises(resforge.ConfigError, match="not both"):
        _trainer(data, tmp_path, init=teacher_run, pretrained=f"{teacher_run}/best.safetensors")


def test_slimming_adds_the_l1_of_the_batch_norm_scales_to_the_loss(data, tmp_path):
    plain = _trainer(data, tmp_path, deterministic=True)
    slim = _trainer(data, tmp_path, deterministic=True, l1_bn=1e-2)
    x, y = plain.stepper.prepare_batch(*next(iter(plain.train_loader)))
    gammas = sum(m.weight.abs().sum().item() for m in slim.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert slim.stepper.compute_loss(x, y)[0].item() - plain.stepper.compute_loss(x, y)[0].item() == pytest.approx(1e-2 * gammas,
                                                                                                  rel=1e-4)
    with pytest.raises(resforge.ConfigError, match="no batch norm|none to train"):
        _trainer(data, tmp_path, l1_bn=1e-2, norm="groupnorm")


def test_a_grayscale_model_started_from_and_distilled_from_keeps_its_statistics(tmp_path):
    """--init and --teacher of a one-channel run: the student is fed exactly what the saved model was."""
    gray = make_image_folder(tmp_path / "gray", classes=("a", "b"), per_class=10, size=20, mode="L")
    run = api.train(gray, progress=False, project=str(tmp_path / "runs"), name="gray", in_chans=1, **TINY)["run_dir"]
    _, meta = load_model(run)
    opts = {k: v for k, v in TINY.items() if k not in ("model", "width", "img_size", "recipe")}
    t = Trainer(build_config("fast", overrides={"data.root": str(gray), "project": str(tmp_path / "runs"),
                                                "init": run, "teacher": run, **opts}), progress=False)
    assert t.pre == Preprocess.from_dict(meta["preprocess"]) and t.pre.in_chans == 1
