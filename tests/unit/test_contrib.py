"""contrib/: the example config shows every broker option at its default, the socket unit listens on
exactly the example scripts' ports, and both units pass `systemd-analyze verify`."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from deadend.options import OPTIONS

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"
EXAMPLES = ROOT / "examples"
EXAMPLE_CONFIG = CONTRIB / "deadend.toml"
SHIPPED_DEADEND = "/usr/local/bin/deadend"


def broker_options() -> dict[str, object]:
    """Every key a --config file may hold (the broker's long flags without "--") and its default, from
    the option table; None means unset, which the example leaves commented out. `scripts` has no
    default: the example gives the packaged path."""
    options: dict[str, object] = {}
    for option in OPTIONS:
        options[option.name] = list(option.default) if option.repeatable else option.default
    options["scripts"] = "/etc/deadend/scripts"
    return options


BROKER_OPTIONS = broker_options()
COMMENTED_OPTION = re.compile(r"^# ?([a-z][a-z-]*) = ")


def commented_options(text: str) -> dict[str, object]:
    """The `# key = value` lines, uncommented and parsed: an operator must be able to just uncomment one."""
    lines = [line.lstrip("# ") for line in text.splitlines() if COMMENTED_OPTION.match(line)]
    return tomllib.loads("\n".join(lines))


def test_example_config_sets_every_option_at_its_default() -> None:
    text = EXAMPLE_CONFIG.read_text()
    active = tomllib.loads(text)
    active.pop("port")  # the per-port tables: below
    commented = commented_options(text)
    assert active.keys() | commented.keys() == BROKER_OPTIONS.keys()
    assert not active.keys() & commented.keys()
    assert set(commented) == {key for key, default in BROKER_OPTIONS.items() if default is None}
    for key, value in active.items():
        default = BROKER_OPTIONS[key]
        assert (value, type(value) is bool) == (default, type(default) is bool), key


def listen_ports(socket_unit: Path) -> list[int]:
    ports = []
    for line in socket_unit.read_text().splitlines():
        if line.startswith("ListenStream="):
            value = line.removeprefix("ListenStream=").strip()
            ports.append(int(value.rpartition(":")[2]))  # "22", "0.0.0.0:22" or "[::]:22"
    return ports


def test_socket_unit_listens_on_exactly_the_example_ports() -> None:
    ports = listen_ports(CONTRIB / "deadend.socket")
    assert len(ports) == len(set(ports))
    missing = [port for port in ports if not (EXAMPLES / f"{port}.lua").is_file()]
    assert not missing, f"ListenStream= ports without a script in examples/: {missing}"
    # A script below 1024 with no ListenStream= line would stop the unprivileged broker at start-up.
    example_ports = {int(path.stem) for path in EXAMPLES.glob("*.lua") if path.stem.isdigit()}
    assert set(ports) == example_ports


def test_service_starts_the_broker_with_the_example_config_path() -> None:
    service = (CONTRIB / "deadend.service").read_text()
    assert f"\nExecStart={SHIPPED_DEADEND} broker --config /etc/deadend/deadend.toml\n" in service


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart= exists and is executable: point it at a stub in the copy.
    stub = tmp_path / "deadend"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name in ("deadend.socket", "deadend.service"):
        text = (CONTRIB / name).read_text().replace(f"ExecStart={SHIPPED_DEADEND} ", f"ExecStart={stub} ")
        (units / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(units / "deadend.socket"), str(units / "deadend.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # An unknown key or a bad value is only a warning (exit status 0), naming the file: none allowed.
    assert "deadend" not in output, output
