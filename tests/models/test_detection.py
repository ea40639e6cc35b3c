"""Detectors over resforge backbones: exactly torchvision's `*_resnet50_fpn` given the same weights, rebuilt from
their sidecar, loading checkpoints of other classes, and bad options refused."""

import logging

import pytest
import torch
from torch import nn
from torchvision.models import detection as tvd
from torchvision.ops import FrozenBatchNorm2d

import resforge
from resforge.models import load_model, save_model
from resforge.models.detection import DETECTOR_CLASSES
from resforge.models.weights import load_into

SMALL = {"min_size": 96, "max_size": 128}
IMAGES = [torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(1)),
          torch.rand(3, 110, 100, generator=torch.Generator().manual_seed(2))]


def _outputs(model, images=IMAGES):
    with torch.no_grad():
        return model.eval()(images)


def _assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].shape == b[k].shape and a[k].shape[0] > 0, k  # something detected, so something compared
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4), k


@pytest.mark.parametrize("builder,kind,heads", [
    (tvd.fasterrcnn_resnet50_fpn, "fasterrcnn", "v1"), (tvd.fasterrcnn_resnet50_fpn_v2, "fasterrcnn", "v2"),
    (tvd.maskrcnn_resnet50_fpn, "maskrcnn", "v1"), (tvd.maskrcnn_resnet50_fpn_v2, "maskrcnn", "v2"),
    (tvd.retinanet_resnet50_fpn, "retinanet", "v1"), (tvd.fcos_resnet50_fpn, "fcos", "v1")])
def test_a_resnet50_detector_is_torchvisions_given_its_weights(builder, kind, heads):
    torch.manual_seed(0)
    theirs = builder(weights=None, weights_backbone=None, num_classes=5, **SMALL)
    ours = DETECTOR_CLASSES[kind](num_classes=5, heads=heads, **SMALL)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # key for key, in order
    assert load_into(ours, theirs.state_dict(), "torchvision's") == []
    for m in (ours, theirs):
        if kind in ("retinanet", "fcos"):
            m.score_thresh = 0.0  # untrained heads score below the default threshold
    _assert_same(_outputs(ours), _outputs(theirs))


def test_a_saved_detector_is_rebuilt_from_its_sidecar(tmp_path):
    torch.manual_seed(0)
    model = DETECTOR_CLASSES["maskrcnn"](num_classes=3, backbone="resnet18d", backbone_options={"width": 0.25},
                                         fpn_channels=32, frozen_bn=True, anchor_sizes=[8, 16, 32, 64, 128],
                                         **SMALL)
    model.roi_heads.score_thresh = 0.0
    path = save_model(model, tmp_path / "det.safetensors", {"classes": ["a", "b"]})
    loaded, meta = load_model(path)
    assert type(loaded) is type(model) and meta["arch"]["name"] == "maskrcnn"
    assert meta["arch"]["kwargs"]["backbone_options"]["variant"] == "d"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.body.modules())
    assert loaded.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    loaded.roi_heads.score_thresh = 0.0
    _assert_same(_outputs(loaded), _outputs(model))


def test_frozen_batch_norm_keeps_the_backbone_statistics_through_training():
    torch.manual_seed(0)
    model = DETECTOR_CLASSES["fasterrcnn"](num_classes=3, backbone="resnet18", backbone_options={"width": 0.25},
                                           fpn_channels=32, frozen_bn=True, **SMALL).train()
    frozen = [m for m in model.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and not any(isinstance(m, nn.BatchNorm2d) for m in model.body.modules())
    before = [m.running_mean.clone() for m in frozen]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # a negative image
    losses = model(IMAGES, targets)
    sum(losses.values()).backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(frozen, before))
    assert all(torch.isfinite(v) for v in losses.values())


def test_torchvision_weights_for_other_classes_load_with_fresh_class_layers(caplog):
    torch.manual_seed(0)
    theirs = tvd.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, **SMALL)
    ours = DETECTOR_CLASSES["retinanet"](num_classes=4, **SMALL)
    fresh = ours.head.classification_head.cls_logits.weight.clone()
    notes = load_into(ours, theirs.state_dict(), "coco.pth")
    assert notes == ["coco.pth was trained on other classes than the model's 3: its class layers "
                     "(head.classification_head.cls_logits) were replaced and start fresh"]
    assert torch.equal(ours.head.classification_head.cls_logits.weight, fresh)
    assert torch.equal(ours.backbone.body.layer3[0].conv2.weight, theirs.backbone.body.layer3[0].conv2.weight)
    # a checkpoint of another backbone is refused by name, not loaded in part
    other = DETECTOR_CLASSES["retinanet"](num_classes=4, backbone="resnet18", **SMALL)
    with pytest.raises(resforge.CheckpointError, match="does not fit this model"):
        load_into(other, theirs.state_dict(), "coco.pth")


def test_parts_cover_every_parameter_once_with_the_pyramid_and_heads_as_the_head():
    model = DETECTOR_CLASSES["fcos"](num_classes=3, backbone="resnet18", backbone_options={"width": 0.25},
                                     fpn_channels=32, **SMALL)
    parts = model.parts()
    assert list(parts) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    ids = [id(p) for modules in parts.values() for m in modules for p in m.parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert any(m is model.backbone.fpn for m in parts["head"])
    assert model.stem_conv is model.body.conv1


@pytest.mark.parametrize("kind,options,message", [
    ("retinanet", {"heads": "v2"}, "v1 heads only"),
    ("fasterrcnn", {"heads": "v3"}, "heads"),
    ("fasterrcnn", {"anchor_sizes": [16, 32]}, "5 positive sizes"),
    ("fasterrcnn", {"min_size": 800, "max_size": 400}, "do not fit"),
    ("fasterrcnn", {"num_classes": 1}, "at least one object class"),
    ("fcos", {"backbone": "mobilenet_v3_small"}, "backbone is a ResNet"),
    ("fcos", {"fpn_channels": 48}, "multiple of 32"),
])
def test_bad_detector_options_are_refused_by_name(kind, options, message):
    with pytest.raises(resforge.ConfigError, match=message):
        DETECTOR_CLASSES[kind](**{"num_classes": 3, **options})


def test_a_detector_name_in_a_sidecar_is_known_to_the_registry(caplog):
    from resforge.models.registry import rebuild

    spec = DETECTOR_CLASSES["fcos"](num_classes=3, backbone="resnet18", backbone_options={"width": 0.25},
                                    **SMALL).spec()
    with caplog.at_level(logging.INFO):
        assert type(rebuild("fcos", spec, "x.json")).__name__ == "FCOS"
    with pytest.raises(resforge.CheckpointError, match="x.json does not describe"):
        rebuild("fcos", {**spec, "heads": "v9"}, "x.json")


@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn", "retinanet", "fcos"])
def test_under_bf16_autocast_anchors_boxes_and_losses_stay_float32(kind):
    """torchvision makes anchors in the maps' dtype and decodes boxes in the heads': in bf16 a coordinate between
    256 and 512 px lands on a 2-px grid. Ours keep float32 there, so boxes fall between the grid's points."""
    torch.manual_seed(0)
    model = DETECTOR_CLASSES[kind](num_classes=3, backbone="resnet18", min_size=320, max_size=320)
    generator = model.rpn.anchor_generator if kind in ("fasterrcnn", "maskrcnn") else model.anchor_generator
    anchors = []
    generator.register_forward_hook(lambda module, inputs, output: anchors.append(output[0].dtype))
    image = torch.rand(3, 320, 320, generator=torch.Generator().manual_seed(3))
    target = {"boxes": torch.tensor([[261.3, 270.7, 301.9, 311.1]]), "labels": torch.tensor([1])}
    if kind == "maskrcnn":
        target["masks"] = torch.zeros(1, 320, 320, dtype=torch.uint8)
        target["masks"][0, 271:311, 262:301] = 1
    with torch.autocast("cpu", torch.bfloat16):
        losses = model.train()([image], [target])
        setattr(model.roi_heads if hasattr(model, "roi_heads") else model, "score_thresh", 0.0)  # boxes to look at
        with torch.no_grad():
            boxes = model.eval()([image])[0]["boxes"]
    assert anchors and set(anchors) == {torch.float32}
    assert all(loss.dtype == torch.float32 for loss in losses.values())
    assert boxes.dtype == torch.float32
    far = boxes[(boxes > 256) & (boxes < 318)]  # not clipped to the border
    assert len(far) > 10 and (far % 2 != 0).float().mean() > 0.25  # bf16: none


@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn"])
def test_a_first_tiny_elongated_image_does_not_change_the_answers_to_later_ones(kind):
    """torchvision's RoI pooler infers its level scales from the first batch and keeps them: a 64 x 200 image,
    resized to 34 x 107 and padded to 64 tall, set 1/2 where the stride says 1/4. Ours are the strides'."""
    torch.manual_seed(0)
    options = dict(num_classes=3, backbone="resnet18", backbone_options={"width": 0.25}, min_size=64, max_size=107,
                   fpn_channels=32, box_width=64)
    first, fresh = (DETECTOR_CLASSES[kind](**options) for _ in range(2))
    fresh.load_state_dict(first.state_dict())
    first.eval(), fresh.eval()
    g = torch.Generator().manual_seed(1)
    odd, square = torch.rand(3, 64, 200, generator=g), torch.rand(3, 64, 64, generator=g)
    with torch.no_grad():
        first([odd])
        a, b = first([square])[0], fresh([square])[0]
    assert first.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert len(a["boxes"]) > 0 and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
