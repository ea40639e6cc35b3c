"""What a model carries about itself, the same in every format: the model record, typed.

The record holds what it takes to use the model without its training code: the class names, the
preprocessing (resize of the shorter side, centre crop, scaling, mean/std, channel order), what
the input is (a normalised float NCHW tensor, or uint8 NHWC pixels of any size when the
preprocessing is inside the graph), the image formats it accepts, the architecture, the training
metrics and where it came from. Its one format, and the reading of older ones, is `models.record`:
the safetensors sidecar is the record, an ONNX file carries it in `metadata_props` under
`resforge.model` (beside ONNX's own `Image.*` keys where they apply), an OpenVINO IR in rt_info under
`resforge`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..data.annotations import read_split_rows
from ..data.folder import IMAGE_FORMATS, Sample, recorded_samples, recorded_split
from ..data.transforms import Preprocess, imagenet_stats, make_preprocess
from ..errors import CheckpointError, ConfigError
from ..models import record

ONNX_KEY = record.SCHEMA  # metadata_props key
OV_KEY = "resforge"  # rt_info key
PT2_FILE = "resforge.model.json"  # extra file of a torch.export program
INPUTS = ("tensor", "pixels")  # float NCHW normalised | uint8 NHWC, any size, preprocessing in the graph
TASK_FIELDS = ("tile", "ignore_index", "colors")  # what a dense task's record keeps beside every task's
# What a user may give for a model that carries no record (a foreign ONNX file): option -> what it is.
OVERRIDES = {"classes": "class names", "img_size": "input size", "crop_pct": "centre-crop fraction",
             "mean": "normalisation mean", "std": "normalisation std", "interpolation": "resize interpolation",
             "formats": "accepted image formats"}


@dataclass
class ModelInfo:
    classes: list[str]
    pre: Preprocess
    input: str = "tensor"
    arch: dict[str, Any] | None = None  # {"name", "kwargs", "transforms"}: rebuilds the network (models.weights)
    metrics: dict[str, Any] = field(default_factory=dict)
    trained: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)  # format, opset, dtype, versions, parity
    formats: list[str] = field(default_factory=lambda: list(IMAGE_FORMATS))  # what image files it decodes (PIL's)
    task: str = "classify"  # what the network answers: class logits, per-pixel ones ("segment"), boxes ("detect")
    task_record: dict[str, Any] = field(default_factory=dict)  # the task's own fields (TASK_FIELDS)
    profile: dict[str, Any] | None = None  # a classifier's monitoring reference (runtime.profile.Profile's form)

    @property
    def takes_pixels(self) -> bool:
        return self.input == "pixels"

    @property
    def name(self) -> str:
        return (self.arch or {}).get("name") or "model"

    def to_dict(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"classes": self.classes, "preprocess": self.pre.to_dict()}
        if self.takes_pixels:
            fields["input"] = {"kind": "pixels", "dtype": "uint8", "layout": "NHWC", "size": "any"}
        return record.write({"task": self.task, **fields, **self.task_record, "formats": self.formats,
                             "arch": self.arch, "metrics": self.metrics, "trained": self.trained,
                             "export": self.export, **({"profile": self.profile} if self.profile else {})})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any, source: str) -> ModelInfo:
        """A record read from a file (any version, or a sidecar); CheckpointError names what is wrong with it."""
        d = record.read(d, source)
        raw = d.get("preprocess")
        pre = _preprocess(raw, source)
        unsupported = {k: raw.get(k) for k, v in record.IMPLIED.items() if k != "scale" and raw.get(k, v) != v}
        if unsupported:
            raise CheckpointError(f"{source}: preprocessing this resforge cannot reproduce: {unsupported}")
        inp = d.get("input") or {}
        kind = inp.get("kind", "tensor") if isinstance(inp, dict) else None
        if kind not in INPUTS:
            raise CheckpointError(f"{source}: its model record has an unknown input kind")
        info = cls(classes=d.get("classes"), pre=pre, input=kind, arch=d.get("arch"),
                   metrics=d.get("metrics") or {}, trained=d.get("trained") or {}, export=d.get("export") or {},
                   formats=image_formats(d.get("formats", IMAGE_FORMATS), source, CheckpointError),
                   task=d.get("task", "classify"), task_record={k: d[k] for k in TASK_FIELDS if k in d},
                   profile=d.get("profile"))
        _check_classes(info.classes, source)
        return info

    @classmethod
    def from_json(cls, text: str, source: str) -> ModelInfo:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise CheckpointError(f"{source}: its model record is not valid JSON ({e})") from None
        return cls.from_dict(d, source)

    @classmethod
    def from_sidecar(cls, meta: dict[str, Any], source: str) -> ModelInfo:
        """The record of a saved model (`best.json`), which only a training run fills in."""
        if not {"classes", "preprocess"} <= meta.keys():
            raise CheckpointError(f"{source} has no classes or preprocessing in its sidecar: it was not saved by "
                                  "a training run, so it cannot classify images as it is")
        return cls.from_dict(meta, f"the sidecar of {source}")

    def recorded_split(self, model: str | os.PathLike) -> Path | None:
        """The split.csv of the run that trained this model (whose file is `model`); None when not found."""
        return recorded_split(model, self.trained.get("run"))

    def recorded_samples(self, model: str | os.PathLike, split: str) -> list[Sample]:
        """(file, label) of one split of the run that trained this model (whose file is `model`), as its
        split.csv recorded it; none when the split record or the data folder is not found."""
        data, split_csv = self.trained.get("data"), self.recorded_split(model)
        if not data or split_csv is None:
            return []
        if self.task != "classify":  # a dense run's split.csv names the images alone (-1: no class)
            return [(str(Path(data) / rel), -1) for s, rel in read_split_rows(split_csv)
                    if s == split and (Path(data) / rel).is_file()]
        return recorded_samples(data, split_csv, split, self.classes)

    def check_model(self, source: str, outputs: int | None, in_chans: int | None) -> None:
        """The record and the network agree on the class count and the input channels."""
        if outputs is not None and outputs != len(self.classes):
            raise CheckpointError(f"{source} names {len(self.classes)} classes but the model has {outputs} outputs")
        if in_chans is not None and in_chans != self.pre.in_chans:
            raise CheckpointError(f"{source} feeds {self.pre.in_chans} channel(s) to a model that takes {in_chans}")

    def with_export(self, **export: Any) -> ModelInfo:
        return replace(self, export={**self.export, **export})


def _check_classes(classes: Any, source: str) -> None:
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{source} has no list of class names")


def _preprocess(d: Any, source: str) -> Preprocess:
    try:
        return Preprocess.from_dict(d)
    except ValueError as e:
        raise CheckpointError(f"{source} has unusable preprocessing: {e}") from None


def onnx_props(info: ModelInfo) -> dict[str, str]:
    """metadata_props of an exported ONNX file: our record, plus ONNX's image keys for a graph taking pixels."""
    props = {ONNX_KEY: info.to_json()}
    if info.takes_pixels:  # the keys of the ONNX model zoo / Windows ML image metadata
        props.update({"Image.BitmapPixelFormat": "Rgb8" if info.pre.in_chans == 3 else "Gray8",
                      "Image.ColorSpaceGamma": "SRGB", "Image.NominalPixelRange": "NominalRange_0_255"})
    return props


def assemble(source: str, found: str | None, overrides: dict[str, Any], in_chans: int | None,
             img_size: int | None, outputs: int | None) -> ModelInfo:
    """The record of a model file: the one it carries, or, for a file without one, what the user gave
    (`overrides`) and the graph shows (input channels and size, class count). A missing piece is named.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(OVERRIDES)
    if unknown:
        raise CheckpointError(f"unknown model metadata {', '.join(sorted(unknown))}; known: {', '.join(OVERRIDES)}")
    if found is not None:
        info = ModelInfo.from_json(found, source)
        if given:
            info = _apply(info, given, source)
    else:
        missing = [f"{OVERRIDES['classes']} (--classes)"] if "classes" not in given else []
        size = given.get("img_size") or img_size
        if not size:
            missing.append(f"{OVERRIDES['img_size']} (--img-size; the graph's input size is not fixed)")
        if missing:
            raise CheckpointError(f"{source} carries no resforge metadata, and these are unknown: "
                                  f"{'; '.join(missing)}. Give them, or export the model with resforge")
        chans, defaults = in_chans or 3, DataConfig()
        mean, std = imagenet_stats(chans)
        pre = make_preprocess(size, given.get("crop_pct", defaults.crop_pct), chans,
                              given.get("interpolation", defaults.interpolation), given.get("mean", mean),
                              given.get("std", std))
        info = ModelInfo(classes=_class_list(given["classes"]), pre=_preprocess(pre.to_dict(), source),
                         formats=image_formats(given.get("formats", IMAGE_FORMATS), "--formats"))
    info.check_model(source, outputs if info.task == "classify" else None, in_chans)  # a dense graph's last dim
    return info


def _apply(info: ModelInfo, given: dict[str, Any], source: str) -> ModelInfo:
    """A record with the user's class names (for instance for a file that has indices) and image formats. Its
    preprocessing is the one the model was trained with: other values would change every answer without a word
    (and a graph of fixed size or with its preprocessing inside refuses them anyway), so they are refused; the
    same values pass."""
    p = info.pre
    asked = make_preprocess(given.get("img_size", p.img_size), given.get("crop_pct", p.img_size / p.resize_size),
                            p.in_chans, given.get("interpolation", p.interpolation), given.get("mean", p.mean),
                            given.get("std", p.std))
    recorded = {"img_size": ("img_size", p.img_size), "crop_pct": ("resize_size", f"{p.img_size / p.resize_size:.4g}"),
                "interpolation": ("interpolation", p.interpolation), "mean": ("mean", _listed(p.mean)),
                "std": ("std", _listed(p.std))}
    changed = [f"{k} {_listed(given[k])} (recorded: {shown})" for k, (field, shown) in recorded.items()
               if k in given and getattr(asked, field) != getattr(p, field)]
    if changed:
        raise ConfigError(f"{source} records the preprocessing it was trained with, and {'; '.join(changed)} "
                          "would change every answer: leave it out (those options describe a model file "
                          "without a record)")
    classes = _class_list(given["classes"]) if "classes" in given else info.classes
    formats = image_formats(given["formats"], "--formats") if "formats" in given else info.formats
    return replace(info, classes=classes, formats=formats)


def _listed(value: Any) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else str(value)


def _class_list(classes: Any) -> list[str]:
    """Class names as a list, a comma-separated string, or a UTF-8 text file with one per line."""
    if isinstance(classes, str):
        path = Path(classes)
        if "," not in classes and path.is_file():
            try:
                return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read class names from {path}: {e}") from None
        return [c.strip() for c in classes.split(",") if c.strip()]
    return [str(c) for c in classes]


def image_formats(names: Any, source: str, error: type[Exception] = ConfigError) -> list[str]:
    """PIL format names (any case; a list, or a comma-separated string), each one PIL can open; `error` is
    raised otherwise (CheckpointError for a record read from a file)."""
    from PIL import Image

    if isinstance(names, str):
        names = names.split(",")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise error(f"{source}: image formats must be a list of names, got {names!r}")
    Image.init()
    wanted = [n.strip().upper() for n in names if n.strip()]
    unknown = [n for n in wanted if n not in Image.OPEN]
    if unknown or not wanted:
        raise error(f"{source}: {'not formats PIL opens: ' + ', '.join(unknown) if unknown else 'no image format'} "
                    f"(PIL opens {', '.join(sorted(Image.OPEN))})")
    return wanted
