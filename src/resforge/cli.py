"""The `resforge` command line: argument parsing only; every command calls the public API.

The parser is a loop over `commands.COMMANDS`: each command's flags are generated from its options
dataclasses, a flag not given is absent, so the API's default (the dataclass's) holds."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .errors import ConfigError, ResforgeError
from .options import add_flags, flag_type

log = logging.getLogger("resforge")
INT, FLOAT = flag_type(int), flag_type(float)  # argparse types: a whole number; a finite number (no nan or inf)


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one line (raised, so `main` answers them like every other error), and which
    takes -1,2 or -1e-3 as a value, not a flag (as newer Pythons' argparse does)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def _model_spec_options(p: argparse.ArgumentParser) -> None:
    from .models.spec import add_model_flags

    add_model_flags(p.add_argument_group("model options"))


def _training_options(p: argparse.ArgumentParser) -> None:
    """A flag per training config option, and --set for any of them."""
    from .config import add_arguments

    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any option, e.g. --set optim.gamma=0.2")
    add_arguments(p)


def _given(args: argparse.Namespace, *classes: type) -> dict[str, Any]:
    """The options of `classes` given on the command line."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _metadata(args: argparse.Namespace) -> dict[str, Any]:
    """What the flags say of a model file without resforge's record."""
    from .commands import RecordOptions

    return _given(args, RecordOptions)


def cmd_models(args: argparse.Namespace) -> None:
    from .models import describe_model, list_models

    for name in list_models():
        print(f"{name:<18} {describe_model(name)}")


def cmd_info(args: argparse.Namespace) -> None:
    from . import api
    from .commands import InfoOptions
    from .models.spec import given_options

    print(api.info(args.model, **_given(args, InfoOptions), **given_options(args)).table())


def cmd_demo(args: argparse.Namespace) -> None:
    from .commands import DemoOptions
    from .demo import run_demo

    run_demo(DemoOptions(**_given(args, DemoOptions)).minutes)


def cmd_train(args: argparse.Namespace) -> None:
    from . import api
    from .commands import TrainOptions
    from .config import overrides_from_args

    given = _given(args, TrainOptions)
    if not args.data and not given.get("resume"):
        raise ConfigError("give the image folder to train on (or --resume RUN_DIR)")
    api.train(args.data, **given, **overrides_from_args(args))


def cmd_tune(args: argparse.Namespace) -> None:
    from . import api
    from .commands import TuneOptions
    from .config import overrides_from_args

    options = overrides_from_args(args)  # --time-limit, --name, --project and --model are the search's own here
    search = {k: options.pop(key) for k, key in (("time_limit", "train.time_limit"), ("name", "train.name"),
                                                 ("project", "train.project"), ("model", "model.name"))
              if key in options}
    out = api.tune(args.data, **_given(args, TuneOptions), **search, **options)
    print(out["dir"] / "summary.md")


def cmd_prune(args: argparse.Namespace) -> None:
    from . import api
    from .commands import PruneOptions
    from .config import overrides_from_args

    options = overrides_from_args(args)  # --sparsity and its scope are the training options: unstructured pruning
    sparse = {k: options.pop(key) for k, key in (("sparsity", "train.sparsity"), ("scope", "train.sparsity_scope"))
              if key in options}
    out = api.prune(args.model, **_given(args, PruneOptions), **sparse, **options)
    print(out["run_dir"])


def cmd_lowrank(args: argparse.Namespace) -> None:
    from . import api
    from .commands import LowrankOptions
    from .config import overrides_from_args

    out = api.lowrank(args.model, **_given(args, LowrankOptions), **overrides_from_args(args))
    print(out["run_dir"])


def cmd_optimize(args: argparse.Namespace) -> None:
    from . import api
    from .commands import OptimizeOptions

    given = _given(args, OptimizeOptions)
    state = api.optimize(args.model, given.pop("target"), **given)
    print(state["pick"]["line"])


def cmd_quantize(args: argparse.Namespace) -> None:
    from . import api
    from .commands import QuantizeOptions
    from .config import overrides_from_args

    result = api.quantize(args.model, **_given(args, QuantizeOptions), **overrides_from_args(args))
    print(result.path)


def cmd_lr_find(args: argparse.Namespace) -> None:
    from . import api
    from .commands import LrFindOptions
    from .config import overrides_from_args

    api.lr_find(args.data, **_given(args, LrFindOptions), **overrides_from_args(args))


def cmd_recipes(args: argparse.Namespace) -> None:
    from .config import list_recipes

    for name, description in list_recipes().items():
        print(f"{name:<16} {description}")


def cmd_eval(args: argparse.Namespace) -> None:
    from . import api
    from .commands import EvalOptions

    report = api.evaluate(args.model, args.data, **_given(args, EvalOptions), metadata=_metadata(args))
    print(report.to_markdown())


def cmd_predict(args: argparse.Namespace) -> None:
    from . import api
    from .commands import PredictOptions, PredictOutput
    from .evaluation.evaluate import format_predictions
    from .io import write_text

    rows = api.predict(args.model, args.paths, **_given(args, PredictOptions), metadata=_metadata(args))
    shown = PredictOutput(**_given(args, PredictOutput))
    text = format_predictions(rows, shown.format)
    if shown.output:
        write_text(shown.output, text + ("" if text.endswith("\n") else "\n"))
    else:
        print(text)


def cmd_export(args: argparse.Namespace) -> None:
    from . import api
    from .commands import ExportOptions

    print(api.export(args.model, **_given(args, ExportOptions)).path)


def cmd_bench(args: argparse.Namespace) -> None:
    from . import api
    from .commands import BenchOptions, BenchOutput
    from .deploy.bench import settings_line, table
    from .io import write_json, write_text

    options = BenchOptions(**{**_given(args, BenchOptions), "metadata": _metadata(args)})
    rows = api.bench(args.models, **vars(options))
    text = table(rows, options.batch_sizes) + "\n\n" + settings_line(rows, options.duration, options.warmup)
    print(text)
    written = BenchOutput(**_given(args, BenchOutput))
    if written.json:
        write_json(written.json, rows)
    if written.markdown:
        write_text(written.markdown, text + "\n")


def cmd_serve(args: argparse.Namespace) -> None:
    from . import api
    from .deploy.serve import ServeOptions

    api.serve(args.model, metadata=_metadata(args), **_given(args, ServeOptions))


def cmd_ensemble(args: argparse.Namespace) -> None:
    from . import api
    from .commands import EnsembleOptions

    r = api.ensemble(args.models, **_given(args, EnsembleOptions))
    lines = [f"{r['images']} images of {r['data']}", "", "| model | weight | top-1 | top-5 | macro F1 |",
             "|---|---:|---:|---:|---:|"]
    for row in [*r["members"], {"model": "**ensemble**", "weight": 1.0, **r["ensemble"]}]:
        lines.append(f"| {row['model']} | {row['weight']:.3f} | {row['top1']:.2%} | {row['top5']:.2%} | "
                     f"{row['macro_f1']:.3f} |")
    print("\n".join(lines + ["", str(r["path"])]))


def cmd_monitor(args: argparse.Namespace) -> None:
    from . import api
    from .commands import MonitorOptions

    result = api.monitor(args.model, args.folder, **_given(args, MonitorOptions))
    if isinstance(result, dict):
        print(f"{len(result['alarms'])} alarm(s) on {result['images']} images, {result['ood_flagged']} out of "
              f"distribution: {result['report']}" + "".join(f"\n  {a}" for a in result["alarms"]))
    else:
        print(f"profile of {result.images} validation images of {args.profile} written into {args.model}'s record")


def cmd_data_inspect(args: argparse.Namespace) -> None:
    from . import api
    from .commands import InspectOptions

    api.inspect_data(args.folder, **_given(args, InspectOptions))


def cmd_data_import(args: argparse.Namespace) -> None:
    from .commands import ImportOptions
    from .data.sources import import_dataset

    options = ImportOptions(**_given(args, ImportOptions))
    print(f"wrote {import_dataset(args.name, options.out, options.source)}")


HANDLERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "models": cmd_models, "info": cmd_info, "train": cmd_train, "tune": cmd_tune, "prune": cmd_prune,
    "lowrank": cmd_lowrank, "optimize": cmd_optimize, "quantize": cmd_quantize, "lr-find": cmd_lr_find,
    "recipes": cmd_recipes, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export, "bench": cmd_bench,
    "ensemble": cmd_ensemble, "serve": cmd_serve, "monitor": cmd_monitor, "data inspect": cmd_data_inspect, "data import": cmd_data_import,
    "demo": cmd_demo,
}
EXTRA_OPTIONS = {"info": _model_spec_options}  # flags not generated from the command's options


def _group_usage(args: argparse.Namespace) -> None:
    args.group_parser.error(f"give a {args.command} command: {' or '.join(args.group_commands)}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import COMMANDS, GROUPS

    parser = Parser(
        prog="resforge",
        description="Train, evaluate, export, benchmark and use ResNet image classifiers on a folder of images.",
        epilog="Run 'resforge COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"resforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        where, name = sub, command.name
        if " " in name:
            group, name = name.split(" ", 1)
            if group not in groups:
                g = sub.add_parser(group, help=GROUPS[group], description=GROUPS[group])
                names = [c.name.split(" ", 1)[1] for c in COMMANDS if c.name.startswith(group + " ")]
                g.set_defaults(func=_group_usage, group_parser=g, group_commands=names)
                groups[group] = g.add_subparsers(dest=f"{group}_command", metavar=f"{group.upper()}_COMMAND")
            where = groups[group]
        p = where.add_parser(name, help=command.help, description=command.description or command.help)
        p.set_defaults(func=HANDLERS[command.name])
        for arg in command.args:
            p.add_argument(arg.name, help=arg.help, **{k: v for k, v in (("nargs", arg.nargs),
                                                                          ("choices", arg.choices)) if v})
        for cls in command.options:
            add_flags(p, cls, show_default=True)
        if command.training:
            _training_options(p)
        if command.name in EXTRA_OPTIONS:
            EXTRA_OPTIONS[command.name](p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(message)s")  # other libraries: their warnings only
        log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
        args.func(args)
    except (ResforgeError, OSError) as e:  # OSError: a folder not writable, a disk full
        print(f"resforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("resforge: interrupted", file=sys.stderr)
        return 130
    return 0
