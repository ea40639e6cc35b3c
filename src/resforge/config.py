"""One config object for the whole path: defaults < recipe < config file < flags < --set.

Each stage reads its own section. Every field is a command-line flag of the same name (generated
from the dataclasses, with the help text and range kept beside the field), a YAML key in its
section, and a keyword of `resforge.train`. The resolved config is saved in every run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .models.detection import CHOICES as DETECT_CHOICES
from .models.detection import DETECTORS, DetectorSpec
from .models.segmentation import SEGMENTERS, SegmenterSpec
from .models.spec import CHOICES as MODEL_CHOICES
from .models.spec import ModelSpec
from .options import BOUNDS, add_flags, convert
from .options import option as _opt


@dataclass
class ModelConfig(ModelSpec):
    """The network's options (`models.spec.ModelSpec`), and where it starts from."""

    small_input: bool | None = _opt(None, "3x3 stride-1 stem without max-pool (default: on when img_size <= 64)")
    name: str = _opt("resnet50", "model name (see 'resforge models')", flag="model")
    pretrained: str | None = _opt(None, "weights to start from: a path or URL (.pth, .safetensors, Keras .h5)")
    init_from: str | None = _opt(None, "start from a saved model (run directory or .safetensors): its architecture, "
                                       "pruned widths included, its weights and its preprocessing", flag="init")


@dataclass
class DetectConfig(DetectorSpec):
    """The detector over the `model` backbone, when the task is detection."""

    detector: str = _opt("fasterrcnn", "torchvision's detector over the backbone: fasterrcnn, maskrcnn (boxes and "
                                       "instance masks), retinanet, fcos")


@dataclass
class SegmentConfig(SegmenterSpec):
    """The segmenter over the `model` backbone, when the task is semantic segmentation."""

    segmenter: str = _opt("deeplabv3plus", "the head over the backbone: deeplabv3plus (ASPP and a decoder over C2: "
                                           "sharper edges), deeplabv3 (torchvision's), fcn")
    ignore_index: int = _opt(255, "the mask value no loss or figure counts (Pascal VOC's object borders)", ge=-1,
                             le=65535)
    class_weights: bool = _opt(False, "weigh the loss by median-frequency class weights from the training pixels "
                                      "(rare classes count more)")
    loss: str = _opt("ce", "ce (cross-entropy) | ce+dice (plus the soft Dice loss averaged over the classes: a small "
                           "class weighs as much as a large one)")


@dataclass
class DataConfig:
    root: str = _opt("", "image folder: root/<class>/* or root/{train,val[,test]}/<class>/*", flag=None)
    task: str = _opt("auto", "what to learn: auto (detect when the folder has box annotations: COCO JSON, VOC XML, "
                             "YOLO labels; segment when it has images/ beside masks/; else classify) | classify | "
                             "detect | segment")
    tile: int | None = _opt(None, "detection: train on tiles of this many px cut from each image, and evaluate "
                                  "and predict by sliced inference (large images, small objects)", ge=32,
                            metavar="PX")
    overlap: float = _opt(0.2, "detection: share of a tile that overlaps its neighbour", ge=0, lt=1)
    val_split: float = _opt(0.2, "fraction of each class held out for validation when there is no val folder",
                            ge=0, lt=1)
    split_seed: int = _opt(123, "seed of the stratified train/val split")
    img_size: int = _opt(224, "square input size the network sees", ge=16)
    crop_pct: float = _opt(0.875, "evaluation: resize to img_size/crop_pct, then centre-crop img_size", gt=0, le=1)
    in_chans: int = _opt(3, "3 for RGB, 1 to read images as grayscale")
    interpolation: str = _opt("bilinear", "resize interpolation")
    normalize: str = _opt("auto", "auto (the pretrained weights' or ImageNet's) | imagenet | dataset | none")
    batch_size: int = _opt(32, "images per batch", ge=1)
    workers: int = _opt(-1, "data-loading processes (-1: one per spare CPU core, up to 8)", ge=-1)
    cache: str = _opt("auto", "keep decoded, resized images in memory: auto (small sets) | on | off")
    decode: str = _opt("cpu", "where training images are decoded and augmented: cpu (loader processes; every "
                              "augmentation) | gpu (JPEG batches by nvjpeg on the training GPU; random-resized crop, "
                              "flips and normalisation only; validation stays on the CPU)")
    max_pixels: int = _opt(89_478_485, "images with more pixels are skipped as possible decompression bombs",
                           ge=1)


@dataclass
class AugmentConfig:
    preset: str = _opt("standard", "none: resize+centre crop | standard: random-resized crop + h-flip | "
                                   "strong: standard + TrivialAugment + random erasing", flag="augment")
    scale: list[float] = _opt([0.08, 1.0], "random-resized-crop area range", nargs=2, gt=0, le=1)
    hflip: float | None = _opt(None, "horizontal flip probability (preset default)", ge=0, le=1)
    vflip: float = _opt(0.0, "vertical flip probability", ge=0, le=1)
    rotation: float = _opt(0.0, "random rotation range in degrees", ge=0)
    color_jitter: float = _opt(0.0, "brightness/contrast/saturation jitter strength", ge=0)
    noise: float = _opt(0.0, "Gaussian noise sigma (on 0-1 pixels)", ge=0)
    auto_augment: str | None = _opt(None, "trivial | rand | none (preset default)")
    random_erasing: float | None = _opt(None, "random erasing probability (preset default)", ge=0, le=1)
    mixup: float = _opt(0.0, "MixUp alpha (0: off)", ge=0)
    cutmix: float = _opt(0.0, "CutMix alpha (0: off)", ge=0)
    mix_prob: float = _opt(1.0, "probability a batch is mixed when mixup/cutmix are on", ge=0, le=1)


@dataclass
class OptimConfig:
    optimizer: str = _opt("sgd", "sgd | adam | adamw | rmsprop")
    lr: float | None = _opt(None, "peak learning rate (default: 0.1 x batch/256 for SGD, 1e-3 otherwise)",
                            gt=0)
    momentum: float = _opt(0.9, "SGD/RMSProp momentum", ge=0)
    nesterov: bool = _opt(True, "Nesterov momentum for SGD")
    weight_decay: float = _opt(5e-5, "L2 weight decay (decoupled for AdamW)", ge=0)
    wd_norm_bias: bool = _opt(False, "also decay norm weights and biases (off: Bag of Tricks)")
    l1: float = _opt(0.0, "L1 penalty on conv and linear weights", ge=0)
    l1_bn: float = _opt(0.0, "L1 penalty on batch-norm scales (network slimming: sparse scales for "
                             "'prune --importance bn-scale'; 1e-4 is the paper's)", ge=0)
    clip_grad: float | None = _opt(None, "clip the gradient norm to this value", gt=0)
    accum_steps: int = _opt(1, "accumulate gradients over this many batches per step", ge=1)
    schedule: str = _opt("cosine", "cosine | step | onecycle | constant")
    warmup_epochs: float = _opt(0.0, "linear warm-up length", ge=0)
    min_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of the peak (cosine)", ge=0, lt=1)
    step_size: int = _opt(30, "step schedule: epochs between decays", ge=1)
    gamma: float = _opt(0.1, "step schedule: decay factor", gt=0, le=1)
    freeze: list[str] = _opt([], "parts kept fixed (backbone: all but the head)")
    backbone_lr_mult: float = _opt(1.0, "learning-rate multiplier for everything but the head", ge=0)


@dataclass
class TrainConfig:
    epochs: int = _opt(10, "training epochs", ge=1)
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy", ge=0, lt=1)
    amp: str = _opt("auto", "mixed precision: auto (bf16 where the hardware has it) | bf16 | fp16 | off")
    channels_last: bool = _opt(True, "NHWC memory layout (faster convolutions on CPU and tensor cores)")
    compile: bool = _opt(False, "torch.compile the model")
    sync_bn: bool = _opt(False, "with several CUDA processes, batch-norm statistics over the global batch "
                                "(SyncBatchNorm), not each process's slice")
    device: str = _opt("auto", "auto (CUDA, then CPU) | cpu | cuda | cuda:N")
    ema: bool = _opt(False, "keep an exponential moving average of the weights, evaluated alongside")
    ema_decay: float = _opt(0.9998, "EMA decay per step (warmed up over the first steps)", gt=0, lt=1)
    teacher: str | None = _opt(None, "distil from this model (run directory or .safetensors; same classes), "
                                     "which sees the same augmented batches")
    kd_alpha: float = _opt(0.5, "distillation: weight of the label loss (the teacher's gets 1 - alpha)",
                           ge=0, le=1)
    kd_temperature: float = _opt(2.0, "distillation: softmax temperature of both models", gt=0)
    sparsity: float = _opt(0.0, "unstructured pruning: zero this share of the conv and linear weights, growing on "
                                "Zhu & Gupta's cubic schedule over the first seven tenths of the run (0: off)",
                                ge=0, lt=1)
    sparsity_scope: str = _opt("layer", "rank weights for --sparsity within each layer, or over all layers")
    time_limit: float = _opt(0.0, "minutes to train for: after each epoch the number of epochs (and the lr "
                                  "schedule) is refitted to end within it (0: off)", ge=0)
    patience: int = _opt(0, "stop after this many epochs without improvement (0: never)", ge=0)
    metric: str = _opt("val_top1", "metric that picks the best checkpoint and drives early stopping: "
                                   "val_top1 | val_loss (classify), val_map50 | val_map (detect), val_miou (segment); "
                                   "default: the task's first")
    keep: str = _opt("best", "the weights best.safetensors holds: best (the epoch train.metric rates highest) | "
                             "last (the final epoch's: when the validation split is too small to rate epochs by)")
    seed: int = _opt(42, "seed of initialisation, shuffling and augmentation")
    deterministic: bool = _opt(False, "deterministic algorithms (bit-exact reruns and resumes; slower)")
    project: str = _opt("runs", "folder holding run directories")
    name: str | None = _opt(None, "run name (default: <model>-<data folder>, numbered if taken)")
    exist_ok: bool = _opt(False, "reuse the run directory if it exists")


@dataclass(kw_only=True)
class ConfigSource:
    """Where a training config comes from besides its flags: a recipe, a YAML file."""
    recipe: str | None = _opt(None, "built-in recipe (see 'resforge recipes')")
    config: str | None = _opt(None, "YAML config (sections model/data/augment/optim/train)", metavar="FILE")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    recipe: str | None = None
    user_set: list[str] = field(default_factory=list)  # dotted keys given by a config file, a flag or a keyword
    auto: dict[str, str] | None = None  # the auto recipe's choices (key -> reason); None until it has run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_META = ("recipe", "user_set", "auto")  # what a config records about itself, beside its sections
SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name not in _META]
AUTO_RECIPE = "auto"
AUTO_DESCRIPTION = ("the default: fitted to the folder and the budget (image size, crops, flips, stem, channels, "
                    "model, batch, optimiser, warm-up and decay), each choice printed with its reason")
CHOICES = {  # the one list of each option's accepted values
    "augment.preset": ("none", "standard", "strong"),
    "augment.auto_augment": ("trivial", "rand", "none"),
    "optim.optimizer": ("sgd", "adam", "adamw", "rmsprop"),
    "optim.schedule": ("cosine", "step", "onecycle", "constant"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.metric": ("val_top1", "val_loss", "val_map", "val_map50", "val_miou"),
    "train.keep": ("best", "last"),
    "data.task": ("auto", "classify", "detect", "segment"),
    "segment.segmenter": SEGMENTERS,
    "segment.loss": ("ce", "ce+dice"),
    "detect.detector": DETECTORS,
    **{f"detect.{name}": allowed for name, allowed in DETECT_CHOICES.items()},
    "train.sparsity_scope": ("layer", "global"),
    "data.normalize": ("auto", "imagenet", "dataset", "none"),
    "data.cache": ("auto", "on", "off"),
    "data.decode": ("cpu", "gpu"),
    "data.interpolation": ("bilinear", "bicubic", "nearest"),
    **{f"model.{name}": allowed for name, allowed in MODEL_CHOICES.items()},
    "optim.freeze": ("stem", "layer1", "layer2", "layer3", "layer4", "backbone"),  # each item of the list
}


@functools.cache
def _fields() -> dict[str, dataclasses.Field]:
    """Dotted key -> field, for every option."""
    out = {}
    for sec in SECTIONS:
        for f in dataclasses.fields(typing.get_type_hints(Config)[sec]):
            out[f"{sec}.{f.name}"] = f
    return out


@functools.cache
def _hint(key: str) -> Any:
    sec, name = key.split(".")
    return typing.get_type_hints(typing.get_type_hints(Config)[sec])[name]


def flag_name(key: str) -> str:
    """The bare name of an option, as its flag spells it (without the dashes)."""
    f = _fields()[key]
    return f.metadata.get("flag") or key.split(".", 1)[1]


def resolve_key(key: str) -> str:
    """A dotted key, or a bare field name / flag name, as a dotted key."""
    fields = _fields()
    key = key.replace("-", "_")
    if key in fields:
        return key
    matches = [k for k in fields if flag_name(k) == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"option {key!r} is ambiguous; use one of {', '.join(matches)}")
    known = list(fields) + [flag_name(k) for k in fields]
    close = difflib.get_close_matches(key, known, n=1)
    raise ConfigError(f"unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))


def check_option(key: str, value: Any) -> Any:
    """A value for a dotted key, converted to its field's type and checked against its range and choices."""
    meta = _fields()[key].metadata
    return convert(key, _hint(key), value, {k: meta[k] for k in BOUNDS if k in meta}, CHOICES.get(key))


def get_option(cfg: Config, key: str) -> Any:
    section, name = resolve_key(key).split(".")
    return getattr(getattr(cfg, section), name)


def set_option(cfg: Config, key: str, value: Any) -> None:
    key = resolve_key(key)
    sec, name = key.split(".")
    setattr(getattr(cfg, sec), name, check_option(key, value))


def merge(cfg: Config, data: dict[str, Any], source: str = "config") -> Config:
    """Apply a nested or dotted dict (a recipe, a YAML file) onto `cfg`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of sections to options")
    for key, value in data.items():
        if key == "description":
            continue
        if key == "recipe":
            cfg.recipe = value
        elif key == "user_set":
            cfg.user_set = [resolve_key(k) for k in value or []]
        elif key == "auto":
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: auto must be a mapping of options to reasons")
            cfg.auto = None if value is None else {resolve_key(k): str(v) for k, v in value.items()}
        elif key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                set_option(cfg, f"{key}.{sub}", v)
        else:
            set_option(cfg, key, value)
    return cfg


def _keys(data: dict[str, Any]) -> list[str]:
    """The dotted option keys a nested or dotted mapping sets."""
    out = []
    for key, value in data.items():
        if key in ("description", *_META):
            continue
        if key in SECTIONS and isinstance(value, dict):
            out += [resolve_key(f"{key}.{sub}") for sub in value]
        else:
            out.append(resolve_key(key))
    return out


def _recipe_files() -> dict[str, Path]:
    folder = resources.files("resforge") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description."""
    files = {name: yaml.safe_load(p.read_text()).get("description", "") for name, p in _recipe_files().items()}
    return dict(sorted({**files, AUTO_RECIPE: AUTO_DESCRIPTION}.items()))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a YAML config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return data


def build_config(recipe: str | None = None, config_file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then a built-in recipe, then a YAML file, then overrides (dotted or bare keys).

    The `auto` recipe sets nothing here: the trainer fits it to the data once the folder is scanned,
    leaving alone every key the file or the overrides gave (recorded in `user_set`).
    """
    cfg = Config()
    if recipe == AUTO_RECIPE:
        cfg.recipe = recipe
    elif recipe is not None:
        files = _recipe_files()
        if recipe not in files:
            known = ", ".join(sorted([*files, AUTO_RECIPE]))
            raise ConfigError(f"unknown recipe {recipe!r}; built-in recipes: {known}")
        merge(cfg, yaml.safe_load(files[recipe].read_text()), f"recipe {recipe}")
        cfg.recipe = recipe
    user_set: list[str] = []
    if config_file is not None:
        data = load_yaml(config_file)
        merge(cfg, data, str(config_file))
        user_set += _keys(data) if isinstance(data, dict) else []
    for key, value in (overrides or {}).items():
        set_option(cfg, key, value)
        user_set.append(resolve_key(key))
    cfg.user_set = list(dict.fromkeys(user_set))
    validate(cfg)
    return cfg


def config_for(data: str | os.PathLike | None, model: str | None, recipe: str | None,
               config_file: str | os.PathLike | None, options: dict[str, Any]) -> Config:
    """The config of a run on `data` with `model`: the auto recipe unless another is named."""
    overrides = dict(options)
    if data is not None:
        overrides["data.root"] = str(data)
    if model is not None:
        overrides["model.name"] = model
    return build_config(AUTO_RECIPE if recipe is None else recipe, config_file, overrides)


def validate(cfg: Config) -> None:
    """Every option against its field (type, range, choices), then the checks across fields, each naming the
    option to change."""
    for key in _fields():
        check_option(key, get_option(cfg, key))
    d, a, t = cfg.data, cfg.augment, cfg.train
    checks = [
        (d.in_chans in (1, 3), "data.in_chans must be 1 or 3"),
        (len(a.scale) == 2 and a.scale[0] <= a.scale[1], "augment.scale must be two fractions, low <= high"),
        (not (d.decode == "gpu" and d.cache == "on"), "data.cache on keeps decoded training images in memory and "
                                                      "data.decode gpu decodes them on the GPU each epoch: not both"),
        (not (cfg.model.init_from and cfg.model.pretrained), "give --init (a saved model, architecture and weights) "
                                                             "or --pretrained (weights for the named model), not both"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if t.name is not None and (not Path(t.name).parts or Path(t.name).is_absolute() or ".." in Path(t.name).parts):
        raise ConfigError(f"train.name must be a name inside the project folder {t.project}/ (folders allowed, "
                          f"no '..' or absolute path), got {t.name!r}")


def add_arguments(parser: argparse.ArgumentParser, sections: list[str] | None = None) -> None:
    """One flag per option, grouped by section; flags default to 'not given'."""
    for sec in sections or SECTIONS:
        keys = [k for k in _fields() if k.startswith(sec + ".")]
        add_flags(parser, typing.get_type_hints(Config)[sec], prefix=f"{sec}.", group=f"{sec} options",
                  name=lambda n, sec=sec: f"{sec}.{n}",
                  choices={k.split(".")[1]: CHOICES[k] for k in keys if k in CHOICES})


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (flags, then --set key=value pairs), as dotted keys and values of
    their fields' types."""
    out = {k: v for k, v in vars(args).items() if k in _fields()}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            value = yaml.safe_load(value) if value else None
        except yaml.YAMLError:  # not YAML: the string itself (a name, a path)
            pass
        key = resolve_key(key)
        out[key] = check_option(key, value)
    return out
