"""deadend.options, the one table of broker options: the parser, the config file, the README and the
effective configuration all come from it; and the README's table of session-end reasons from the enum."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deadend import options
from deadend.cli import build_parser, config_from_args, parse_args
from deadend.config import Config
from deadend.configfile import ConfigFileError, read_config_file
from deadend.reasons import MEANING, Reason

README = Path(__file__).resolve().parents[2] / "README.md"


def between(text: str, name: str) -> str:
    found = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert found, f"README.md has no {name} section"
    return found.group(1)


def test_readme_option_table_is_the_option_table() -> None:
    assert between(README.read_text(), "options") == options.readme_table(), (
        "README.md's option table is stale: paste deadend.options.readme_table() between the markers"
    )


def reasons_table() -> str:
    rows = ["| reason | meaning |", "|---|---|"]
    rows += [f"| `{reason}` | {MEANING[reason]} |" for reason in Reason]
    return "\n".join(rows)


def test_readme_reasons_table_is_the_enum() -> None:
    assert set(MEANING) == set(Reason)
    assert between(README.read_text(), "reasons") == reasons_table()


def test_every_option_is_a_broker_flag_with_its_default() -> None:
    args = parse_args(["broker", "--scripts", "x"])
    for option in options.OPTIONS:
        value = getattr(args, option.field)
        expected = [] if option.repeatable else option.default
        assert value == (Path("x") if option.name == "scripts" else expected), option.name
    flags = {a.option_strings[0] for a in build_parser().commands["broker"]._actions if a.option_strings}
    assert {o.flag for o in options.OPTIONS} <= flags


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--workers", "0"], "out of range"),
        (["--workers", "x"], "not a valid integer"),
        (["--idle-timeout", "nan"], "out of range"),
        (["--metrics", "nowhere"], "not HOST:PORT"),
        (["--ignore", "300.0.0.0/8"], "not an IP network"),
        (["--log-format", "xml"], "is not one of text, json"),
    ],
)
def test_bad_flags_are_one_line(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["broker", "--scripts", "x", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deadend.toml"
    path.write_text(text)
    return path


def test_config_file_and_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'scripts = "s"\nworkers = 8\nignore = ["10.0.0.0/8"]\n'
        "[port.22]\nsessions-per-worker = 100\nworkers = 2\nidle-timeout = 0\n"
        "[port.25]\nmemory = 64\n",
    )
    config = config_from_args(parse_args(["broker", "--config", str(path), "--workers", "16"]))
    assert config.scripts == tmp_path / "s"  # relative to the file's folder
    assert config.workers == 16  # the command line wins
    assert [str(n) for n in config.ignore] == ["10.0.0.0/8"]
    assert config.sessions_per_worker_for(22) == 100 and config.sessions_per_worker_for(25) == 1
    assert config.workers_cap(22) == 2 and config.workers_cap(25) is None
    assert config.ceilings_for(22).idle_timeout == 0 and config.ceilings_for(25).memory == 64
    assert config.ceilings_for(80) == config.ceilings
    line = config.effective()
    assert "port.22.sessions-per-worker=100" in line and "port.25.memory=64" in line


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("nope = 1\n", "unknown option 'nope'"),
        ("workers = true\n", "workers: expected a string or a number"),
        ("proxy-protocol = 1\n", "proxy-protocol: expected true or false"),
        ("[port.abc]\nworkers = 1\n", "port.abc: not a port number"),
        ("[port.022]\nworkers = 1\n", "port.022: not a port number"),
        ("[port.22]\nuser = 'x'\n", "'user' cannot be set per port"),
        ("[port.22]\nworkers = 0\n", "port.22.workers: '0' is out of range"),
        ("port = 3\n", "expected tables such as [port.22]"),
        ("workers = \n", "not valid TOML"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigFileError, match=re.escape(error)):
        read_config_file(write(tmp_path, text))


def test_effective_configuration_names_every_option_once() -> None:
    line = Config(scripts=Path("s")).effective()
    names = [part.split("=", 1)[0] for part in line.split(" ")]
    assert names == [o.name for o in options.OPTIONS]
