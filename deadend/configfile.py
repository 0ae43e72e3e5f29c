"""`--config FILE`: broker options from a TOML file, checked by the same parsers as the flags.

Keys are the broker's long flags without `--` (`max-per-ip = 8`, `host = ["127.0.0.1"]`, `proxy-protocol =
true`). The file's values become the parser's defaults, so whatever the command line gives wins. Relative
paths are taken from the file's folder, so a config file and its scripts can move together.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

NOT_IN_FILE = frozenset({"config", "help"})


class ConfigFileError(Exception):
    """Worded for one line: `<file>: <key>: <what is wrong>`."""


def defaults_from_file(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML: {e}") from e
    options = _options(parser)
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        action = options.get(key)
        if action is None:
            raise ConfigFileError(f"{path}: unknown option {key!r} (keys are the broker's flags without --)")
        try:
            defaults[action.dest] = _convert(action, value, path.parent)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ConfigFileError(f"{path}: {key}: {e}") from e
    return defaults


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    options = {}
    for action in parser._actions:  # argparse offers no public way to list a parser's options
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and long[0][2:] not in NOT_IN_FILE:
            options[long[0][2:]] = action
    return options


def _convert(action: argparse.Action, value: object, base: Path) -> object:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, not {value!r}")
        return value
    if action.nargs is None and isinstance(action.default, list):  # a repeatable flag: a list in the file
        items = value if isinstance(value, list) else [value]
        return [_scalar(action, item, base) for item in items]
    return _scalar(action, value, base)


def _scalar(action: argparse.Action, value: object, base: Path) -> object:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"expected a string or a number, not {value!r}")
    text = str(value)
    if action.type is Path:
        return base / Path(text)
    converted = action.type(text) if callable(action.type) else text
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, action.choices))}")
    return converted
