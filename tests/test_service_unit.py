"""examples/reconcile-watch.service is a unit an administrator would install: systemd's own
checker accepts it, and its sandbox keeps `systemd-analyze security`'s exposure at or
under 4.0 (the unsandboxed unit scored 9.6, UNSAFE). No systemd runs here: both run
offline on the file. The watchdog it asks for is tested against the loop itself
(tests/test_loop.py, the NOTIFY_SOCKET tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.env import ROOT

UNIT = ROOT / "examples" / "reconcile-watch.service"
INSTALLED = "/opt/reconciler/venv/bin/reconcile"  # docs/service.md's production install
MAX_EXPOSURE = 4.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze (Debian's systemd) is missing"
)


def _unit_here(tmp_path: Path) -> Path:
    """The unit as installed, but running this checkout's venv: `verify` wants ExecStart's
    program to exist, and /opt/reconciler is not installed on a test machine."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} watch " in text
    here = ROOT / ".venv" / "bin" / "reconcile"
    assert here.exists(), "make setup makes .venv"
    path = tmp_path / UNIT.name
    path.write_text(text.replace(INSTALLED, str(here)))
    return path


def _settings(text: str) -> dict[str, list[str]]:
    """Each directive's values, continuation lines joined, comments left out."""
    out: dict[str, list[str]] = {}
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def test_systemd_verifies_the_unit(tmp_path: Path) -> None:
    path = _unit_here(tmp_path)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # Warnings (an unknown directive, a bad value) go to stderr with rc 0: none about it.
    assert path.name not in res.stderr, res.stderr


def test_the_sandbox_holds_the_exposure_at_or_under_4(tmp_path: Path) -> None:
    path = _unit_here(tmp_path)
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", res.stdout)
    assert m is not None, res.stdout
    assert float(m.group(1)) <= MAX_EXPOSURE, res.stdout


def test_the_unit_says_what_the_loop_needs() -> None:
    s = _settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] and s["Documentation"]
    for key in ("After", "Wants"):
        named = " ".join(s[key]).split()
        assert "network-online.target" in named and "libvirtd.service" in named
    # The exceptions the loop's work needs, and the sandbox around them.
    assert s["ProtectSystem"] == ["strict"] and s["NoNewPrivileges"] == ["yes"]
    assert s["StateDirectory"] == ["reconciler"] and s["StateDirectoryMode"] == ["0700"]
    writable = " ".join(s["ReadWritePaths"]).split()
    assert "-/var/lib/libvirt/images" in writable  # libvirt's default dir pool
    assert "-/etc/lvm/backup" in writable and "-/run/lock/lvm" in writable
    families = " ".join(s["RestrictAddressFamilies"]).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert "PrivateDevices" not in s and "PrivateNetwork" not in s
    caps = " ".join(s["CapabilityBoundingSet"]).split()
    assert "CAP_SYS_ADMIN" in caps and "CAP_SYS_PTRACE" not in caps
