"""Finding and starting this checkout's private libvirtd, for tests/conftest.py.

The daemon is started with scripts/libvirtd.sh in the directory that scripts/libvirt-dir.sh
names, the one `make libvirtd` uses. It is left running for later sessions: `make stop`
ends it, and it exits by itself once idle for an hour.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def _script(*args: str) -> str:
    """Run one of the project's scripts; its last line of output, or an error naming why."""
    res = subprocess.run(
        ["bash", str(SCRIPTS / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise RuntimeError(
            f"scripts/{' '.join(args)} failed (exit {res.returncode}): {res.stderr.strip()}"
        )
    return lines[-1]


def libvirt_dir() -> Path:
    """This checkout's daemon directory, as the Makefile computes it."""
    return Path(_script("libvirt-dir.sh"))


def start_libvirtd() -> str:
    """Start this checkout's daemon unless it runs; its URI."""
    return _script("libvirtd.sh", "start", str(libvirt_dir()))
