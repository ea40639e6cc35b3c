"""Segmenters over resforge backbones: torchvision's own given the same weights, dilation, records, options."""

import pytest
import torch
import torchvision
from torchvision.models import segmentation as tvs

import resforge
from resforge.models import load_model, save_model
from resforge.models.registry import create_model
from resforge.models.segmentation import SEGMENTER_CLASSES, dilate
from resforge.models.summary import summarize
from resforge.models.weights import load_into

IMAGE = torch.randn(2, 3, 72, 88, generator=torch.Generator().manual_seed(1))


def _randomize_statistics(model):
    """Batch-norm statistics away from 0/1, so a misplaced norm cannot hide behind the identity."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("builder,kind", [(tvs.deeplabv3_resnet50, "deeplabv3"), (tvs.fcn_resnet50, "fcn")])
def test_a_resnet50_segmenter_is_torchvisions_given_its_weights(builder, kind):
    torch.manual_seed(0)
    theirs = _randomize_statistics(builder(weights=None, weights_backbone=None, num_classes=5, aux_loss=True))
    ours = SEGMENTER_CLASSES[kind](num_classes=5, aux=True)
    ours_keys = [k for k in ours.state_dict()]
    theirs_keys = [k for k in theirs.state_dict()]
    assert ours_keys == theirs_keys  # key for key, in order
    assert load_into(ours, theirs.state_dict(), "torchvision's") == []
    with torch.no_grad():
        a, b = ours.eval()(IMAGE), theirs.eval()(IMAGE)
    assert list(a) == list(b) == ["out", "aux"]
    for k in a:
        assert a[k].shape == (2, 5, 72, 88)
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_output_stride_16_dilates_layer4_as_torchvision_does():
    torch.manual_seed(0)
    theirs = _randomize_statistics(torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]))
    ours = dilate(create_model("resnet50", num_classes=0), 16)
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")})
    with torch.no_grad():
        c5 = ours.eval().forward_features(IMAGE)
        expected = torch.nn.Sequential(*list(theirs.eval().children())[:-2])(IMAGE)
    assert c5.shape[-2:] == (5, 6)  # 72/16, 88/16 rounded up: a stride of 16, not 32
    assert torch.allclose(c5, expected, atol=1e-4)
    assert [i["reduction"] for i in ours.feature_info] == [4, 8, 16, 16]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet18d"])
def test_basic_blocks_and_resnet_d_shortcuts_dilate_too(backbone):
    body = dilate(create_model(backbone, num_classes=0, width=0.25), 8)
    maps = body.forward_feature_maps(IMAGE)
    assert [m.shape[-2:] for m in maps] == [(18, 22), (9, 11), (9, 11), (9, 11)]
    assert body.layer4[1].conv2.dilation == (4, 4) and body.layer4[0].conv1.dilation == (2, 2)


@pytest.mark.parametrize("kind", ["deeplabv3", "deeplabv3plus", "fcn"])
def test_a_saved_segmenter_is_rebuilt_from_its_sidecar(tmp_path, kind):
    torch.manual_seed(0)
    model = SEGMENTER_CLASSES[kind](num_classes=3, backbone="resnet18d", backbone_options={"width": 0.25},
                                    output_stride=16, head_channels=32, aux=True).eval()
    path = save_model(model, tmp_path / "seg.safetensors", {"classes": ["background", "a", "b"]})
    loaded, meta = load_model(path)
    assert type(loaded) is type(model) and meta["arch"]["name"] == kind
    assert meta["arch"]["kwargs"]["output_stride"] == 16
    with torch.no_grad():
        assert torch.equal(loaded.eval()(IMAGE)["out"], model(IMAGE)["out"])


def test_deeplabv3plus_decodes_at_c2s_resolution_and_learns():
    torch.manual_seed(0)
    model = SEGMENTER_CLASSES["deeplabv3plus"](num_classes=2, backbone="resnet18", backbone_options={"width": 0.25},
                                               output_stride=16, head_channels=32)
    seen = []
    model.classifier.fuse.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2:]) and None)
    x, target = torch.rand(4, 3, 64, 64) * 0.2, torch.zeros(4, 64, 64, dtype=torch.long)
    for i, (top, left) in enumerate([(4, 8), (30, 20), (12, 36), (40, 40)]):  # a bright square: class 1
        x[i, :, top:top + 20, left:left + 20] += 0.8
        target[i, top:top + 20, left:left + 20] = 1
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x)["out"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert seen[0] == (16, 16)  # C2: a quarter of 64 px
    assert losses[-1] < 0.5 * losses[0]


def test_torchvision_weights_for_other_classes_load_with_fresh_class_layers():
    torch.manual_seed(0)
    theirs = tvs.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    ours = SEGMENTER_CLASSES["deeplabv3"](num_classes=4, aux=True)
    fresh = ours.classifier[4].weight.clone()
    notes = load_into(ours, theirs.state_dict(), "voc.pth")
    assert notes == ["voc.pth was trained on other classes than the model's 4: its class layers (classifier.4, "
                     "aux_classifier.4) were replaced and start fresh"]
    assert torch.equal(ours.classifier[4].weight, fresh)
    assert torch.equal(ours.classifier[0].project[0].weight, theirs.classifier[0].project[0].weight)


def test_summary_counts_the_head_once_beside_the_dilated_stages():
    model = SEGMENTER_CLASSES["deeplabv3plus"](num_classes=3, backbone="resnet18", backbone_options={"width": 0.25},
                                               head_channels=32)
    s = summarize(model, img_size=64)
    assert [r.name for r in s.stages] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert s.params == sum(p.numel() for p in model.parameters())
    assert [r.output_shape[-1] for r in s.stages[:5]] == [16, 16, 8, 8, 8]  # stride 8: layer3 and layer4 dilated
    assert s.stages[-1].macs > 0


@pytest.mark.parametrize("options,message", [
    ({"output_stride": 4}, "output_stride must be one of 8, 16, 32"),
    ({"num_classes": 1}, "at least two classes"),
    ({"backbone": "mobilenet_v3_small"}, "backbone is a ResNet"),
    ({"head_channels": 0}, "head_channels must be a positive whole number"),
])
def test_bad_segmenter_options_are_refused_by_name(options, message):
    with pytest.raises(resforge.ConfigError, match=message):
        SEGMENTER_CLASSES["deeplabv3"](**{"num_classes": 3, **options})
