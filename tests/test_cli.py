"""The command line: help everywhere, real numbers, one-line errors."""

import argparse
import dataclasses
import subprocess
import sys
import typing

import pytest
import torch

from resforge.cli import build_parser, main
from resforge.commands import COMMANDS
from resforge.config import CHOICES, SECTIONS, Config


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in _subcommands():
        assert name in out


def test_top_level_help_promises_only_what_exists(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out.lower()
    for later in ("compress", "export", "serve"):  # not yet commands: the help must not offer them
        assert later not in out or later in _subcommands()


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_documents_each_of_its_options(command, capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: resforge {command}")
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in out, flag
        if action.help and action.help != "==SUPPRESS==":
            assert " ".join(action.help.split()[:3]) in " ".join(out.split()), action.help


def _commands(parser=None):
    """(name, parser) of every command, data's subcommands too."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", p) for n, p in _commands(sub))


def _option_fields(command):
    """Flag destination -> (declared type, field, accepted values) for the option dataclasses a command's flags are
    generated from: the training config's sections (dotted keys), and the command's own options."""
    out = {}
    for sec in SECTIONS:
        cls = typing.get_type_hints(Config)[sec]
        hints = typing.get_type_hints(cls)
        out.update({f"{sec}.{f.name}": (hints[f.name], f, CHOICES.get(f"{sec}.{f.name}"))
                    for f in dataclasses.fields(cls)})
    for cls in next((c.options for c in COMMANDS if c.name == command), ()):  # "data" holds commands, not options
        hints = typing.get_type_hints(cls)
        out.update({f.name: (hints[f.name], f, f.metadata.get("choices")) for f in dataclasses.fields(cls)})
    return out


def _declared(hint):
    """(type, item type or None) of a field's hint: float | None -> (float, None); list[int] -> (list, int)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is not list and args else hint
    return (list, typing.get_args(base)[0]) if typing.get_origin(base) is list else (base, None)


def _sample(kind, item, field, allowed):
    """A value the field takes, as command-line words: its default, else one built from its type and range."""
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    if kind is bool:
        return []
    if default not in (None, []):
        return [str(v) for v in default] if field.metadata.get("nargs") else [
            ",".join(map(str, default)) if kind is list else str(default)]
    if allowed:
        return [allowed[0]]
    one = item or kind
    count = field.metadata.get("nargs") if isinstance(field.metadata.get("nargs"), int) else 1
    if one in (int, float):
        low = field.metadata.get("ge", field.metadata.get("gt", 0))
        high = field.metadata.get("le", field.metadata.get("lt", low + 2))
        return [str(one((low + high) / 2))] * count
    return ["x"] * count


@pytest.mark.parametrize("command", [name for name, _ in _commands()])
def test_every_flag_generated_from_an_option_parses_to_the_options_declared_type(command):
    sub = dict(_commands())[command]
    fields = _option_fields(command)
    positionals = [[a.choices[0] if a.choices else "x"] for a in sub._actions if not a.option_strings
                   and a.nargs not in ("?", "*") and not isinstance(a, argparse._SubParsersAction)]
    positionals += [[a.option_strings[0], "x"] for a in sub._actions if a.required and a.option_strings]
    for action in sub._actions:
        if action.dest not in fields:
            continue
        hint, field, allowed = fields[action.dest]
        kind, item = _declared(hint)
        words = _sample(kind, item, field, allowed)
        value = vars(sub.parse_args([w for p in positionals for w in p] + [action.option_strings[0], *words]))[
            action.dest]
        if kind is bool:
            assert value is True, action.dest
            continue
        assert type(value) is kind, (command, action.dest, value)
        if item is not None:
            assert value and all(type(v) is item for v in value), (command, action.dest, value)
        if field.default not in (None, dataclasses.MISSING, []):
            assert value == field.default, (command, action.dest, value)  # the default round-trips


def test_every_flag_that_takes_a_number_refuses_nan_and_infinity():
    numeric = 0
    for command, sub in _commands():
        for action in sub._actions:
            if action.type is None:
                continue
            assert action.type not in (int, float), f"{command} {action.option_strings[0]}: float('nan') is a float"
            taken = []
            for text in ("1", "16", "0.5", "-1"):
                try:
                    taken.append(action.type(text))
                except argparse.ArgumentTypeError:
                    pass
            if not any(isinstance(v, (int, float)) or (isinstance(v, list) and v and isinstance(v[0], (int, float)))
                       for v in taken):
                continue  # not a number
            numeric += 1
            for bad in ("nan", "inf", "-inf", "1e400", "1,inf"):
                with pytest.raises(argparse.ArgumentTypeError, match="must be"):
                    action.type(bad)
    assert numeric > 90  # the walk found the number flags (config sections count once per command)


def test_choice_flags_show_every_accepted_value(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for shown in ("{none,standard,strong}", "{auto,imagenet,dataset,none}", "{trivial,rand,none}"):
        assert shown in out


def test_info_prints_the_counts(capsys):
    assert main(["info", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert "25,557,032" in out and "4.09 GMACs" in out and "2048x7x7" in out


def test_models_lists_the_family(capsys):
    assert main(["models"]) == 0
    assert "resnext50_32x4d" in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    for args in (["info", "resnet5"], ["info", "resnet18", "--pretrained", str(bad)]):
        r = subprocess.run([sys.executable, "-m", "resforge", *args], capture_output=True, text=True)
        assert r.returncode == 2
        assert r.stderr.startswith("resforge: error: ") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_info_loads_pretrained_and_reports_adaptation(tmp_path, capsys, caplog):
    import logging

    import resforge

    path = tmp_path / "w.pth"
    torch.save(resforge.create_model("resnet18", width=0.25).state_dict(), path)
    with caplog.at_level(logging.INFO, logger="resforge"):
        assert main(["info", "resnet18", "--width", "0.25", "--pretrained", str(path), "--num-classes", "3",
                     "--in-chans", "1", "--img-size", "32"]) == 0
    notes = " ".join(r.getMessage() for r in caplog.records)
    assert "stem weights folded from 3 to 1 input channel(s)" in notes
    assert "has 1000 classes, the model 3: the classifier was replaced" in notes
    adapted = resforge.create_model("resnet18", width=0.25, num_classes=3, in_chans=1)
    out = capsys.readouterr().out
    assert "1 input channel" in out and f"{sum(p.numel() for p in adapted.parameters()):,} parameters" in out


def _data(tmp_path):
    from helpers import make_image_folder

    return make_image_folder(tmp_path / "shapes", classes=("a", "b"), per_class=8, size=20)


TINY = ["--model", "resnet18", "--width", "0.125", "--img-size", "16", "--batch-size", "4", "--workers", "0",
        "--amp", "off"]


def test_train_resume_and_recipes_from_the_command_line(tmp_path, capsys):
    data = _data(tmp_path)
    project = str(tmp_path / "runs")
    assert main(["train", str(data), *TINY, "--epochs", "1", "--project", project, "--name", "r",
                 "--set", "optim.gamma=0.5"]) == 0
    run = tmp_path / "runs" / "r"
    assert (run / "report.md").is_file() and "gamma: 0.5" in (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    assert main(["recipes"]) == 0
    assert "keras-baseline" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["train"], "give the image folder"),
    (["train", "/nonexistent/folder"], "data folder not found"),
    (["train", "x", "--resume", "y"], "give no data folder"),
    (["train", "x", "--epochs", "0"], "argument --epochs: train.epochs must be a positive whole number, got 0"),
    (["train", "x", "--set", "optim.bogus=1"], "unknown option"),
    (["train", "--resume", "/nonexistent/run"], "no checkpoint to resume"),
    (["train", "x", "--set", "augment.scale=0.5"], "augment.scale must be two fractions"),
    (["train", "x", "--set", "optim.step_size=0"], "optim.step_size must be a positive whole number, got 0"),
    (["train", "x", "--hflip", "2"], "augment.hflip must be a number in [0, 1], got 2.0"),
    (["train", "x", "--set", "train.ema=["], "train.ema must be true or false, got '['"),
    (["train", "x", "--device", "gpu0"], "device must be auto, cpu, cuda or cuda:N"),
    (["train", "x", "--device", "meta"], "device must be auto, cpu, cuda or cuda:N"),
    (["train", "/nonexistent", "--model", "resnet5"], "unknown model 'resnet5'"),
    (["train", "/nonexistent", "--act", "relu2"], "model.act must be one of relu, leaky_relu"),
    (["lr-find", "x", "--steps", "4"], "at least 5 steps"),
    (["predict", "/nonexistent/run", "x", "--topk", "0"], "topk and batch_size must be at least 1"),
    (["eval", "/nonexistent/run", "x"], "no model at"),
    (["eval", "/nonexistent/run", "x", "--batch-size", "0"], "batch_size must be at least 1"),
    (["eval", "/nonexistent/run", "x", "--batch-size", "-1"], "batch_size must be at least 1"),
    (["info", "resnet18", "--img-size", "0"], "--img-size must be a positive number of pixels"),
    (["info", "resnet18", "--img-size", "-5"], "--img-size must be a positive number of pixels"),
    (["train", "x", "--set", "data.img_size=true"], "data.img_size must be a whole number at least 16, got True"),
    (["train", "x", "--name", "../.."], "train.name must be a name inside the project folder"),
    (["demo", "--minutes", "0"], "--minutes must be a number of minutes above 0"),
    (["demo", "--minutes", "-1"], "--minutes must be a number of minutes above 0"),
    # numbers reach the API as numbers (a string once met a `<` there), bad ones are refused as they are parsed
    (["prune", "/nonexistent/run", "--sparsity", "0.5"], "no model at /nonexistent/run"),
    (["tune", "/nonexistent/data", "--time-limit", "1"], "/nonexistent/data: no such folder"),
    (["prune", "/nonexistent/run", "--sparsity", "1.5"], "argument --sparsity: train.sparsity must be a number in "
                                                         "[0, 1), got 1.5 (see 'resforge prune --help')"),
    (["train", "x", "--lr", "nan"], "argument --lr: optim.lr must be a positive number, got 'nan'"),
    (["serve", "/nonexistent/run", "--timeout", "inf"], "--timeout must be a positive number, got 'inf'"),
    (["serve", "/nonexistent/run", "--max-wait-ms", "nan"], "--max-wait-ms must be a number at least 0, got 'nan'"),
    (["serve", "/nonexistent/run", "--port", "65536"], "--port must be a whole number in [0, 65535], got 65536"),
    (["serve", "/nonexistent/run", "--workers", "1e400"], "--workers must be a positive whole number, got '1e400'"),
    (["info", "resnet18", "--width", "-1e400"], "argument --width: --width must be a positive number, got '-1e400'"),
    (["prune"], "the following arguments are required: model (see 'resforge prune --help')"),
])
def test_train_errors_are_one_line(args, message, capsys, tmp_path, monkeypatch):
    import resforge.demo

    def started(*args, **kwargs):
        raise AssertionError("the demo started before checking its options")

    monkeypatch.chdir(tmp_path)  # the demo must refuse before it writes anything here
    monkeypatch.setattr(resforge.demo, "import_dataset", started)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resforge: error:") and message in err and "\n" not in err
    assert not list(tmp_path.iterdir())


def test_data_without_a_subcommand_is_a_usage_error(capsys):
    assert main(["data"]) == 2
    assert "give a data command: inspect or import" in capsys.readouterr().err


def test_paths_of_the_wrong_kind_are_named_for_it(tmp_path, capsys):
    data = _data(tmp_path)
    image = next(data.rglob("*.png"))
    for args, message in ((["train", str(image)], "is a file, not a folder of images"),
                          (["train", str(data), "--config", str(tmp_path)], "is a folder, not a YAML config file"),
                          (["train", str(data), "--pretrained", str(tmp_path)], "is a folder, not a weights file")):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "not found" not in err


def test_data_import_from_idx_files(tmp_path):
    import gzip

    import numpy as np

    src = tmp_path / "idx"
    src.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        for kind, arr in (("images-idx3", np.zeros((n, 28, 28), np.uint8)), ("labels-idx1", np.arange(n) % 10)):
            header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            (src / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))
    assert main(["data", "import", "fashion-mnist", "--source", str(src), "--out", str(tmp_path / "fm")]) == 0
    assert len(list((tmp_path / "fm" / "test").rglob("*.png"))) == 10


def test_demo_runs_end_to_end(tmp_path, monkeypatch, caplog):
    """`make demo` with a budget of one short epoch: import, inspect, train, evaluate, report, export, bench,
    optimize."""
    import logging

    import functools

    import resforge.demo
    from resforge.demo import run_demo
    from resforge.training import budget

    caplog.set_level(logging.INFO, logger="resforge")
    monkeypatch.chdir(tmp_path)
    # the whole chain, with fewer calibration images than a user's 256 (the suite's time is short)
    monkeypatch.setattr(resforge.demo.api, "optimize", functools.partial(resforge.demo.api.optimize, calib=16))
    # Training time on a clock of its own, 0.1 s a reading: the 0.6 s budget runs out within the first
    # epoch on any machine (the budget plans from the sixth step on, when the clock is already past it).
    readings = iter(range(10**9))
    monkeypatch.setattr(budget, "clock", lambda: next(readings) / 10)
    out = run_demo(minutes=0.01, optimize_minutes=0.02, seconds=0.1)
    assert out["epochs"] == 1 and out["results"]["test"]["num_samples"] == 1000
    split = (tmp_path / "runs" / "demo" / "split.csv").read_text().splitlines()
    assert out["history"][0]["train_images"] < sum(line.startswith("train,") for line in split)  # cut short
    assert (tmp_path / "runs" / "demo" / "report.md").is_file()
    assert (tmp_path / "runs" / "inspect-fashion-mnist-sample" / "samples.png").is_file()
    assert (tmp_path / "runs" / "demo" / "best.onnx").is_file() and "parity on" in caplog.text
    for backend in ("torch", "onnxruntime", "openvino"):
        assert f"| demo | {backend} |" in caplog.text
    report = (tmp_path / "runs" / "demo-optimize" / "report.md").read_text()
    assert "| pruned-int8 | onnxruntime" in report and "target: latency <= 2ms" in report.lower()


def test_the_stage_functions_are_not_shadowed_by_subpackages():
    import resforge
    import resforge.api
    import resforge.data.sources
    import resforge.evaluation.evaluate  # noqa: F401
    import resforge.training.trainer  # noqa: F401

    for name in ("train", "evaluate", "predict", "lr_find", "inspect_data"):
        assert getattr(resforge, name) is getattr(resforge.api, name), name
    assert resforge.import_dataset is resforge.data.sources.import_dataset
