"""Parameter groups, freezing and the schedule, including what resume does to it."""

import math

import pytest
import torch

import resforge
from resforge.config import OptimConfig
from resforge.training.optim import Schedule, build_optimizer, default_lr, freeze, param_groups, set_train_mode


def tiny():
    return resforge.create_model("resnet18", width=0.125, num_classes=3)


def test_no_weight_decay_on_norms_and_biases_and_a_slower_backbone():
    m = tiny()
    groups = param_groups(m, OptimConfig(weight_decay=1e-4, backbone_lr_mult=0.1), lr=1.0)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(m.bn1.weight)]["weight_decay"] == 0 and by_id[id(m.fc.bias)]["weight_decay"] == 0
    assert by_id[id(m.conv1.weight)]["weight_decay"] == 1e-4 and by_id[id(m.fc.weight)]["weight_decay"] == 1e-4
    assert by_id[id(m.conv1.weight)]["lr"] == pytest.approx(0.1) and by_id[id(m.fc.weight)]["lr"] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    decayed = param_groups(m, OptimConfig(weight_decay=1e-4, wd_norm_bias=True), lr=1.0)
    assert all(g["weight_decay"] == 1e-4 for g in decayed)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_optimizers(name, cls):
    opt = build_optimizer(tiny(), OptimConfig(optimizer=name), 0.01)
    assert isinstance(opt, cls)
    assert bool(opt.defaults.get("fused")) == name.startswith("adam")
    if name == "sgd":
        assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_default_lr_scales_with_batch_for_sgd_only():
    assert default_lr(OptimConfig(), 512) == pytest.approx(0.2)
    assert default_lr(OptimConfig(accum_steps=2), 128) == pytest.approx(0.1)
    assert default_lr(OptimConfig(optimizer="adamw"), 512) == 1e-3
    assert default_lr(OptimConfig(lr=0.5), 512) == 0.5


def test_freeze_stops_gradients_and_keeps_frozen_bn_statistics():
    m = tiny()
    frozen = freeze(m, ["stem", "layer1"])
    assert not m.conv1.weight.requires_grad and not m.layer1[0].conv1.weight.requires_grad
    assert m.layer2[0].conv1.weight.requires_grad and m.fc.weight.requires_grad
    set_train_mode(m, frozen)
    assert not m.bn1.training and not m.layer1[0].bn1.training and m.layer2[0].bn1.training
    before = m.layer1[0].bn1.running_mean.clone()
    m(torch.randn(4, 3, 32, 32))
    assert torch.equal(before, m.layer1[0].bn1.running_mean)
    m2 = resforge.create_model("resnet18", width=0.125, num_classes=3, drop_rate=0.5)
    set_train_mode(m2, freeze(m2, ["backbone"]))
    assert [n for n, p in m2.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert m2.drop.training and not m2.layer4.training


def test_freezing_everything_is_refused():
    m = tiny()
    m.reset_classifier(0)
    with pytest.raises(resforge.ConfigError, match="nothing to train"):
        freeze(m, ["backbone"])


def _curve(s, n):
    return [s.factor(i) for i in range(n)]


def test_warmup_then_cosine():
    s = Schedule.create(OptimConfig(schedule="cosine", warmup_epochs=1, min_lr_ratio=0.01), 4, 10)
    f = _curve(s, 40)
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.01, abs=5e-3)  # one step short of the floor
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_step_constant_onecycle():
    step = _curve(Schedule.create(OptimConfig(schedule="step", step_size=2, gamma=0.5), 6, 5), 30)
    assert step[0] == step[9] == 1.0 and step[10] == 0.5 and step[29] == 0.25
    assert set(_curve(Schedule.create(OptimConfig(schedule="constant"), 3, 5), 15)) == {1.0}
    one = _curve(Schedule.create(OptimConfig(schedule="onecycle"), 10, 10), 100)
    peak = max(range(100), key=one.__getitem__)
    assert 25 <= peak <= 31 and one[0] < 0.1 and one[-1] < 1e-3


def test_same_length_resume_is_the_same_schedule():
    s = Schedule.create(OptimConfig(warmup_epochs=1), 5, 10)
    assert s.resized(23, 50, finished=False) is s


def test_longer_unfinished_run_refits_the_decay_without_a_jump():
    s = Schedule.create(OptimConfig(warmup_epochs=1), 5, 10)
    longer = s.resized(30, 100, finished=False)
    assert longer.factor(30) == pytest.approx(s.factor(30), rel=1e-9)
    assert longer.factor(31) <= longer.factor(30) and longer.factor(99) == pytest.approx(0, abs=1e-3)
    assert longer.factor(60) > s.factor(45)  # the same fall, spread over more steps


@pytest.mark.parametrize("kind", ["step", "constant"])
def test_refitting_a_step_or_constant_schedule_changes_nothing_before_the_old_end(kind):
    s = Schedule.create(OptimConfig(schedule=kind, step_size=2, gamma=0.5), 6, 5)
    r = s.resized(25, 60, finished=False)
    assert [r.factor(i) for i in range(25, 30)] == _curve(s, 30)[25:]
    if kind == "step":
        assert r.factor(59) == 0.5 ** 5


def test_resume_inside_warmup_finishes_the_warmup():
    s = Schedule.create(OptimConfig(warmup_epochs=2), 5, 10)
    r = s.resized(5, 80, finished=False)
    assert r.factor(19) == pytest.approx(1.0) and r.factor(5) < 1.0


def test_extending_a_finished_run_starts_a_new_cycle():
    s = Schedule.create(OptimConfig(warmup_epochs=2), 5, 10)
    assert s.factor(49) < 1e-2
    r = s.resized(50, 80, finished=True)
    f = _curve(r, 80)[50:]
    assert f[0] < f[9] == pytest.approx(1.0)  # one epoch of warm-up back to the peak
    assert f[-1] < 1e-2 and math.isclose(max(f), 1.0)


def test_schedule_state_round_trip():
    s = Schedule.create(OptimConfig(schedule="onecycle"), 7, 3)
    assert Schedule.from_state_dict(s.state_dict()) == s
