"""Our ResNets against the peers' own implementations, through their own checkpoint files.

Reference models get random weights *and* random batch-norm statistics, so every parameter and
buffer of the conversion is exercised (default BN statistics would hide a swapped mean/variance).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch
import torchvision
from helpers import max_abs_diff
from safetensors.torch import save_file

import resforge

TOL = 1e-4


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def _check_parity(ref: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected, got = ref(x), ours.eval()(x)
    assert expected.abs().max() > 1e-2, "reference logits are degenerate; the comparison would be empty"
    diff = max_abs_diff(expected, got)
    assert diff < TOL, f"max abs diff {diff:.3g}"
    return diff


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "wide_resnet50_2", "resnext50_32x4d"])
def test_torchvision_parity(name, tmp_path):
    ref = randomize_bn(getattr(torchvision.models, name)())
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    ours = resforge.create_model(name, pretrained=path)
    _check_parity(ref, ours, torch.randn(2, 3, 224, 224))


@pytest.mark.parametrize("name", ["resnet50", "resnet50d"])
def test_timm_parity(name, tmp_path):
    timm = pytest.importorskip("timm")
    ref = randomize_bn(timm.create_model(name, pretrained=False))
    path = tmp_path / f"{name}.safetensors"
    save_file(ref.state_dict(), path)
    ours = resforge.create_model(name, pretrained=path)
    # An odd size exercises the avg-pool shortcut's ceil_mode / count_include_pad choices.
    _check_parity(ref, ours, torch.randn(2, 3, 225, 225))


def test_our_state_dict_loads_into_torchvision():
    ours = randomize_bn(resforge.create_model("resnet50"))
    tv = torchvision.models.resnet50()
    result = tv.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _check_parity(tv.eval(), ours, torch.randn(1, 3, 224, 224))


# Keras 2.0 layer names, as in the first published resnet50_weights_tf_dim_ordering_tf_kernels.h5.
def _keras2_name(name: str) -> str:
    import re

    if name in ("conv1_conv", "conv1_bn", "predictions"):
        return {"conv1_conv": "conv1", "conv1_bn": "bn_conv1", "predictions": "fc1000"}[name]
    m = re.match(r"conv(\d)_block(\d+)_(\d)_(conv|bn)$", name)
    if not m:
        return name
    branch = "1" if m[3] == "0" else "2" + "abc"[int(m[3]) - 1]
    return f"{'res' if m[4] == 'conv' else 'bn'}{m[1]}{'abcdef'[int(m[2]) - 1]}_branch{branch}"


@pytest.fixture(scope="module")
def keras_resnet50():
    """A Keras ResNet50 with random weights, conv biases and BN statistics, and its logits."""
    keras = pytest.importorskip("keras")
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (w.shape for w in weights)
            layer.set_weights([rng.uniform(0.5, 1.5, gamma), rng.uniform(-0.1, 0.1, beta),
                               rng.uniform(-0.1, 0.1, mean), rng.uniform(0.5, 1.5, var)])
        elif isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([weights[0], rng.uniform(-0.1, 0.1, weights[1].shape)])
    x_rgb = torch.randn(2, 3, 224, 224)
    x_bgr_nhwc = x_rgb.flip(1).permute(0, 2, 3, 1).numpy()
    logits = torch.as_tensor(np.asarray(keras.ops.convert_to_numpy(model(x_bgr_nhwc, training=False))))
    return model, x_rgb, logits


def _write_legacy_weights(model, path, rename=lambda n: n):
    """The layout of Keras' published ImageNet weight files (one group per layer)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    if rename("conv1_conv") != "conv1_conv":
        with h5py.File(path, "r+") as f:
            for old in list(f.keys()):
                if rename(old) != old:
                    f.move(old, rename(old))
            f.attrs["layer_names"] = [rename(n.decode() if isinstance(n, bytes) else n).encode()
                                     for n in f.attrs["layer_names"]]


@pytest.mark.parametrize("layout", ["published", "keras2-names", "model.save"])
def test_keras_parity(keras_resnet50, layout, tmp_path):
    model, x, expected = keras_resnet50
    if layout == "published":
        path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
        _write_legacy_weights(model, path)
    elif layout == "keras2-names":
        path = tmp_path / "resnet50_keras2.h5"
        _write_legacy_weights(model, path, _keras2_name)
    else:
        path = tmp_path / "model.h5"
        model.save(path)
    ours = resforge.create_model("resnet50", pretrained=path).eval()
    assert ours.spec()["variant"] == "v1"
    assert ours.pretrained_cfg["std"] == pytest.approx([1 / 255] * 3)
    with torch.no_grad():
        diff = max_abs_diff(expected, ours(x))
    assert diff < TOL, f"max abs diff {diff:.3g}"


def test_keras3_weights_file_is_refused_with_a_hint(keras_resnet50, tmp_path):
    model = keras_resnet50[0]
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    with pytest.raises(resforge.CheckpointError, match=r"model\.save\('model\.h5'\)"):
        resforge.create_model("resnet50", pretrained=path)
