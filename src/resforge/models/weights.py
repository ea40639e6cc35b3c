"""Weights in, exactly: local files or URLs, in the formats of the ecosystem.

Formats are told apart by their first bytes, not their names: safetensors, PyTorch (zip or legacy,
always read with `weights_only=True` so no pickled code runs), and Keras HDF5. torchvision and timm
state_dicts need no key mapping (our module names are theirs); Keras is converted in `keras_h5`.
Wrappers are unpacked: `{"state_dict": ...}`, `{"model": ...}`, DDP's `module.` and
torch.compile's `_orig_mod.` prefixes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_path, sha256_file, write_json
from . import record
from .detection import Detector
from .segmentation import Segmenter
from .registry import rebuild
from .transforms import apply_recorded

log = logging.getLogger("resforge")

DOWNLOAD_TIMEOUT_S = 30


def is_url(source: str | os.PathLike) -> bool:
    return str(source).startswith(("http://", "https://"))


def cache_dir() -> Path:
    """`$RESFORGE_CACHE`, else torch hub's checkpoint folder (shared with torchvision and timm)."""
    env = os.environ.get("RESFORGE_CACHE")
    return Path(env) if env else Path(torch.hub.get_dir()) / "checkpoints"


def download(url: str, *, sha256: str | None = None, cache: str | os.PathLike | None = None) -> Path:
    """Fetch `url` into the cache once; later calls (and offline ones) reuse the cached file.

    With `sha256`, both a fresh download and a cached file are checked; a mismatching download is
    never kept.
    """
    from tqdm.auto import tqdm

    name = Path(urllib.parse.urlparse(url).path).name or hashlib.sha256(url.encode()).hexdigest()[:16]
    dst = Path(cache or cache_dir()) / name
    if dst.is_file():
        if sha256 is None or sha256_file(dst) == sha256.lower():
            return dst
        log.warning("cached %s does not match its sha256; downloading it again", dst)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, atomic_path(dst) as tmp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            h = hashlib.sha256()
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=name,
                                            disable=None, leave=False) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
            if sha256 is not None and h.hexdigest() != sha256.lower():
                raise CheckpointError(f"{url} has sha256 {h.hexdigest()}, expected {sha256.lower()}; "
                                      "the file was not kept")
    except urllib.error.HTTPError as e:
        raise CheckpointError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise CheckpointError(f"cannot download {url}: {reason}. If this machine is offline, fetch the "
                              f"file elsewhere and pass its local path (or place it at {dst})") from None
    return dst


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) > 8 and int.from_bytes(head[:8], "little") < 1 << 30 and head[8:9] == b"{"


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a training checkpoint or wrapper dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in obj.items() if torch.is_tensor(v)}
    if not state:
        raise CheckpointError(f"{path} contains no weight tensors")
    return state


def read_checkpoint(source: str | os.PathLike, *, sha256: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights from a path or URL as (state_dict, hints).

    Hints describe what the file implies about the architecture or preprocessing (for Keras: the
    v1 variant and caffe preprocessing); they are empty for PyTorch formats.
    """
    path = download(str(source), sha256=sha256) if is_url(source) else Path(source)
    if path.is_dir():
        hint = f"; for a run directory give {path / 'best.safetensors'}" if (path / "best.safetensors").exists() else ""
        raise CheckpointError(f"{path} is a folder, not a weights file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if sha256 is not None and not is_url(source) and sha256_file(path) != sha256.lower():
        raise CheckpointError(f"{path} does not match the expected sha256 {sha256}")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path} is empty")
    try:
        if head.startswith(b"\x89HDF\r\n\x1a\n"):
            from .keras_h5 import read_keras_h5

            return read_keras_h5(path)
        if _looks_like_safetensors(head):
            from safetensors.torch import load_file

            return _unwrap(load_file(path), path), {}
        with warnings.catch_warnings():  # legacy pickles warn about their protocol; refused or read, it is noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        torch_file = head.startswith((b"PK\x03\x04", b"\x80"))  # a zip (torch.save) or a pickle protocol header
        if torch_file and "Weights only load failed" in str(e):  # torch's text goes on to suggest unpickling: never do that
            raise CheckpointError(f"{path} holds pickled Python objects besides tensors; resforge reads only "
                                  "tensors from PyTorch files and never runs pickled code: save the model's "
                                  "state_dict (or safetensors) instead") from None
        raise CheckpointError(f"{path} is corrupt or not a checkpoint (safetensors, PyTorch or Keras h5)") from None
    except Exception:  # every reader has its own exception types for a damaged file
        raise CheckpointError(f"{path} is corrupt or not a checkpoint (safetensors, PyTorch or Keras h5)") from None
    return _unwrap(obj, path), {}


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Stem weights for `in_chans` inputs from RGB ones: summed for grayscale (a gray image seen by
    an RGB network has three equal channels), else cycled and rescaled to keep the activation scale."""
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    reps = -(-in_chans // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def _describe_blocks(keys: Any) -> str:
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for k in keys:
        if m := re.match(r"layer(\d+)\.(\d+)\.", k):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
            bottleneck |= ".conv3." in k
    layers = [len(blocks[i]) for i in sorted(blocks)]
    return f"{'bottleneck' if bottleneck else 'basic'} blocks, layers {layers}"


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
    """Load `state` into `model` exactly, adapting only what is meant to differ.

    The classifier is left freshly initialised when the checkpoint's class count differs (or it has
    none), and the stem is folded when `in_chans` differs. Anything else that does not fit raises
    before the model is touched. Returns notes on what was adapted.
    """
    state = dict(state)
    own = model.state_dict()
    notes: list[str] = []
    stem_key = next(n for n, p in model.named_parameters() if p is model.stem_conv.weight)
    if stem_key in state and state[stem_key].dim() == 4 and state[stem_key].shape[1] != own[stem_key].shape[1]:
        have, want = state[stem_key].shape[1], own[stem_key].shape[1]
        state[stem_key] = adapt_input_conv(state[stem_key], want)
        notes.append(f"stem weights folded from {have} to {want} input channel(s)")
    dense = isinstance(model, (Detector, Segmenter))
    layers = model.class_layers() if dense else [model.get_classifier()]
    prefixes = tuple(n + "." for n, m in model.named_modules() if any(m is c for c in layers))  # fc., classifier.3.
    head = [k for k in own if k.startswith(prefixes)]
    ckpt_head = [k for k in state if k.startswith(prefixes)]
    if not ckpt_head and head:
        notes.append(f"{source} has no classifier: the {model.num_classes}-class head starts fresh")
    elif ckpt_head and any(k not in own or state[k].shape != own[k].shape for k in ckpt_head):
        if dense:
            notes.append(f"{source} was trained on other classes than the model's {model.num_classes}: its class "
                         f"layers ({', '.join(p[:-1] for p in prefixes)}) were replaced and start fresh")
        else:
            n = state[f"{prefixes[0]}weight"].shape[0] if f"{prefixes[0]}weight" in state else "?"
            notes.append(f"{source} has {n} classes, the model {model.num_classes}: "
                         "the classifier was replaced and starts fresh")
        for k in ckpt_head:
            del state[k]
    skip = set(head) if not any(k.startswith(prefixes) for k in state) else set()
    optional = re.compile(r"num_batches_tracked$")
    missing = [k for k in own if k not in state and k not in skip and not optional.search(k)]
    unexpected = [k for k in state if k not in own and not optional.search(k)]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {k} is {list(state[k].shape)} in the "
                         f"checkpoint but {list(own[k].shape)} in the model")
        raise CheckpointError(
            f"{source} does not fit this model: {'; '.join(parts)}. The checkpoint has "
            f"{_describe_blocks(state)}; the model has {_describe_blocks(own)}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return notes


def arch_record(model: nn.Module) -> dict[str, Any]:
    """What rebuilds `model`: its registry name, its spec and the transforms applied since it was built."""
    return {"name": model.model_name, "kwargs": model.spec(), "transforms": list(model.transforms)}


def build_from_arch(arch: dict[str, Any], source: str) -> nn.Module:
    """The model an `arch_record` describes, freshly initialised; CheckpointError names what does not fit."""
    if not isinstance(arch, dict) or not isinstance(arch.get("kwargs"), dict):
        raise CheckpointError(f"{source} does not describe an architecture")
    return apply_recorded(rebuild(arch.get("name"), arch["kwargs"], source), arch.get("transforms", []), source)


def sidecar_path(weights: str | os.PathLike) -> Path:
    return Path(weights).with_suffix(".json")


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Weights as safetensors, and beside them a JSON sidecar that rebuilds the model.

    The sidecar is the model record (`models.record`): the exact architecture (`model.spec()`, pruned
    widths included, and its transforms) plus the fields the caller gives (classes, preprocessing,
    metrics, where it was trained), and the name and id of the weights. Both files are written atomically
    and share an id, so a save torn between the two is detected on load.
    """
    import json
    import uuid

    from safetensors.torch import save_file

    path = Path(path)
    token = uuid.uuid4().hex
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    sidecar = {**record.write({**meta, "arch": arch_record(model)}), "weights": path.name, "id": token}
    # Both written before either is renamed into place: only a kill between the two renames can tear them.
    with atomic_path(path) as tmp, atomic_path(sidecar_path(path)) as side_tmp:
        save_file(state, tmp, metadata={"resforge_id": token})
        side_tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return path


def update_sidecar(path: str | os.PathLike, **fields: Any) -> None:
    """Add `fields` to a saved model's record (a run's profile, written once it is evaluated), atomically."""
    import json

    side = sidecar_path(path)
    write_json(side, {**json.loads(side.read_text(encoding="utf-8")), **fields})


def resolve_model_path(source: str | os.PathLike) -> Path:
    """A run directory, a weights file or its sidecar, as the weights path."""
    p = Path(source)
    if p.is_dir():
        p = p / "best.safetensors"
    elif p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if not p.is_file() and p.name == "best.safetensors" and (p.parent / "last.ckpt").is_file():
        raise CheckpointError(f"{p.parent} holds a training checkpoint (last.ckpt) but no best model ({p.name}) "
                              "yet: the run stopped before it saved one (a sparse run saves one once it reaches "
                              f"its sparsity); continue it with: resforge train --resume {p.parent} (and --epochs "
                              "past its last one if it finished)")
    if not p.is_file():
        raise CheckpointError(f"no model at {source} (expected a run directory, or a .safetensors file with "
                              "its .json sidecar)")
    return p


def load_model(source: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved model from its sidecar alone: no training code, no pickle."""
    import json

    from safetensors import safe_open

    path = resolve_model_path(source)
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"{path} has no sidecar {side.name}; it holds weights only: load it with "
                              "create_model(name, pretrained=...)")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{side} is not a readable sidecar: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), dict):
        raise CheckpointError(f"{side} is not a resforge model sidecar")
    meta = record.read(meta, str(side))
    try:
        with safe_open(str(path), "pt") as f:
            token = (f.metadata() or {}).get("resforge_id")
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if token != meta.get("id"):
        raise CheckpointError(f"{side.name} does not describe {path.name} (their ids differ): the save was "
                              "interrupted or the files come from different runs")
    model = build_from_arch(meta["arch"], str(side))
    state, _ = read_checkpoint(path)
    load_into(model, state, source=str(path))
    return model.eval(), meta
