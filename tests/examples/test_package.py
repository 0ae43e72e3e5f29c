"""The distribution as a release would make it: `python -m build` makes the sdist and, from it, the wheel;
the wheel installs into a fresh virtual environment and serves the examples it ships.

The fresh environment gets deadend from the wheel alone; its dependencies (lupa, cryptography, ...) come
from this test environment's site-packages through a .pth file, so nothing is downloaded to install it.
The build itself fetches setuptools from the package index, as any isolated build does.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import AS_ROOT, EXAMPLES, HOST, REPO, free_offset, read_all, read_until

DISTRIBUTION = "deadend_honeypot"  # "deadend" on the package index is an unrelated project


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return out


def test_the_sdist_and_the_wheel_hold_what_deadend_needs(dist: Path) -> None:
    (sdist,) = dist.glob(f"{DISTRIBUTION}-*.tar.gz")
    (wheel,) = dist.glob(f"{DISTRIBUTION}-*-py3-none-any.whl")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for example in EXAMPLES.glob("*.lua"):
        assert f"examples/{example.name}" in names
    assert {"README.md", "pyproject.toml", "sandbox/bootstrap.lua", "deadend/clienthello.py"} <= names
    with zipfile.ZipFile(wheel) as whl:
        files = set(whl.namelist())
        metadata = whl.read(next(n for n in files if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = whl.read(next(n for n in files if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "Name: deadend-honeypot" in metadata
    assert "deadend = deadend.cli:main" in entry_points
    (data,) = {n.split("/share/", 1)[0] + "/share/deadend/examples" for n in files if "/share/deadend/" in n}
    assert re.fullmatch(rf"{DISTRIBUTION}-[\w.]+\.data/data/share/deadend/examples", data), data
    for example in EXAMPLES.glob("*.lua"):
        assert f"{data}/{example.name}" in files
    assert any(name.startswith(f"{data}/transcripts/") for name in files)
    assert {"sandbox/bootstrap.lua", "broker/tls.py", "deadend/sinks/spool.py"} <= files
    assert not any(name.startswith(("tests/", "bench/")) for name in files)


def test_the_wheel_installs_and_serves_its_examples(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob(f"{DISTRIBUTION}-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies: this environment's, after the fresh one's own (which alone has deadend)
    Path(site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(pip, check=True, timeout=120, cwd=tmp_path)
    where = subprocess.run(
        [python, "-c", "import broker, deadend, sandbox; print(deadend.__file__, broker.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert where.count(str(venv)) == 2, where  # the wheel's modules, not this checkout's
    deadend = str(venv / "bin" / "deadend")
    examples = Path(
        subprocess.run([deadend, "examples"], capture_output=True, text=True, check=True).stdout.strip()
    )
    assert examples == venv / "share" / "deadend" / "examples"
    assert {p.name for p in examples.glob("*.lua")} == {p.name for p in EXAMPLES.glob("*.lua")}
    check = subprocess.run([deadend, "check", str(examples)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr

    ports = [int(p.stem) for p in examples.glob("*.lua")]
    offset = free_offset(ports)
    cmd = [deadend, "broker", "--scripts", str(examples), "--host", HOST, "--port-offset", str(offset)]
    served = subprocess.Popen(
        [*cmd, *AS_ROOT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert served.stdout is not None
        deadline = time.monotonic() + 60
        for line in served.stdout:
            if f"ready: {len(ports)} script(s)" in line or time.monotonic() > deadline:
                break
        with socket.create_connection((HOST, 25 + offset), timeout=10) as smtp:
            assert read_until(smtp, b"\r\n").startswith(b"220 mail.example.com ESMTP Postfix")
            smtp.sendall(b"QUIT\r\n")
            assert read_all(smtp).endswith(b"221 2.0.0 Bye\r\n")
        context = ssl._create_unverified_context()
        with (
            socket.create_connection((HOST, 443 + offset), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="www.example.com") as https,
        ):
            https.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n")
            assert b"<title>Welcome to nginx!</title>" in read_all(https)
    finally:
        served.send_signal(signal.SIGTERM)
        out, err = served.communicate(timeout=30)
    assert served.returncode == 0, err
    assert "Traceback" not in err + out
    assert re.search(r"TLS TLSv1\.3 .* sni=www\.example\.com", out)
