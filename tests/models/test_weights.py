"""Reading checkpoints: formats, wrappers, adaptation, URLs, and every way a file can be wrong."""

import logging
import os
import pickle

import pytest
import torch
from helpers import dead_url, max_abs_diff
from safetensors.torch import save_file

import resforge
from resforge.models.weights import download, read_checkpoint


@pytest.fixture
def ref():
    return resforge.create_model("resnet18", width=0.25, num_classes=10, zero_init_residual=False).eval()


def _load(path, **kw):
    return resforge.create_model("resnet18", width=0.25, pretrained=path, **{"num_classes": 10, **kw}).eval()


def _same(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return max_abs_diff(a(x), b(x)) < 1e-6


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors", "wrapped-state_dict", "wrapped-model",
                                 "ddp-prefix", "compiled-prefix"])
def test_formats_round_trip(ref, tmp_path, fmt):
    sd = ref.state_dict()
    path = tmp_path / "ckpt"
    if fmt == "zip":
        torch.save(sd, path)
    elif fmt == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        save_file(sd, path)
    elif fmt == "wrapped-state_dict":
        torch.save({"state_dict": sd, "epoch": 3, "arch": "resnet18"}, path)
    elif fmt == "wrapped-model":
        torch.save({"model": sd, "optimizer": {}, "args": {"lr": 0.1}}, path)
    elif fmt == "ddp-prefix":
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    else:
        torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, path)
    assert _same(ref, _load(path))


def test_head_is_replaced_for_another_class_count(ref, tmp_path, caplog):
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="resforge"):
        m = _load(path, num_classes=4)
    assert "10 classes, the model 4" in caplog.text
    assert m.fc.out_features == 4
    # Everything but the head is the checkpoint's.
    assert torch.equal(m.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert not torch.equal(m.fc.weight[:4], ref.fc.weight[:4])


def test_grayscale_model_from_rgb_weights_sees_gray_as_rgb_did(ref, tmp_path):
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    gray = _load(path, in_chans=1)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert max_abs_diff(gray(x), ref(x.expand(-1, 3, -1, -1))) < 1e-5


def test_four_channel_stem_keeps_the_activation_scale(ref, tmp_path):
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    m = _load(path, in_chans=4)
    x = torch.rand(1, 3, 32, 32)
    x4 = torch.cat([x, x[:, :1]], 1)  # a 4th channel equal to the first
    with torch.no_grad():
        a, b = m.forward_stem(x4), ref.forward_stem(x)
    assert abs(a.mean().item() - b.mean().item()) < 0.1 * b.abs().mean().item()


def test_wrong_architecture_names_keys_and_what_the_checkpoint_is(ref, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    with pytest.raises(resforge.CheckpointError) as e:
        resforge.create_model("resnet50", width=0.25, pretrained=path)
    msg = str(e.value)
    assert "missing key(s)" in msg and "shape mismatch" in msg
    assert "basic blocks, layers [2, 2, 2, 2]" in msg and "bottleneck blocks, layers [3, 4, 6, 3]" in msg


def test_wrong_width_is_a_shape_mismatch(ref, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    with pytest.raises(resforge.CheckpointError, match="shape mismatch"):
        resforge.create_model("resnet18", width=0.5, pretrained=path)


def test_failed_load_leaves_model_untouched(ref, tmp_path):
    from resforge.models import load_into

    sd = dict(ref.state_dict())
    sd["layer1.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    m = resforge.create_model("resnet18", width=0.25, num_classes=10)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(resforge.CheckpointError):
        load_into(m, sd)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("content", [b"", b"hello, I am not a checkpoint\n" * 3, b"\x80\x04garbage"],
                         ids=["empty", "text", "bad-pickle"])
def test_non_checkpoint_files(tmp_path, content):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(resforge.CheckpointError, match="x.pth"):
        read_checkpoint(path)


@pytest.mark.parametrize("fmt", ["zip", "safetensors"])
def test_truncated_checkpoint(ref, tmp_path, fmt):
    path = tmp_path / "ckpt"
    torch.save(ref.state_dict(), path) if fmt == "zip" else save_file(ref.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(resforge.CheckpointError, match="is corrupt or not a checkpoint"):
        read_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(resforge.CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")


def test_a_json_file_or_a_folder_is_named_for_what_it_is(tmp_path):
    """torch's own text for these suggests weights_only=False: the message must never pass that on."""
    path = tmp_path / "best.json"
    path.write_text('{"format": "resforge-model"}')
    with pytest.raises(resforge.CheckpointError) as e:
        read_checkpoint(path)
    assert str(e.value) == f"{path} is corrupt or not a checkpoint (safetensors, PyTorch or Keras h5)"
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"")
    with pytest.raises(resforge.CheckpointError, match=r"is a folder, not a weights file; for a run directory give "
                                                       r".*best\.safetensors"):
        read_checkpoint(run)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(resforge.CheckpointError, match="pickled Python objects besides tensors") as e:
        read_checkpoint(path)
    assert "weights_only" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(resforge.CheckpointError):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_url_download_cache_and_sha256(ref, tmp_path, http_root, monkeypatch):
    import hashlib

    root, base = http_root
    torch.save(ref.state_dict(), root / "r18.pth")
    digest = hashlib.sha256((root / "r18.pth").read_bytes()).hexdigest()
    monkeypatch.setenv("RESFORGE_CACHE", str(tmp_path / "cache"))
    m = _load(f"{base}/r18.pth")
    assert _same(ref, m)
    assert (tmp_path / "cache" / "r18.pth").is_file()
    # Served no more: the cached copy is used, and its sha256 is checked.
    (root / "r18.pth").unlink()
    assert _same(ref, resforge.create_model("resnet18", width=0.25, num_classes=10,
                                            pretrained=f"{base}/r18.pth", sha256=digest).eval())


def test_sha256_mismatch_keeps_nothing(ref, tmp_path, http_root):
    root, base = http_root
    torch.save(ref.state_dict(), root / "r18.pth")
    cache = tmp_path / "cache"
    with pytest.raises(resforge.CheckpointError, match="sha256"):
        download(f"{base}/r18.pth", sha256="0" * 64, cache=cache)
    assert not any(cache.iterdir())


def test_unreachable_url_is_one_clear_error(tmp_path):
    with pytest.raises(resforge.CheckpointError, match="cannot download .*offline"):
        download(dead_url(), cache=tmp_path)
    assert not any(tmp_path.iterdir())


def test_http_error_is_reported(tmp_path, http_root):
    _, base = http_root
    with pytest.raises(resforge.CheckpointError, match="404|Not Found"):
        download(f"{base}/missing.pth", cache=tmp_path / "c")


def test_a_saved_model_keeps_its_transforms_and_newer_sidecars_are_named(tmp_path):
    import json

    from resforge.models import load_model, save_model

    m = resforge.create_model("resnet18", width=0.125, num_classes=3)
    m.transforms.append({"kind": "pruned", "ratio": 0.5})
    path = save_model(m, tmp_path / "m.safetensors", {})
    loaded, meta = load_model(path)
    assert loaded.transforms == [{"kind": "pruned", "ratio": 0.5}] and meta["schema"] == "resforge.model"
    side = tmp_path / "m.json"
    record = json.loads(side.read_text())
    side.write_text(json.dumps({**record, "arch": {**record["arch"], "transforms": [{"kind": "sparse-3d"}]}}))
    with pytest.raises(resforge.CheckpointError, match="transformed by sparse-3d, which this resforge cannot rebuild"):
        load_model(path)
    side.write_text(json.dumps({**record, "version": 99}))
    with pytest.raises(resforge.CheckpointError, match="model record version 99; this one reads up to 2"):
        load_model(path)
    old = {k: v for k, v in record.items() if k not in ("schema", "version")}
    side.write_text(json.dumps({**old, "format": "resforge-model", "version": 3}))
    with pytest.raises(resforge.CheckpointError, match="version 3 of the sidecar; this resforge reads up to 2"):
        load_model(path)


def test_the_sidecars_and_export_records_of_earlier_releases_still_load(tmp_path):
    """A "resforge-model" sidecar (versions 1 and 2) and a version-1 record of an exported file."""
    import json

    from resforge.data.transforms import Preprocess
    from resforge.models import load_model, save_model
    from resforge.runtime.record import ModelInfo

    m = resforge.create_model("resnet18", width=0.125, num_classes=2)
    path = save_model(m, tmp_path / "m.safetensors", {})
    token = json.loads((tmp_path / "m.json").read_text())["id"]
    pre = {"img_size": 32, "resize_size": 37, "mean": [0.5] * 3, "std": [0.25] * 3, "in_chans": 3,
           "interpolation": "bilinear"}
    arch = {"name": "resnet18", "kwargs": {**m.spec(), "variant": "v1.5"}}
    v2 = {"format": "resforge-model", "version": 2, "weights": path.name, "id": token,
          "arch": {**arch, "transforms": []}, "classes": ["cat", "dog"], "preprocess": pre,
          "metrics": {"val_top1": 0.5}, "trained": {"epoch": 3}}
    for sidecar in (v2, {**v2, "version": 1, "arch": arch}):
        (tmp_path / "m.json").write_text(json.dumps(sidecar))
        model, meta = load_model(path)
        assert model.transforms == [] and meta["arch"]["name"] == "resnet18" and meta["trained"] == {"epoch": 3}
        info = ModelInfo.from_sidecar(meta, str(path))
        assert info.classes == ["cat", "dog"] and info.pre == Preprocess.from_dict(pre) and info.name == "resnet18"
    v1_onnx = {"schema": "resforge.model", "version": 1, "classes": ["cat", "dog"],
               "preprocess": {**pre, "resize": "shorter_side", "crop": "center", "antialias": True,
                              "scale": 1 / 255, "channel_order": "RGB"},
               "input": {"kind": "tensor", "dtype": "float32", "layout": "NCHW", "size": [3, 32, 32]},
               "formats": ["JPEG", "PNG"], "model": arch, "metrics": {}, "trained": {}, "export": {"opset": 18}}
    info = ModelInfo.from_json(json.dumps(v1_onnx), "old.onnx")
    assert info.arch == arch and info.formats == ["JPEG", "PNG"] and info.export == {"opset": 18}
    again = info.to_dict()  # written anew in the one format
    assert again["version"] == 2 and again["arch"] == arch and "model" not in again
    assert ModelInfo.from_dict(again, "new.onnx") == info
