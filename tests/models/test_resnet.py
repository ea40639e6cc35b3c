"""The ResNet options each change the network the way their papers say."""

import functools

import pytest
import torch
from torch import nn
from torchvision.ops import SqueezeExcitation, StochasticDepth

import resforge
from resforge.models.resnet import ACTIVATIONS, ResNet


def tiny(name="resnet50", **kw):
    return resforge.create_model(name, **{"width": 0.125, "num_classes": 5, **kw})


FAMILY = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
          "resnext50_32x4d", "resnext101_32x8d", "resnet18d", "resnet34d", "resnet50d", "resnet101d", "resnet152d"]


def test_list_models_has_the_family():
    assert set(FAMILY) <= set(resforge.list_models())


@pytest.mark.parametrize("name", FAMILY)
def test_each_name_builds_the_reference_network(name):
    """Every tensor, by name and shape, of torchvision's network of that name (timm's for the `d`
    variants, which torchvision lacks), and its 1000 logits. Built on the meta device: shapes without
    the cost of weights."""
    import torchvision

    if hasattr(torchvision.models, name):
        build = getattr(torchvision.models, name)
    else:
        build = functools.partial(pytest.importorskip("timm").create_model, name)
    with torch.device("meta"):
        ref, ours = build(), resforge.create_model(name)
        x = torch.empty(2, 3, 224, 224)
        assert ours(x).shape == ref(x).shape == (2, 1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_unknown_model_names_the_closest():
    with pytest.raises(resforge.ConfigError, match="did you mean resnet50"):
        resforge.create_model("resnet5O")


@pytest.mark.parametrize("kw", [dict(variant="v2"), dict(act="swish"), dict(norm="layernorm"), dict(init="lecun")])
def test_bad_options_are_named(kw):
    key, value = next(iter(kw.items()))
    with pytest.raises(resforge.ConfigError, match=repr(value)):
        tiny(**kw)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnet50d"])
def test_shapes_and_feature_maps(name):
    m = tiny(name).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = m.forward_feature_maps(x)
    assert [f.shape[1] for f in maps] == [i["channels"] for i in m.feature_info]
    assert [64 // f.shape[-1] for f in maps] == [i["reduction"] for i in m.feature_info] == [4, 8, 16, 32]
    assert torch.equal(m.forward_features(x), maps[-1])
    assert m(x).shape == (2, 5)
    assert m.forward_head(maps[-1], pre_logits=True).shape == (2, m.num_features)


def test_small_input_stem_keeps_resolution():
    m = tiny("resnet18", small_input=True)
    assert isinstance(m.maxpool, nn.Identity) and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    maps = m.forward_feature_maps(torch.randn(1, 3, 32, 32))
    assert maps[0].shape[-1] == 32 and maps[-1].shape[-1] == 4
    assert [i["reduction"] for i in m.feature_info] == [1, 2, 4, 8]


def test_stride_placement_of_variants():
    v15, v1 = tiny(variant="v1.5"), tiny(variant="v1")
    block15, block1 = v15.layer2[0], v1.layer2[0]
    assert block15.conv1.stride == (1, 1) and block15.conv2.stride == (2, 2)
    assert block1.conv1.stride == (2, 2) and block1.conv2.stride == (1, 1)
    d = tiny(variant="d")
    assert isinstance(d.conv1, nn.Sequential) and len(d.conv1) == 7
    assert isinstance(d.layer2[0].downsample[0], nn.AvgPool2d)
    assert isinstance(d.layer1[0].downsample[0], nn.Identity)  # channel change only: no pooling
    assert resforge.create_model("resnet50d").spec()["variant"] == "d"


def test_in_chans_width_and_classes():
    m = tiny(in_chans=1).eval()
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    narrow, wide = tiny(width=0.125), tiny(width=0.25)
    assert wide.num_features == 2 * narrow.num_features == 2 * 256


def test_reset_classifier():
    m = tiny().eval()
    m.reset_classifier(7)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 7) and m.spec()["num_classes"] == 7
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, m.num_features)


def test_zero_init_residual_makes_blocks_start_as_identity_branches():
    m = tiny()
    assert all(b.bn3.weight.abs().sum() == 0 for b in m.modules() if hasattr(b, "bn3"))
    m = tiny(zero_init_residual=False)
    assert all(b.bn3.weight.abs().sum() > 0 for b in m.modules() if hasattr(b, "bn3"))


def test_init_choice_changes_weight_scale():
    he, xavier = tiny(init="he"), tiny(init="xavier")
    w_he, w_x = he.layer3[0].conv2.weight, xavier.layer3[0].conv2.weight
    fan_in, fan_out = w_he.shape[1] * 9, w_he.shape[0] * 9
    assert w_he.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.15)
    assert w_x.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.15)


def test_every_activation_the_options_name_is_built():
    from resforge.config import CHOICES

    assert tuple(ACTIVATIONS) == CHOICES["model.act"]


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activation_choice(act):
    m = tiny("resnet18", act=act)
    assert type(m.act1) is type(ACTIVATIONS[act]())
    assert type(m.layer1[0].act1) is type(ACTIVATIONS[act]())
    out = m(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()
    if act == "prelu":
        assert any(isinstance(p, nn.PReLU) for p in m.modules())


def test_groupnorm_is_independent_of_batch():
    m = tiny(norm="groupnorm").train()
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    x = torch.randn(4, 3, 32, 32)
    # Without batch statistics, an image's output does not depend on its batch mates, even training.
    assert torch.allclose(m(x)[:1], m(x[:1]), atol=1e-5)


def test_squeeze_excitation_in_every_block():
    m = tiny(se=True)
    blocks = [b for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer]
    assert all(isinstance(b.se, SqueezeExcitation) for b in blocks)
    assert sum(p.numel() for p in m.parameters()) > sum(p.numel() for p in tiny().parameters())


def test_drop_path_grows_linearly_and_acts_only_in_training():
    m = tiny(drop_path_rate=0.3, zero_init_residual=False)  # zero branches would hide the drops
    rates = [b.drop_path.p if isinstance(b.drop_path, StochasticDepth) else 0.0
             for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for b in layer]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))


def test_dropout_before_classifier():
    m = tiny(drop_rate=0.5)
    assert m.drop.p == 0.5
    feats = torch.randn(8, m.num_features, 1, 1)
    m.train()
    assert not torch.allclose(m.forward_head(feats, pre_logits=True), feats.flatten(1))
    m.eval()
    assert torch.equal(m.forward_head(feats, pre_logits=True), feats.flatten(1))


def test_spec_rebuilds_the_same_architecture_even_when_widths_change():
    m = tiny(variant="d", se=True, act="silu", in_chans=1)
    assert ResNet(**m.spec()).state_dict().keys() == m.state_dict().keys()
    # A pruned network: fewer inner channels in one block. spec() reads the live widths.
    block = m.layer2[1]
    block.conv1 = nn.Conv2d(block.conv1.in_channels, 8, 1, bias=False)
    block.bn1 = nn.BatchNorm2d(8)
    block.conv2 = nn.Conv2d(8, block.conv2.out_channels, 3, padding=1, bias=False)
    spec = m.spec()
    assert spec["inner_widths"][1][1] == [8, 16]
    rebuilt = ResNet(**spec)
    rebuilt.load_state_dict(m.state_dict())  # strict: every shape agrees
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(rebuilt.eval()(x), m.eval()(x))


def test_spec_records_what_pruning_changes_beyond_the_widths():
    """The deep stem's inner widths, SE squeeze widths and a projection kept where the widths now agree."""
    base = tiny("resnet18", variant="d", se=True)
    assert base.bn1.num_features == base.layer1[-1].last_norm.num_features and base.layer1[0].downsample is None
    m = ResNet(**{**base.spec(), "deep_stem_widths": [8, 16], "se_widths": [[8, 16], [8, 8], [16, 8], [8, 8]],
                  "projections": [[True, False], [True, False], [True, False], [True, False]]})
    assert m.layer1[0].downsample is not None  # widths that agree, with a projection all the same
    assert m.conv1[0].out_channels == 8 and m.conv1[3].out_channels == 16 and m.layer1[1].se.fc1.out_channels == 16
    spec = m.spec()
    assert spec["deep_stem_widths"] == [8, 16] and spec["se_widths"][0] == [8, 16]
    assert spec["projections"][0] == [True, False]
    rebuilt = ResNet(**spec)
    rebuilt.load_state_dict(m.state_dict())  # strict
    assert "deep_stem_widths" not in base.spec() and "projections" not in base.spec()


def test_widths_that_do_not_match_the_layers_are_refused():
    with pytest.raises(resforge.ConfigError, match="do not match"):
        ResNet("basic", (2, 2, 2, 2), stage_widths=[64, 128])
