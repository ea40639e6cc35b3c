"""Options as dataclass fields: a field's type, range and help are its one definition.

Values are converted and checked against them wherever they come from (a flag, a YAML file, a
keyword), and the command-line flags are generated from them, so a flag parses to its field's type
and a bad value is refused, naming the range, before a command starts. Numbers are finite: NaN and
infinity are never a setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

BOUNDS = ("ge", "gt", "le", "lt")  # a number's range, named as pydantic's Field names it
T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           **meta: Any) -> Any:
    """A dataclass field with its help, its range (`ge`, `gt`, `le`, `lt`), its accepted values (`choices`) and how
    its flag is made (`flag`: another name, or None for none; `short`: a one-letter alias; `nargs`, `action`,
    `metavar`; `group`: its heading; `exclusive`: a name shared by flags that cannot be given together). Without a
    default, the flag is required."""
    if factory is None and isinstance(default, (list, dict)):
        factory = lambda: type(default)(default)  # noqa: E731
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _base(hint: Any) -> tuple[Any, bool]:
    """The type an option holds, and whether it may be None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _shown(default: Any) -> str:
    """A default as help text shows it: 8000, 5, 20,000,000, 1,8,32."""
    if isinstance(default, (list, tuple)):
        return ",".join(_shown(v) for v in default)
    if isinstance(default, int) and not isinstance(default, bool) and default >= 10_000:
        return f"{default:,}"
    return _num(default) if isinstance(default, (int, float)) else str(default)


def expected(hint: Any, bounds: Mapping[str, Any] = {}, allowed: Sequence[str] | None = None) -> str:
    """What an option takes, in words: `a number in [0, 1)`, `a positive whole number`, `true or false`."""
    base, _ = _base(hint)
    if typing.get_origin(base) is list:
        if allowed:
            return "a comma-separated list among " + ", ".join(allowed)
        each = expected(typing.get_args(base)[0], bounds).removeprefix("a ")
        return "a comma-separated list of " + each.replace("number", "numbers", 1).replace("text", "texts", 1)
    if allowed:
        return "one of " + ", ".join(allowed)
    if base is bool:
        return "true or false"
    if base not in (int, float):
        return "text"
    noun = "whole number" if base is int else "number"
    ge, gt, le, lt = (bounds.get(k) for k in BOUNDS)
    if le is None and lt is None and (gt == 0 or (ge == 1 and base is int)):
        return f"a positive {noun}"
    low = f"[{_num(ge)}" if ge is not None else f"({_num(gt)}" if gt is not None else None
    high = f"{_num(le)}]" if le is not None else f"{_num(lt)})" if lt is not None else None
    if low and high:
        return f"a {noun} in {low}, {high}"
    if ge is not None or gt is not None:
        return f"a {noun} {'at least' if ge is not None else 'above'} {_num(ge if ge is not None else gt)}"
    if le is not None or lt is not None:
        return f"a {noun} {'at most' if le is not None else 'below'} {_num(le if le is not None else lt)}"
    return f"a finite {noun}" if base is float else f"a {noun}"


def _as(base: Any, value: Any) -> Any:
    """`value` as `base` (a list from a comma-separated string too); TypeError or ValueError if it is not one."""
    if typing.get_origin(base) is list:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        (item,) = typing.get_args(base)
        return [_as(item, v.strip() if isinstance(v, str) else v) for v in items]
    if base is bool:
        value = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(value, bool):
            raise TypeError
        return value
    if base in (int, float):
        if isinstance(value, bool):  # YAML's true is no number
            raise TypeError
        if base is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        number = base(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    return base(value)


def _within(value: Any, bounds: Mapping[str, Any]) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    ge, gt, le, lt = (bounds.get(k) for k in BOUNDS)
    return ((ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le)
            and (lt is None or value < lt))


def convert(name: str, hint: Any, value: Any, bounds: Mapping[str, Any] = {},
            allowed: Sequence[str] | None = None) -> Any:
    """`value` as an option of type `hint` within `bounds` (and among `allowed`), or a ConfigError naming `name`,
    what it takes and what it got."""
    base, optional = _base(hint)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty: it must be {expected(hint, bounds, allowed)}")
    try:
        out = _as(base, value)
    except (TypeError, ValueError, OverflowError, yaml.YAMLError):
        out = None
    items = out if isinstance(out, list) else [out]
    if out is None or not all(_within(v, bounds) and (not allowed or v in allowed) for v in items):
        raise ConfigError(f"{name} must be {expected(hint, bounds, allowed)}, got {value if out is None else out!r}")
    return out


def check_fields(obj: Any, name: Callable[[str], str] = lambda n: n) -> None:
    """Convert and check every field of an options dataclass in place (type, finiteness, range)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, convert(name(f.name), hints[f.name], getattr(obj, f.name), f.metadata))


def from_keywords(cls: type[T], keywords: Mapping[str, Any]) -> T:
    """An options dataclass from a function's keywords, each converted and checked against its field, so that a
    keyword means what its flag means; an unknown keyword is a ConfigError naming it, not a TypeError."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in keywords:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                           f"; known: {', '.join(known)}"))
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in keywords
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"give {', '.join(missing)}")
    options = cls(**keywords)
    check_fields(options)
    return options


def take_keywords(cls: type[T], keywords: Mapping[str, Any]) -> tuple[T, dict[str, Any]]:
    """`cls` from the keywords that are its fields, and the others (a training config's options, checked there)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return (from_keywords(cls, {k: v for k, v in keywords.items() if k in names}),
            {k: v for k, v in keywords.items() if k not in names})


def flag_type(hint: Any, parse: Callable[[str], Any] | None = None, **bounds: Any) -> Callable[[str], Any]:
    """An argparse type: the text converted as an option of type `hint` within `bounds` (or by `parse`), a
    refusal being argparse's usage error, which names the flag."""
    def check(text: str) -> Any:
        try:
            return parse(text) if parse else convert("", hint, text, bounds)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None
    check.__name__ = expected(hint, bounds)  # what argparse would call the type
    return check


def add_flags(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", group: str | None = None,
              name: Callable[[str], str] | None = None, choices: Mapping[str, Sequence[str]] = {},
              show_default: bool = False) -> None:
    """A flag for each field of `cls` made by `option` (not those with flag=None), under the field's `group`
    heading (else `group`). The value lands at `prefix + field` converted and checked (messages name `name(field)`,
    default the flag); a flag not given is absent, so it overrides nothing. `choices`: field -> accepted values,
    beside those a field names itself."""
    hints = typing.get_type_hints(cls)
    groups: dict[str | None, Any] = {}
    exclusive: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or meta.get("flag", "") is None:
            continue
        heading = meta.get("group", group)
        if heading not in groups:
            groups[heading] = parser.add_argument_group(heading) if heading else parser
        where = groups[heading]
        if "exclusive" in meta:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = where.add_mutually_exclusive_group()
            where = exclusive[meta["exclusive"]]
        flag = "--" + (meta.get("flag") or f.name).replace("_", "-")
        shown = name(f.name) if name else flag
        help = meta["help"]
        if show_default and f.default not in (dataclasses.MISSING, None, False):
            help += f" (default: {_shown(f.default)})"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kw: dict[str, Any] = dict(dest=prefix + f.name, default=argparse.SUPPRESS, help=help)
        if required:
            kw["required"] = True
        hint, allowed = hints[f.name], choices.get(f.name, meta.get("choices"))
        base, _ = _base(hint)
        bounds = {k: meta[k] for k in BOUNDS if k in meta}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            each = meta.get("nargs") is not None or meta.get("action") == "append"  # argparse parses each item
            one = typing.get_args(base)[0] if each else hint
            parse = lambda text, one=one, n=shown, b=bounds, a=allowed: convert(n, one, text, b, a)  # noqa: E731
            kw.update(type=flag_type(one, parse, **bounds),
                      metavar=meta.get("metavar") or ("{" + ",".join(allowed) + "}" if allowed else
                                                      (meta.get("flag") or f.name).upper()),
                      **{k: meta[k] for k in ("nargs", "action") if k in meta})
        where.add_argument(flag, *(["-" + meta["short"]] if "short" in meta else []), **kw)
