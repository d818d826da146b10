"""`make demo`'s script runs as README says (`make demo`): it reconciles the examples
and ends with a guest booted from the disks it made, which read the image on its root
disk and the ext4 label of its second."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.libvirtd


def test_the_demo_boots_a_guest_from_the_disks_it_made() -> None:
    res = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "-> vda (serial root): 64 MiB, the guest image's bytes" in out, out[-4000:]
    assert "-> vdb (serial eph): 64 MiB, ext4 label demo-eph" in out, out[-4000:]
    assert '<driver name="qemu" type="qcow2" />' in out  # the root disk: an overlay
    # The Ceph key reaches libvirt's secret through a private file, not virsh's argv.
    assert "insecure" not in out, out[-4000:]
