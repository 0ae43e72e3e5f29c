"""`nmap -sV` names every shipped example's service, as it would on a real host: one scan of all the
examples on their real port numbers (tests/examples/netns_nmap.py, in a network namespace of its own),
TLS ones as `ssl/...`. 22.lua, the tarpit, may be named ssh or left unknown. The scan takes about 45 s,
nmap's own waits for the probes a silent or slow service does not answer."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import EXAMPLES, NOT_INSTALLED, REPO

# port -> (nmap's service name, tunnel, a word of its product name); None: anything will do
EXPECTED: dict[int, tuple[str, str, str] | None] = {
    21: ("ftp", "", "vsftpd"),
    22: None,  # the tarpit never sends a banner
    23: ("telnet", "", "BusyBox"),
    25: ("smtp", "", "Postfix"),
    80: ("http", "", "nginx"),
    110: ("pop3", "", "Dovecot"),
    143: ("imap", "", "Dovecot"),
    443: ("http", "ssl", "nginx"),
    993: ("imap", "ssl", "Dovecot"),
    3306: ("mysql", "", "MySQL"),
    5222: ("jabber", "", "ejabberd"),
    6379: ("redis", "", "Redis"),
    8080: ("http", "", "Tomcat"),
}
# nmap at intensity 0 still tries every probe registered for the port: enough on the real numbers
INTENSITY = "0"


def namespaces_refused() -> str:
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "true"], capture_output=True, text=True, timeout=10
    )
    return probe.stderr.strip() if probe.returncode else ""


def test_nmap_names_every_example() -> None:
    for program in ("nmap", "unshare"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} {NOT_INSTALLED} (.ci/run installs nmap; unshare is util-linux's)")
    if why := namespaces_refused():
        pytest.skip(f"this machine refuses user and network namespaces, needed for real ports: {why}")
    ports = sorted(int(p.stem) for p in EXAMPLES.glob("*.lua"))
    assert set(ports) == set(EXPECTED), "an example without its expected nmap name here"
    started = time.monotonic()
    scan = [sys.executable, "-m", "tests.examples.netns_nmap", INTENSITY]
    run = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", *scan],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    found = {}
    for element in ET.fromstring(run.stdout).iter("port"):
        service, state = element.find("service"), element.find("state")
        assert state is not None and state.get("state") == "open", ET.tostring(element)
        found[int(element.get("portid", "0"))] = {} if service is None else service.attrib
    print(f"nmap -sV --version-intensity {INTENSITY}: {elapsed:.1f} s")
    for port, expected in EXPECTED.items():
        seen = found[port]
        print(port, seen.get("tunnel", ""), seen.get("name"), seen.get("product"), seen.get("version", ""))
        if expected is None:
            assert seen.get("name") in ("ssh", "unknown", None) or seen.get("name", "").startswith("ssh")
            continue
        name, tunnel, product = expected
        log = [line for line in run.stderr.splitlines() if f"port={port} " in line][-20:]
        assert (seen.get("name"), seen.get("tunnel", "")) == (name, tunnel), (port, seen, log)
        assert product in seen.get("product", ""), (port, seen)
    assert elapsed < 60
