"""Each command's options: one dataclass gives its flags, its API keywords and their defaults."""

import dataclasses
import inspect
from dataclasses import dataclass

import pytest

from resforge import api
from resforge.cli import HANDLERS, Parser, build_parser, main
from resforge.commands import COMMANDS, RecordOptions
from resforge.errors import ConfigError
from resforge.options import add_flags, from_keywords, option, take_keywords
from resforge.runtime.record import OVERRIDES


@dataclass(kw_only=True)
class Example:
    size: int = option(64, "images per batch", ge=1)
    kind: str = option("a", "which", choices=("a", "b"))
    out: str | None = option(None, "file", flag="output", short="o")
    target: str = option(help="what to reach")
    weights: list[float] | None = option(None, "one per model", exclusive="w")
    fit: bool = option(False, "fit them", flag="fit_weights", exclusive="w")


def _parser():
    p = Parser(prog="example")
    add_flags(p, Example, show_default=True)
    return p


def test_flags_take_their_short_name_choices_requirement_and_exclusion_from_the_field():
    p = _parser()
    args = p.parse_args(["--target", "t", "-o", "f.txt", "--kind", "b"])
    assert (args.target, args.out, args.kind) == ("t", "f.txt", "b") and not hasattr(args, "size")  # not given
    help = p.format_help()
    assert "(default: 64)" in help and "{a,b}" in help and "(default: None)" not in help
    with pytest.raises(ConfigError, match="required: --target"):
        p.parse_args(["-o", "f"])
    with pytest.raises(ConfigError, match="not allowed with argument --weights"):
        p.parse_args(["--target", "t", "--weights", "1,2", "--fit-weights"])
    with pytest.raises(ConfigError, match="--kind must be one of a, b, got 'c'"):
        p.parse_args(["--target", "t", "--kind", "c"])


def test_keywords_are_converted_checked_and_an_unknown_one_is_named():
    assert from_keywords(Example, {"target": "t", "size": "8"}).size == 8
    with pytest.raises(ConfigError, match="size must be a positive whole number, got 0"):
        from_keywords(Example, {"target": "t", "size": 0})
    with pytest.raises(ConfigError, match="unknown option 'sise'; did you mean 'size'"):
        from_keywords(Example, {"target": "t", "sise": 8})
    with pytest.raises(ConfigError, match="give target"):
        from_keywords(Example, {})
    options, rest = take_keywords(Example, {"target": "t", "epochs": 3})
    assert options.target == "t" and rest == {"epochs": 3}


def test_every_command_has_a_handler_and_the_table_is_the_parser():
    assert {c.name for c in COMMANDS} == set(HANDLERS)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    assert {c.name.split(" ")[0] for c in COMMANDS} == set(sub)


def test_the_record_flags_are_the_record_overrides():
    assert [f.name for f in dataclasses.fields(RecordOptions)] == list(OVERRIDES)


def _shown(default):
    if isinstance(default, list):
        return ",".join(map(_shown, default))
    if isinstance(default, float):
        return f"{default:g}"
    return f"{default:,}" if isinstance(default, int) and default >= 10_000 else str(default)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.options], ids=lambda c: c.name)
def test_help_shows_each_default_as_the_options_declare_it(command, capsys):
    with pytest.raises(SystemExit):
        main([*command.name.split(" "), "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for cls in command.options:
        for f in dataclasses.fields(cls):
            if "help" in f.metadata and f.metadata.get("flag", "") is not None and f.default not in (
                    None, False, dataclasses.MISSING):
                assert f"(default: {_shown(f.default)})" in out, (command.name, f.name)


@pytest.mark.parametrize("call", [
    lambda: api.evaluate("run", "data", batchsize=4),
    lambda: api.predict("run", ["x.png"], batchsize=4),
    lambda: api.export("run", "onnx", None, opset_version=18),
    lambda: api.bench(["run"], ["torch"], batchsizes=[1]),
    lambda: api.ensemble(["a", "b"], "data", batchsize=4),
    lambda: api.optimize("run", "size=1MB", calibration=8),
    lambda: api.inspect_data("folder", perclass=2),
])
def test_an_unknown_keyword_is_refused_by_name_before_anything_runs(call):
    with pytest.raises(ConfigError, match="unknown option"):
        call()


def test_the_api_reads_its_defaults_from_the_options():
    """No API function of a command writes a default of its own: its keywords are the options' fields."""
    for fn in (api.evaluate, api.predict, api.ensemble, api.optimize, api.inspect_data, api.prune, api.lowrank,
               api.lr_find, api.tune):
        defaults = {n: p.default for n, p in inspect.signature(fn).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        assert set(defaults) <= {"data", "model", "callbacks", "progress"}, (fn.__name__, defaults)
