"""The transform registry, the one model spec and the parts a model names, asked of the model itself."""

import pytest
import torch

import resforge
from resforge.config import CHOICES, ModelConfig
from resforge.models import transforms
from resforge.models.spec import ARCHITECTURE, ModelSpec, checked
from resforge.models.weights import arch_record, build_from_arch


def test_a_transform_is_refused_after_one_it_cannot_follow():
    m = resforge.create_model("resnet18", width=0.125, num_classes=3)
    transforms.record(m, {"kind": "pruned", "ratio": 0.5})
    transforms.record(m, {"kind": "lowrank", "energy": 0.9, "ranks": {}})
    with pytest.raises(resforge.ConfigError, match="was factorised .low-rank.: prune the run it came from, then "
                                                  "factorise"):
        transforms.check(m, "pruned")
    with pytest.raises(resforge.ConfigError, match="already factorised"):
        transforms.check(m, "lowrank")
    with pytest.raises(resforge.ConfigError, match="follows fused"):
        transforms.check(m, "fakequant")
    assert transforms.kinds(m) == ["pruned", "lowrank"] and transforms.has(m, "lowrank")


def test_an_unknown_transform_is_named_before_anything_is_rebuilt():
    m = resforge.create_model("resnet18", width=0.125, num_classes=3)
    arch = {**arch_record(m), "transforms": [{"kind": "pruned"}, {"kind": "sparse-3d"}]}
    with pytest.raises(resforge.CheckpointError, match="transformed by sparse-3d"):
        build_from_arch(arch, "m.json")
    assert type(build_from_arch(arch_record(resforge.create_model("mobilenet_v3_small", num_classes=2)), "x")
                ).__name__ == "MobileNetV3"  # the registry, not the name's prefix, picks the class


def test_the_config_and_the_constructors_read_one_spec():
    spec_fields = {f for f in ModelSpec.__dataclass_fields__}
    assert spec_fields <= set(ModelConfig.__dataclass_fields__)
    assert CHOICES["model.act"][0] == "relu" and CHOICES["model.variant"] == ("v1.5", "v1", "d")
    assert "init" not in ARCHITECTURE and "width" in ARCHITECTURE
    assert checked(width=1).width == 1.0
    with pytest.raises(resforge.ConfigError, match="drop_path_rate must be a number in"):
        resforge.create_model("resnet18", drop_path_rate=1.5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "mobilenet_v3_small"])
def test_the_parts_cover_the_model_once(name):
    with torch.device("meta"):
        m = resforge.create_model(name, num_classes=3)
    parts = m.parts()
    assert list(parts) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    owned = [id(p) for modules in parts.values() for mod in modules for p in mod.parameters()]
    assert sorted(owned) == sorted(id(p) for p in m.parameters())
    assert any(m.get_classifier() is mod for mod in parts["head"][-1].modules())
