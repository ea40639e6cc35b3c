"""One config object for the whole path: defaults < recipe < config file < flags < --set.

Each stage reads its own section. Every field is a command-line flag of the same name (generated
from the dataclasses, with the help text kept beside the field), a YAML key in its section, and a
keyword of `resforge.train`. The resolved config is saved in every run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name: str = _opt("resnet50", "model name (see 'resforge models')", flag="model")
    pretrained: str | None = _opt(None, "weights to start from: a path or URL (.pth, .safetensors, Keras .h5)")
    variant: str | None = _opt(None, "v1.5: stride on the 3x3; v1: on the first 1x1 (paper, Keras); d: deep stem + "
                                     "avg-pool shortcut (default: v1.5, or what the pretrained weights are)")
    small_input: bool | None = _opt(None, "3x3 stride-1 stem without max-pool (default: on when img_size <= 64)")
    width: float = _opt(1.0, "channel width multiplier")
    act: str = _opt("relu", "activation")
    norm: str = _opt("batchnorm", "normalisation")
    se: bool = _opt(False, "squeeze-and-excitation in every block")
    drop_rate: float = _opt(0.0, "dropout before the classifier")
    drop_path_rate: float = _opt(0.0, "stochastic depth: drop rate of the last block (grows linearly)")
    zero_init_residual: bool = _opt(True, "start each residual branch at zero (last BN gamma = 0)")
    init: str = _opt("he", "conv weight init", flag="weight_init")
    init_from: str | None = _opt(None, "start from a saved model (run directory or .safetensors): its architecture, "
                                       "pruned widths included, its weights and its preprocessing", flag="init")


@dataclass
class DataConfig:
    root: str = _opt("", "image folder: root/<class>/* or root/{train,val[,test]}/<class>/*", flag=None)
    val_split: float = _opt(0.2, "fraction of each class held out for validation when there is no val folder")
    split_seed: int = _opt(123, "seed of the stratified train/val split")
    img_size: int = _opt(224, "square input size the network sees")
    crop_pct: float = _opt(0.875, "evaluation: resize to img_size/crop_pct, then centre-crop img_size")
    in_chans: int = _opt(3, "3 for RGB, 1 to read images as grayscale")
    interpolation: str = _opt("bilinear", "resize interpolation")
    normalize: str = _opt("auto", "auto (the pretrained weights' or ImageNet's) | imagenet | dataset | none")
    batch_size: int = _opt(32, "images per batch")
    workers: int = _opt(-1, "data-loading processes (-1: one per spare CPU core, up to 8)")
    cache: str = _opt("auto", "keep decoded, resized images in memory: auto (small sets) | on | off")
    decode: str = _opt("cpu", "where training images are decoded and augmented: cpu (loader processes; every "
                              "augmentation) | gpu (JPEG batches by nvjpeg on the training GPU; random-resized crop, "
                              "flips and normalisation only; validation stays on the CPU)")
    max_pixels: int = _opt(89_478_485, "images with more pixels are skipped as possible decompression bombs")


@dataclass
class AugmentConfig:
    preset: str = _opt("standard", "none: resize+centre crop | standard: random-resized crop + h-flip | "
                                   "strong: standard + TrivialAugment + random erasing", flag="augment")
    scale: list[float] = _opt([0.08, 1.0], "random-resized-crop area range", nargs=2)
    hflip: float | None = _opt(None, "horizontal flip probability (preset default)")
    vflip: float = _opt(0.0, "vertical flip probability")
    rotation: float = _opt(0.0, "random rotation range in degrees")
    color_jitter: float = _opt(0.0, "brightness/contrast/saturation jitter strength")
    noise: float = _opt(0.0, "Gaussian noise sigma (on 0-1 pixels)")
    auto_augment: str | None = _opt(None, "trivial | rand | none (preset default)")
    random_erasing: float | None = _opt(None, "random erasing probability (preset default)")
    mixup: float = _opt(0.0, "MixUp alpha (0: off)")
    cutmix: float = _opt(0.0, "CutMix alpha (0: off)")
    mix_prob: float = _opt(1.0, "probability a batch is mixed when mixup/cutmix are on")


@dataclass
class OptimConfig:
    optimizer: str = _opt("sgd", "sgd | adam | adamw | rmsprop")
    lr: float | None = _opt(None, "peak learning rate (default: 0.1 x batch/256 for SGD, 1e-3 otherwise)")
    momentum: float = _opt(0.9, "SGD/RMSProp momentum")
    nesterov: bool = _opt(True, "Nesterov momentum for SGD")
    weight_decay: float = _opt(5e-5, "L2 weight decay (decoupled for AdamW)")
    wd_norm_bias: bool = _opt(False, "also decay norm weights and biases (off: Bag of Tricks)")
    l1: float = _opt(0.0, "L1 penalty on conv and linear weights")
    l1_bn: float = _opt(0.0, "L1 penalty on batch-norm scales (network slimming: sparse scales for "
                             "'prune --importance bn-scale'; 1e-4 is the paper's)")
    clip_grad: float | None = _opt(None, "clip the gradient norm to this value")
    accum_steps: int = _opt(1, "accumulate gradients over this many batches per step")
    schedule: str = _opt("cosine", "cosine | step | onecycle | constant")
    warmup_epochs: float = _opt(0.0, "linear warm-up length")
    min_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of the peak (cosine)")
    step_size: int = _opt(30, "step schedule: epochs between decays")
    gamma: float = _opt(0.1, "step schedule: decay factor")
    freeze: list[str] = _opt([], "parts kept fixed (backbone: all but the head)")
    backbone_lr_mult: float = _opt(1.0, "learning-rate multiplier for everything but the head")


@dataclass
class TrainConfig:
    epochs: int = _opt(10, "training epochs")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy")
    amp: str = _opt("auto", "mixed precision: auto (bf16 where the hardware has it) | bf16 | fp16 | off")
    channels_last: bool = _opt(True, "NHWC memory layout (faster convolutions on CPU and tensor cores)")
    compile: bool = _opt(False, "torch.compile the model")
    sync_bn: bool = _opt(False, "with several CUDA processes, batch-norm statistics over the global batch "
                                "(SyncBatchNorm), not each process's slice")
    device: str = _opt("auto", "auto (CUDA, then CPU) | cpu | cuda | cuda:N")
    ema: bool = _opt(False, "keep an exponential moving average of the weights, evaluated alongside")
    ema_decay: float = _opt(0.9998, "EMA decay per step (warmed up over the first steps)")
    teacher: str | None = _opt(None, "distil from this model (run directory or .safetensors; same classes), "
                                     "which sees the same augmented batches")
    kd_alpha: float = _opt(0.5, "distillation: weight of the label loss (the teacher's gets 1 - alpha)")
    kd_temperature: float = _opt(2.0, "distillation: softmax temperature of both models")
    sparsity: float = _opt(0.0, "unstructured pruning: zero this share of the conv and linear weights, growing on "
                                "Zhu & Gupta's cubic schedule over the first seven tenths of the run (0: off)")
    sparsity_scope: str = _opt("layer", "rank weights for --sparsity within each layer, or over all layers")
    time_limit: float = _opt(0.0, "minutes to train for: after each epoch the number of epochs (and the lr "
                                  "schedule) is refitted to end within it (0: off)")
    patience: int = _opt(0, "stop after this many epochs without improvement (0: never)")
    metric: str = _opt("val_top1", "metric that picks the best checkpoint and drives early stopping: "
                                   "val_top1 | val_loss")
    seed: int = _opt(42, "seed of initialisation, shuffling and augmentation")
    deterministic: bool = _opt(False, "deterministic algorithms (bit-exact reruns and resumes; slower)")
    project: str = _opt("runs", "folder holding run directories")
    name: str | None = _opt(None, "run name (default: <model>-<data folder>, numbered if taken)")
    exist_ok: bool = _opt(False, "reuse the run directory if it exists")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
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
    "train.metric": ("val_top1", "val_loss"),
    "train.sparsity_scope": ("layer", "global"),
    "data.normalize": ("auto", "imagenet", "dataset", "none"),
    "data.cache": ("auto", "on", "off"),
    "data.decode": ("cpu", "gpu"),
    "data.interpolation": ("bilinear", "bicubic", "nearest"),
    "model.act": ("relu", "leaky_relu", "elu", "selu", "prelu", "silu", "gelu"),
    "model.norm": ("batchnorm", "groupnorm"),
    "model.variant": ("v1.5", "v1", "d"),
    "model.init": ("he", "xavier"),
    "optim.freeze": ("stem", "layer1", "layer2", "layer3", "layer4", "backbone"),  # each item of the list
}


def _fields() -> dict[str, dataclasses.Field]:
    """Dotted key -> field, for every option."""
    out = {}
    for sec in SECTIONS:
        for f in dataclasses.fields(typing.get_type_hints(Config)[sec]):
            out[f"{sec}.{f.name}"] = f
    return out


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


def _coerce(key: str, value: Any) -> Any:
    """Check (and gently convert) a value against its field's type."""
    hint = typing.get_type_hints(type(getattr(Config(), key.split(".")[0])))[key.split(".")[1]]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    origin = typing.get_origin(base)
    try:
        if origin is list:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v]
            (item_type,) = typing.get_args(base)
            return [item_type(v) for v in items]
        if base is bool:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, bool):
                raise TypeError
            return value
        if base in (int, float) and isinstance(value, bool):  # YAML's true is no number
            raise TypeError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        return base(value)
    except (TypeError, ValueError, yaml.YAMLError):
        raise ConfigError(f"{key} must be {getattr(base, '__name__', base)}, got {value!r}") from None


def get_option(cfg: Config, key: str) -> Any:
    section, name = resolve_key(key).split(".")
    return getattr(getattr(cfg, section), name)


def set_option(cfg: Config, key: str, value: Any) -> None:
    key = resolve_key(key)
    sec, name = key.split(".")
    value = _coerce(key, value)
    allowed = CHOICES.get(key)
    if allowed and value is not None and not all(v in allowed for v in (value if isinstance(value, list) else [value])):
        raise ConfigError(f"{key} must be {'made of' if isinstance(value, list) else 'one of'} "
                          f"{', '.join(allowed)}, got {value!r}")
    setattr(getattr(cfg, sec), name, value)


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
            raise ConfigError(f"unknown recipe {recipe!r}; built-in recipes: {', '.join(sorted([*files, AUTO_RECIPE]))}")
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


def validate(cfg: Config) -> None:
    """Cross-field checks, each naming the option to change."""
    d, o, t, a = cfg.data, cfg.optim, cfg.train, cfg.augment
    checks = [
        (0 <= d.val_split < 1, "data.val_split must lie in [0, 1)"),
        (d.img_size >= 16, "data.img_size must be at least 16"),
        (0 < d.crop_pct <= 1, "data.crop_pct must lie in (0, 1]"),
        (d.in_chans in (1, 3), "data.in_chans must be 1 or 3"),
        (d.batch_size >= 1, "data.batch_size must be at least 1"),
        (t.epochs >= 1, "train.epochs must be at least 1"),
        (t.time_limit >= 0, "train.time_limit must not be negative"),
        (o.lr is None or o.lr > 0, "optim.lr must be positive"),
        (o.accum_steps >= 1, "optim.accum_steps must be at least 1"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing must lie in [0, 1)"),
        (0 < t.ema_decay < 1, "train.ema_decay must lie in (0, 1)"),
        (len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1, "augment.scale must be two fractions, low <= high"),
        (a.mixup >= 0 and a.cutmix >= 0 and 0 <= a.mix_prob <= 1, "augment.mixup/cutmix/mix_prob out of range"),
        (all(p is None or 0 <= p <= 1 for p in (a.hflip, a.vflip, a.random_erasing)),
         "augment.hflip/vflip/random_erasing are probabilities in [0, 1]"),
        (min(a.rotation, a.color_jitter, a.noise) >= 0, "augment.rotation/color_jitter/noise must not be negative"),
        (min(o.momentum, o.weight_decay, o.l1, o.l1_bn) >= 0,
         "optim.momentum/weight_decay/l1/l1_bn must not be negative"),
        (o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad must be positive"),
        (o.step_size >= 1 and 0 < o.gamma <= 1, "optim.step_size must be at least 1 and optim.gamma in (0, 1]"),
        (o.warmup_epochs >= 0 and 0 <= o.min_lr_ratio < 1, "optim.warmup_epochs/min_lr_ratio out of range"),
        (o.backbone_lr_mult >= 0, "optim.backbone_lr_mult must not be negative"),
        (t.patience >= 0, "train.patience must not be negative"),
        (d.workers >= -1, "data.workers must be -1 (automatic) or a count"),
        (not (d.decode == "gpu" and d.cache == "on"), "data.cache on keeps decoded training images in memory and "
                                                      "data.decode gpu decodes them on the GPU each epoch: not both"),
        (0 <= t.sparsity < 1, "train.sparsity must lie in [0, 1)"),
        (0 <= t.kd_alpha <= 1 and t.kd_temperature > 0, "train.kd_alpha must lie in [0, 1] and train.kd_temperature "
                                                         "be positive"),
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
    fields = _fields()
    for sec in sections or SECTIONS:
        group = parser.add_argument_group(f"{sec} options")
        for key, f in fields.items():
            if not key.startswith(sec + ".") or f.metadata.get("flag", "") is None:
                continue
            flag = "--" + flag_name(key).replace("_", "-")
            kw: dict[str, Any] = dict(dest=key, default=argparse.SUPPRESS, help=f.metadata["help"])
            hint = typing.get_type_hints(type(getattr(Config(), sec)))[f.name]
            if hint is bool or hint == bool | None:
                kw["action"] = argparse.BooleanOptionalAction
            elif key in CHOICES:
                kw["metavar"] = "{" + ",".join(CHOICES[key]) + "}"
            else:
                kw.update(metavar=flag_name(key).upper(), nargs=f.metadata.get("nargs"))
            group.add_argument(flag, **kw)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (flags, then --set key=value pairs)."""
    out = {k: v for k, v in vars(args).items() if k in _fields()}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:  # not YAML: the string itself (a name, a path)
            out[key] = value
    return out
