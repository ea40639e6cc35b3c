"""Keras ResNet weights (`resnet50_weights_tf_dim_ordering_tf_kernels.h5` and kin) as a state_dict.

Keras' ResNet50/101/152 are ResNet v1: the stride sits on the first 1x1 conv, every conv has a
bias, and BN uses eps=1.001e-5. The conversion is exact: each conv bias is folded into the running
mean of the BN after it, the eps difference into its running variance. Keras models expect BGR
input with caffe mean subtraction on 0-255 pixels; we flip the stem's input channels so the model
takes RGB, and return that preprocessing as mean/std on the 0-1 scale used everywhere else.

Both Keras layer namings are read: the current one (`conv2_block1_1_conv`) and Keras 2.0's
(`res2a_branch2a`), from the HDF5 layout that keeps layer names (one group per layer and a
`layer_names` attribute, at the top as in the published files or under `model_weights` as
`model.save("x.h5")` writes). Keras 3's `.weights.h5` names layers by class (`conv2d_17`), so it is
refused with a hint rather than guessed at.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

KERAS_BN_EPS = 1.001e-5
TORCH_BN_EPS = 1e-5
# Caffe preprocessing (keras.applications.imagenet_utils, mode="caffe"), in RGB order on 0-1 pixels.
CAFFE_PREPROCESS = {"mean": [123.68 / 255, 116.779 / 255, 103.939 / 255], "std": [1 / 255] * 3}

_NEW = re.compile(r"conv(\d)_block(\d+)_(\d)_(conv|bn)$")
_OLD = re.compile(r"(res|bn)(\d)([a-z])_branch(1|2[abc])$")


def _read_layers(path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name -> its weight arrays in Keras' own order (kernel, bias / gamma, beta, mean, var)."""
    import h5py

    layers: dict[str, list[np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            for name in root.attrs["layer_names"]:
                name = name.decode() if isinstance(name, bytes) else str(name)
                group = root[name]
                names = [n.decode() if isinstance(n, bytes) else str(n)
                         for n in group.attrs.get("weight_names", [])]
                if names:
                    layers[name] = [np.asarray(group[n]) for n in names]
        elif "layers" in root and "vars" in root:
            raise CheckpointError(
                f"{path} is a Keras 3 .weights.h5 file, which does not keep layer names; re-save the "
                "model with model.save('model.h5') (the legacy format keeps them) and load that")
        else:
            raise CheckpointError(f"{path} is an HDF5 file but holds no Keras model weights")
    return layers


def _torch_name(keras_name: str) -> str | None:
    """Our module path for a Keras layer name; None for layers without weights we know."""
    if keras_name in ("conv1_conv", "conv1"):
        return "conv1"
    if keras_name in ("conv1_bn", "bn_conv1"):
        return "bn1"
    if keras_name in ("predictions", "fc1000"):
        return "fc"
    if m := _NEW.match(keras_name):
        stage, block, k, kind = int(m[1]), int(m[2]), int(m[3]), m[4]
        prefix = f"layer{stage - 1}.{block - 1}"
        if k == 0:
            return f"{prefix}.downsample.{0 if kind == 'conv' else 1}"
        return f"{prefix}.{'conv' if kind == 'conv' else 'bn'}{k}"
    if m := _OLD.match(keras_name):
        kind, stage, block, branch = m[1], int(m[2]), ord(m[3]) - ord("a"), m[4]
        prefix = f"layer{stage - 1}.{block}"
        if branch == "1":
            return f"{prefix}.downsample.{0 if kind == 'res' else 1}"
        k = "abc".index(branch[1]) + 1
        return f"{prefix}.{'conv' if kind == 'res' else 'bn'}{k}"
    return None


def _bn_name(conv: str) -> str:
    if conv == "conv1":
        return "bn1"
    if conv.endswith("downsample.0"):
        return conv[:-1] + "1"
    return re.sub(r"conv(\d)$", r"bn\1", conv)


def read_keras_h5(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read Keras ResNet (v1) weights; return our state_dict and hints for the architecture."""
    path = Path(path)
    layers = _read_layers(path)
    state: dict[str, torch.Tensor] = {}
    conv_bias: dict[str, np.ndarray] = {}
    unknown = []
    for keras_name, arrays in layers.items():
        name = _torch_name(keras_name)
        if name is None:
            unknown.append(keras_name)
            continue
        if name == "fc":
            kernel, bias = arrays
            state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.T))
            state["fc.bias"] = torch.from_numpy(bias)
        elif len(arrays) == 4:  # BatchNormalization: gamma, beta, moving mean, moving variance
            gamma, beta, mean, var = arrays
            state[f"{name}.weight"] = torch.from_numpy(gamma)
            state[f"{name}.bias"] = torch.from_numpy(beta)
            state[f"{name}.running_mean"] = torch.from_numpy(mean)
            state[f"{name}.running_var"] = torch.from_numpy(var + (KERAS_BN_EPS - TORCH_BN_EPS))
        else:  # Conv2D: HWIO kernel, optional bias
            kernel = arrays[0]
            w = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            if name == "conv1" and w.shape[1] == 3:
                w = w.flip(1)  # BGR -> RGB
            state[f"{name}.weight"] = w
            if len(arrays) > 1:
                conv_bias[name] = arrays[1]
    if unknown:
        raise CheckpointError(
            f"{path} has Keras layers that are not part of a ResNet v1 "
            f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); "
            "only keras.applications ResNet50/101/152 weights can be converted")
    if not state:
        raise CheckpointError(f"{path} holds no ResNet layers")
    for conv, bias in conv_bias.items():
        key = f"{_bn_name(conv)}.running_mean"
        if key not in state:
            raise CheckpointError(f"{path}: conv layer {conv} has no batch-norm layer after it")
        state[key] = state[key] - torch.from_numpy(bias)
    hints = {"variant": "v1", "preprocess": CAFFE_PREPROCESS}
    return state, hints
