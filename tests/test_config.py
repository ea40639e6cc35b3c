"""Config precedence, recipes, YAML, CLI flags and clear errors."""

import argparse

import pytest
import yaml

from resforge import ConfigError
from resforge.config import (Config, add_arguments, build_config, list_recipes, merge, overrides_from_args,
                             set_option)


def test_precedence_defaults_recipe_file_overrides(tmp_path):
    assert build_config().optim.optimizer == "sgd"
    cfg = build_config("keras-baseline")
    assert (cfg.optim.optimizer, cfg.data.batch_size, cfg.augment.preset, cfg.recipe) == ("adam", 8, "none",
                                                                                          "keras-baseline")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"data": {"batch_size": 16}, "train": {"epochs": 3}}))
    cfg = build_config("keras-baseline", f, {"epochs": 5, "optim.lr": 0.01})
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.optim.lr, cfg.optim.optimizer) == (16, 5, 0.01, "adam")


def test_every_recipe_loads_and_is_described():
    recipes = list_recipes()
    assert {"keras-baseline", "finetune", "scratch"} <= set(recipes)
    for name, description in recipes.items():
        assert description and build_config(name).recipe == name
    scratch = build_config("scratch")
    assert scratch.train.ema and scratch.augment.mixup == 0.2 and scratch.train.label_smoothing == 0.1
    assert scratch.optim.warmup_epochs == 5 and not scratch.optim.wd_norm_bias and scratch.optim.nesterov
    assert build_config("finetune").optim.freeze == ["stem", "layer1"]


def test_round_trip_through_yaml():
    cfg = build_config("scratch", overrides={"model": "resnet18", "scale": [0.3, 1.0]})
    again = merge(Config(), yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("key, value, message", [
    ("epoch", 3, "did you mean 'epochs'"),
    ("epochs", "many", "train.epochs must be a positive whole number, got 'many'"),
    ("amp", "fp8", "one of auto, bf16, fp16, off"),
    ("ema", "maybe", "must be true or false"),
    ("optim.nonsense", 1, "unknown option"),
    ("lr", float("nan"), r"optim.lr must be a positive number, got nan"),
    ("time_limit", float("inf"), r"train.time_limit must be a number at least 0, got inf"),
    ("sparsity", "1e400", r"train.sparsity must be a number in \[0, 1\), got '1e400'"),
    ("epochs", 2.5, "train.epochs must be a positive whole number, got 2.5"),
    ("scale", [0.5, float("inf")], r"augment.scale must be a comma-separated list of numbers in \(0, 1\]"),
])
def test_bad_options_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides={key: value})


@pytest.mark.parametrize("overrides, message", [
    ({"val_split": 1.0}, "val_split"), ({"scale": [0.9, 0.1]}, "scale"), ({"freeze": "layer9"}, "freeze"),
    ({"in_chans": 2}, "in_chans"),
])
def test_cross_field_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(config_file=tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(config_file=bad)
    with pytest.raises(ConfigError, match="unknown recipe"):
        build_config("imagenet-sota")


def test_cli_flags_are_generated_for_every_option():
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append")
    add_arguments(parser)
    args = parser.parse_args(["--epochs", "4", "--no-channels-last", "--scale", "0.3", "1", "--freeze",
                              "stem,layer1", "--model", "resnet18", "--small-input", "--set", "optim.gamma=0.5"])
    over = overrides_from_args(args)
    assert over == {"train.epochs": 4, "train.channels_last": False, "augment.scale": [0.3, 1.0],
                    "optim.freeze": ["stem", "layer1"], "model.name": "resnet18", "model.small_input": True,
                    "optim.gamma": 0.5}
    assert type(over["train.epochs"]) is int and type(over["optim.gamma"]) is float
    cfg = build_config(overrides=over)
    assert cfg.train.epochs == 4 and cfg.augment.scale == [0.3, 1.0] and cfg.optim.freeze == ["stem", "layer1"]
    assert parser.parse_args([]).__dict__ == {"set": None}  # unset flags override nothing


def test_set_option_none_for_optional_only():
    cfg = Config()
    set_option(cfg, "optim.lr", "none")
    assert cfg.optim.lr is None
    with pytest.raises(ConfigError):
        set_option(cfg, "train.epochs", None)
