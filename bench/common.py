"""What the libvirt benches share: this checkout's paths, a private libvirtd, dir pools,
and timing a command that must succeed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import libvirt

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "libvirtd.sh"
RECONCILE = ROOT / ".venv" / "bin" / "reconcile"


def start_daemon(d: Path) -> str:
    """Start a private libvirtd in `d` (scripts/libvirtd.sh); its URI."""
    out = subprocess.run([str(SCRIPT), "start", str(d)], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def stop_daemon(d: Path) -> None:
    subprocess.run([str(SCRIPT), "stop", str(d)], check=False, capture_output=True)


def make_pool(conn: libvirt.virConnect, name: str, path: Path) -> libvirt.virStoragePool:
    """A started dir pool `name` over the new directory `path`."""
    path.mkdir(parents=True)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
    )
    pool.create(0)
    return pool


def timed(argv: list[str]) -> tuple[float, str]:
    """Run `argv`: (seconds, stdout); the bench ends with its output if it fails."""
    t = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    took = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return took, res.stdout
