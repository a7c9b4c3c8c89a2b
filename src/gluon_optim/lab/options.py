"""Command-line options of the lab, generated from :class:`RunConfig`, and argparse value types.

One place for what every command parses the same way: ``train``, ``compare``, ``sweep``,
``smoothness`` (``cli``) and ``bench`` (``bench.command``) each import from here, so neither
command module imports the other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gluon_optim.lab.train import RunConfig, option_of
from gluon_optim.lab.usage import UsageError

__all__ = [
    "add_config_options",
    "config_from_args",
    "config_overrides",
    "count",
    "counts",
    "csv_values",
    "flag_of",
    "nonnegative",
    "run_fields",
]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def csv_values(text: str, kind: type = str, option: str = "") -> list[Any]:
    """Comma-separated values of ``kind``; a value that does not parse names ``option``."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            out.append(kind(item))
        except ValueError:
            what = {int: "whole numbers", float: "numbers"}.get(kind, "values")
            raise UsageError(option, f"expected comma-separated {what}, got {item!r}") from None
    return out


def nonnegative(text: str) -> float:
    """An argparse type: a finite number ``>= 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def count(lo: int) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= lo``, or an error that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def counts(text: str) -> list[int]:
    """An argparse type: comma-separated whole numbers ``>= 1`` (possibly none)."""
    return [count(1)(x) for x in csv_values(text)]


# -- run options, generated from RunConfig -------------------------------------------------------

#: Namespace prefix of the generated options' dests, so that a command's own option of the same
#: name (smoothness's --steps, which means "override the protocol's") is never read as a field.
_DEST = "config."


class _PairsAction(argparse.Action):
    """``KEY=VALUE`` (or a shortcut's VALUE for its fixed key) into the field's dict."""

    def __init__(self, option_strings: list[str], dest: str, key: str = "", **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.key = key

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, str)
        key, value = self.key, values
        if not key:
            key, sep, text = values.partition("=")
            if not sep or not key:
                parser.error(f"argument {option_string}: expected KEY=VALUE, got {values!r}")
            value = _value(text)
        setattr(namespace, self.dest, {**getattr(namespace, self.dest, {}), key: value})


def flag_of(name: str, prefix: str = "") -> str:
    """The command-line flag of :class:`RunConfig` field ``name`` (``--`` + ``prefix`` + ...)."""
    f = _fields()[name]
    return f"--{prefix}{option_of(f).flag or f.name.replace('_', '-')}"


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(RunConfig)}


def run_fields(*, varied: bool = True) -> list[str]:
    """RunConfig's field names; ``varied=False`` leaves out what compare and sweep vary."""
    return [n for n, f in _fields().items() if varied or not option_of(f).varied]


def _help(text: str, choices: Mapping[str, str] | None, default: object) -> str:
    if choices:
        text += ": " + ", ".join(f"{k} ({v})" if v else k for k, v in choices.items())
    if default is not None and not isinstance(default, dict):
        text += f" (default {default})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def _scalar(hint: Any) -> type:
    """The ``int``, ``float`` or ``str`` of a field annotated ``X`` or ``X | None``."""
    kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (int, float, str):
        raise TypeError(f"RunConfig: no command-line parser for a field of type {hint}")
    kind = kinds[0]
    assert isinstance(kind, type)
    return kind


def _field_kwargs(name: str, help_text: str, default: object) -> dict[str, Any]:
    """``add_argument`` keywords of field ``name``: how its type parses, its choices, help."""
    opt = option_of(_fields()[name])
    hint = typing.get_type_hints(RunConfig)[name]
    choices = opt.choices() if opt.choices else None
    kw: dict[str, Any] = {
        "dest": _DEST + name,
        "default": argparse.SUPPRESS,
        "help": _help(help_text, choices, default),
    }
    if typing.get_origin(hint) is dict:
        return {**kw, "action": _PairsAction, "metavar": "KEY=VALUE"}
    if choices:  # argparse shows {a,b,c} where no metavar is given
        return {**kw, "type": _scalar(hint), "choices": list(choices)}
    return {**kw, "type": _scalar(hint), "metavar": name.upper()}


def add_config_options(
    parser: argparse.ArgumentParser,
    names: Iterable[str],
    *,
    base: RunConfig | None,
    prefix: str = "",
    title: str | None = None,
    helps: Mapping[str, str] | None = None,
) -> dict[str, argparse.Action]:
    """Add the options of RunConfig fields ``names`` to ``parser``; returns them by field name.

    ``base`` supplies the defaults shown in the help (``None``: a command whose defaults vary,
    like smoothness's protocols). ``prefix`` goes after the dashes (``--train-model``);
    ``helps`` replaces a field's help where a command narrows its meaning (the bench's batch is
    sequences only). Nothing is stored for an option not given, so :func:`config_overrides`
    returns exactly what the command line set.
    """
    group = parser.add_argument_group(title) if title else parser
    actions: dict[str, argparse.Action] = {}
    for name in names:
        opt = option_of(_fields()[name])
        default = None if base is None else getattr(base, name)
        kw = _field_kwargs(name, (helps or {}).get(name, opt.help), default)
        actions[name] = group.add_argument(flag_of(name, prefix), **kw)
        for sc in opt.shortcuts:
            group.add_argument(
                f"--{prefix}{sc.flag}",
                dest=_DEST + name,
                action=_PairsAction,
                key=sc.key,
                default=argparse.SUPPRESS,
                help=sc.help,
                metavar=sc.metavar,
                choices=sc.choices,
            )
    return actions


def config_overrides(args: argparse.Namespace, base: RunConfig) -> dict[str, Any]:
    """The RunConfig fields the command line set; dict fields are merged onto ``base``'s."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(_DEST):
            name = dest.removeprefix(_DEST)
            out[name] = {**getattr(base, name), **value} if isinstance(value, dict) else value
    return out


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The validated :class:`RunConfig` the command-line options give, over ``base``."""
    base = RunConfig() if base is None else base
    config = dataclasses.replace(base, **config_overrides(args, base))
    config.validate()
    return config
