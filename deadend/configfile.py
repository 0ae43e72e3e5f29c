"""`--config FILE`: broker options from a TOML file, checked by the same rules as the flags.

Keys are the broker's long flags without `--` (`max-per-ip = 8`, `host = ["127.0.0.1"]`, `proxy-protocol =
true`), from the one option table (deadend/options.py). The file's values become the parser's defaults, so
whatever the command line gives wins. Relative paths are taken from the file's folder, so a config file
and its scripts can move together. One script's own settings go in a table named after its port:

    [port.22]                 # 22.lua: a tarpit, dense, at most 4 worker processes
    sessions-per-worker = 1000
    workers = 4
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from deadend.options import BY_NAME, PER_PORT, Option
from deadend.scripts import PORT_MAX

NOT_IN_FILE = frozenset({"config"})


class ConfigFileError(Exception):
    """Worded for one line: `<file>: <key>: <what is wrong>`."""


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The file's options (by Config field) and each port's own settings (by option name)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigFileError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML: {e}") from e
    values: dict[str, Any] = {}
    ports: dict[int, dict[str, Any]] = {}
    for key, value in data.items():
        if key == "port":
            ports = _ports(path, value)
            continue
        option = BY_NAME.get(key)
        if option is None or key in NOT_IN_FILE:
            raise ConfigFileError(f"{path}: unknown option {key!r} (keys are the broker's flags without --)")
        values[option.field] = _value(path, key, option, value)
    return values, ports


def _ports(path: Path, tables: object) -> dict[int, dict[str, Any]]:
    if not isinstance(tables, dict):
        raise ConfigFileError(f"{path}: port: expected tables such as [port.22]")
    ports: dict[int, dict[str, Any]] = {}
    for name, table in tables.items():
        if not (name.isdigit() and 1 <= int(name) <= PORT_MAX and str(int(name)) == name):
            raise ConfigFileError(f"{path}: port.{name}: not a port number 1..{PORT_MAX} (the script's name)")
        if not isinstance(table, dict):
            raise ConfigFileError(f"{path}: port.{name}: expected a table of options")
        settings: dict[str, Any] = {}
        for key, value in table.items():
            option = PER_PORT.get(key)
            if option is None:
                allowed = ", ".join(sorted(PER_PORT))
                raise ConfigFileError(
                    f"{path}: port.{name}: {key!r} cannot be set per port (these can: {allowed})"
                )
            settings[key] = _value(path, f"port.{name}.{key}", option, value)
        ports[int(name)] = settings
    return ports


def _value(path: Path, key: str, option: Option, value: object) -> object:
    try:
        if option.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, not {value!r}")
            return value
        if option.repeatable:
            items = value if isinstance(value, list) else [value]
            return [_scalar(option, item, path.parent) for item in items]
        return _scalar(option, value, path.parent)
    except ValueError as e:
        raise ConfigFileError(f"{path}: {key}: {e}") from e


def _scalar(option: Option, value: object, base: Path) -> object:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string or a number, not {value!r}")
    parsed = option.parse(str(value))
    return base / parsed if isinstance(parsed, Path) else parsed
