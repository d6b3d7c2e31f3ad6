"""Parse the `%%bigtrain` line into a TrainConfig.

The parser is generated from TrainConfig's fields, so a flag cannot exist without a config
field (or the other way round). Malformed values become `ConfigError` problems that name
the flag; nothing here knows about IPython.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from typing import Any, NoReturn

from nbtrain.config.tree import TrainConfig, choices_of, config_fields, flag_name
from nbtrain.errors import ConfigError, Problem

_COMMA_LISTS = {"hosts", "out"}
_REPEATABLE = {"set"}
# `--resume` alone means "the latest run".
_OPTIONAL_VALUE = {"resume": "latest"}


class _ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises ConfigError instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError([_problem_from_argparse(message)])


def _problem_from_argparse(message: str) -> Problem:
    # argparse says e.g. "argument --zero: invalid choice: '5' (choose from 0, 1, 2, 3)".
    if message.startswith("argument "):
        where, _, rest = message[len("argument "):].partition(": ")
        where = where.split("/")[0]
        if rest.startswith("invalid choice: "):  # the value is quoted for str choices, bare for ints
            value = rest[len("invalid choice: "):].split(" (choose")[0].strip("'")
        else:
            value = rest.split("'")[1] if "'" in rest else ""
        return Problem(where, value, rest, f"see `%%bigtrain?` for {where}")
    if message.startswith("unrecognized arguments"):
        bad = message.split(": ", 1)[1]
        return Problem(bad.split()[0], bad, "unknown flag",
                       "see `%%bigtrain?` for the flags; DeepSpeed keys go in `--set key=value`")
    return Problem("%%bigtrain", "", message, "see `%%bigtrain?`")


def _converter(field_type: str, flag: str) -> Any:
    """Return an argparse `type=` callable for a field's annotation."""
    if field_type.startswith("int"):
        def to_int(text: str) -> int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        return to_int
    if field_type.startswith("float"):
        def to_float(text: str) -> float:
            try:
                return float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        return to_float
    return str


def build_parser() -> argparse.ArgumentParser:
    """Return the `%%bigtrain` argument parser, generated from TrainConfig."""
    parser = _ArgumentParser(prog="%%bigtrain", add_help=False, allow_abbrev=False,
                             description="Train the cell's code with DeepSpeed on N processes.")
    for f in config_fields():
        flag, help_text = flag_name(f.name), f.metadata["help"]
        annotation = str(f.type)
        if annotation == "bool":
            parser.add_argument(flag, action="store_true", dest=f.name, help=help_text)
            continue
        choices = choices_of(annotation)
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": None}
        if f.name in _REPEATABLE:
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif f.name in _COMMA_LISTS:
            kwargs.update(metavar="A,B")
        elif choices is not None:
            kind = type(choices[0])
            kwargs.update(choices=list(choices), type=kind if kind is int else str)
        else:
            kwargs.update(type=_converter(annotation, flag))
        if "flag" in f.metadata:  # named otherwise than its field: `--time TIME`, not `--time TIME_LIMIT`
            kwargs.update(metavar=flag.lstrip("-").upper())
        if f.name in _OPTIONAL_VALUE:
            kwargs.update(nargs="?", const=_OPTIONAL_VALUE[f.name])
        parser.add_argument(flag, **kwargs)
    return parser


def parse_line(line: str) -> TrainConfig:
    """Parse the text after `%%bigtrain` into a TrainConfig.

    >>> parse_line("--zero 3 --offload-optimizer cpu --out a,b").out
    ('a', 'b')
    """
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:
        raise ConfigError([Problem("%%bigtrain", line, f"the line cannot be split ({e})",
                                   "close the quote")]) from e
    namespace = _parse_all(_attach_negative_numbers(words))
    values: dict[str, Any] = {}
    for f in config_fields():
        value = getattr(namespace, f.name)
        if value is None:
            continue
        if f.name in _COMMA_LISTS:
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        elif f.name in _REPEATABLE:
            value = tuple(value)
        values[f.name] = value
    return TrainConfig(**values)


def _attach_negative_numbers(words: list[str]) -> list[str]:
    """Write `--lr -1e-3` as `--lr=-1e-3`: argparse takes '-1e-3' for a flag otherwise."""
    out: list[str] = []
    for word in words:
        if out and out[-1].startswith("--") and "=" not in out[-1] and word.startswith("-") and _is_number(word):
            out[-1] = f"{out[-1]}={word}"
        else:
            out.append(word)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_all(words: list[str]) -> argparse.Namespace:
    """Parse `words`; on mistakes, report every one (argparse alone stops at the first)."""
    parser = build_parser()
    problems: list[Problem] = []
    while True:
        try:
            namespace = parser.parse_args(words)
        except ConfigError as e:
            problems += e.problems
            rest = _without(words, e.problems[0].where)
            if rest == words:
                break
            words = rest
            continue
        if not problems:
            return namespace
        break
    raise ConfigError(problems)


def _without(words: list[str], flag: str) -> list[str]:
    """Return `words` without the first `flag` (and the value that follows it)."""
    for i, word in enumerate(words):
        if word == flag:
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            return words[:i] + words[i + 1 + has_value:]
        if word.startswith(flag + "="):
            return words[:i] + words[i + 1:]
    return words


def to_line(config: TrainConfig) -> str:
    """Return the `%%bigtrain` flags that produce `config` (the inverse of parse_line)."""
    words: list[str] = []
    defaults = TrainConfig()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value == getattr(defaults, f.name):
            continue
        flag = flag_name(f.name)
        if isinstance(value, bool):
            words.append(flag)
        elif f.name in _REPEATABLE:
            for item in value:
                words += [flag, shlex.quote(item)]
        elif f.name in _COMMA_LISTS:
            words += [flag, shlex.quote(",".join(value))]
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)
