"""A private LVM volume group over a loop device, for the lvm driver's tests and bench.

One VG per checkout and pytest process (named from the checkout's path and the xdist
worker, so neither two checkouts nor two workers of one run ever share a VG: `reset`
empties the whole VG between tests) on a sparse file, made once per session and removed at
its end; a VG or loop device left by an interrupted session is removed first. Every LVM
command here names the loop device (`--devices`), so LVM never scans or touches the host's
other block devices, and LVM's configuration, backups and archives live in a private
directory (LVM_SYSTEM_DIR, which the reconciler's LVM runner passes on). Its lvm.conf sets
`global/use_aio = 0`: with AIO, each LVM2 command here waits about 33 ms in io_destroy
(measured with strace: the kernel's AIO teardown), three quarters of a typical `lvs`;
production hosts may want the same.

This kernel has no device-mapper, so the VG's LVs are never activated: the pools made on
it say `activate: false`, and tests reach an LV's bytes through its segment map
(`segment_bytes` below, written apart from the driver's own, so the tests do not check
the driver with itself).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PV_SIZE = 8 << 30  # sparse: only what the tests write takes space
EXTENT = "1m"  # small extents: LVs of the tests' sizes, and several segments after growth
LVM_CONF = "global {\n    use_aio = 0\n}\n"


def vg_name(root: Path = ROOT, worker: str | None = None) -> str:
    """This checkout's VG for this pytest process: `worker` is pytest-xdist's worker id
    ($PYTEST_XDIST_WORKER, e.g. gw1; empty in a run of one process)."""
    if worker is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    key = str(root) if not worker else f"{root}\0{worker}"
    return "rcl" + hashlib.sha256(key.encode()).hexdigest()[:10]


def not_available() -> str | None:
    """Why the LVM tests cannot run here (None: they can)."""
    for tool in ("lvcreate", "losetup", "pvcreate"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs lvm2)"
    if os.geteuid() != 0:
        return "LVM and loop devices need root"
    if not os.path.exists("/dev/loop-control"):
        return "this kernel offers no loop devices (/dev/loop-control is missing)"
    return None


@dataclass(frozen=True)
class VolumeGroup:
    vg: str
    pv: str  # the loop device
    sysdir: Path  # LVM_SYSTEM_DIR

    def lvm(self, cmd: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [cmd, "--devices", self.pv, "--driverloaded", "n", *args],
            capture_output=True,
            text=True,
            check=check,
            env={**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", "LVM_SYSTEM_DIR": str(self.sysdir)},
            timeout=120,
        )

    def report(self, cmd: str, fields: str, *args: str) -> list[dict[str, str]]:
        out = self.lvm(
            cmd, "--reportformat", "json", "--units", "b", "--nosuffix", "-o", fields, *args
        ).stdout
        rows: list[dict[str, str]] = []
        for part in json.loads(out)["report"]:
            for v in part.values():
                rows.extend(v)
        return rows

    def lvs(self) -> dict[str, list[str]]:
        """LV name -> tags."""
        rows = self.report("lvs", "lv_name,lv_tags", self.vg)
        return {r["lv_name"]: [t for t in r["lv_tags"].split(",") if t] for r in rows}

    def vg_tags(self) -> list[str]:
        (row,) = self.report("vgs", "vg_tags", self.vg)
        return [t for t in row["vg_tags"].split(",") if t]

    def lv_size(self, lv: str) -> int:
        (row,) = self.report("lvs", "lv_size", f"{self.vg}/{lv}")
        return int(row["lv_size"])

    @functools.cached_property
    def pe_start(self) -> int:
        """Where the PV's first extent begins (fixed when the PV is made)."""
        (pv,) = self.report("pvs", "pv_name,pe_start", self.pv)
        return int(pv["pe_start"])

    def segments(self, lv: str) -> list[tuple[int, int]]:
        """(offset on the PV, length) of each of the LV's segments, in the LV's order."""
        rows = self.report(
            "lvs", "seg_start_pe,seg_pe_ranges,vg_extent_size", "--segments", f"{self.vg}/{lv}"
        )
        out = []
        for r in sorted(rows, key=lambda r: int(r["seg_start_pe"])):
            dev, _, rng = r["seg_pe_ranges"].rpartition(":")
            assert dev == self.pv, r
            first, last = (int(x) for x in rng.split("-"))
            ext = int(r["vg_extent_size"])
            out.append((self.pe_start + first * ext, (last - first + 1) * ext))
        return out

    def segment_bytes(self, lv: str, size: int | None = None) -> bytes:
        """The LV's bytes, read from the PV at its segments' extents."""
        data = bytearray()
        with open(self.pv, "rb", buffering=0) as f:
            for off, length in self.segments(lv):
                f.seek(off)
                data += f.read(length)
        return bytes(data if size is None else data[:size])

    def write_lv(self, lv: str, offset: int, data: bytes) -> None:
        """Write into an LV's bytes as its guest would (through its segments)."""
        with open(self.pv, "r+b", buffering=0) as f:
            base = 0
            for off, length in self.segments(lv):
                while data and base <= offset < base + length:
                    k = min(len(data), base + length - offset)
                    f.seek(off + offset - base)
                    f.write(data[:k])
                    data, offset = data[k:], offset + k
                base += length
            os.fsync(f.fileno())
        assert not data, "write past the LV's end"

    def reset(self) -> None:
        """Remove every LV and tag, for the next test's fresh store."""
        lvs = self.lvs()
        if lvs:  # one command for them all: each LVM command here costs about 12 ms
            self.lvm("lvremove", "-y", *(f"{self.vg}/{lv}" for lv in lvs))
        args = [a for t in self.vg_tags() for a in ("--deltag", t)]
        if args:
            self.lvm("vgchange", *args, self.vg)

    def section(self, **extra: object) -> dict[str, object]:
        """The pool config's `lvm` section for this VG (test mode: no activation)."""
        return {"vg": self.vg, "devices": [self.pv], "activate": False, **extra}


def _teardown(vg: str, backing: Path, sysdir: Path) -> None:
    """Remove the VG, its PV and loop device, whatever an earlier session left."""
    res = subprocess.run(
        ["losetup", "-j", str(backing), "-O", "NAME", "-n"],
        capture_output=True,
        text=True,
        check=False,
    )
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", "LVM_SYSTEM_DIR": str(sysdir)}
    for dev in res.stdout.split():
        for argv in (
            ["vgremove", "--devices", dev, "--driverloaded", "n", "-ff", "-y", vg],
            ["pvremove", "--devices", dev, "-ff", "-y", dev],
        ):
            subprocess.run(argv, capture_output=True, check=False, env=env, timeout=120)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
    backing.unlink(missing_ok=True)


@contextmanager
def make_vg(workdir: Path, vg: str, size: int = PV_SIZE) -> Iterator[VolumeGroup]:
    """Make the VG (removing a stale one first), yield it, then remove it."""
    workdir.mkdir(parents=True, exist_ok=True)
    sysdir = workdir / "lvm-etc"
    sysdir.mkdir(exist_ok=True)
    (sysdir / "lvm.conf").write_text(LVM_CONF)
    backing = workdir / f"{vg}.pv"
    _teardown(vg, backing, sysdir)
    with open(backing, "wb") as f:
        f.truncate(size)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    group = VolumeGroup(vg, dev, sysdir)
    try:
        group.lvm("pvcreate", dev)
        group.lvm("vgcreate", "-s", EXTENT, vg, dev)
        yield group
    finally:
        _teardown(vg, backing, sysdir)


@contextmanager
def spare_vg(vg: VolumeGroup, suffix: str, size: int = 1 << 30) -> Iterator[VolumeGroup]:
    """Another private VG beside `vg`, on a loop device of its own, named `vg`'s name with
    its last character replaced by `suffix` (not a hex digit, so never another checkout's
    VG); made (a stale one removed first) and removed after. The reconciler's LVM commands
    keep `vg`'s LVM_SYSTEM_DIR (the same lvm.conf)."""
    name = vg.vg[:-1] + suffix
    with make_vg(Path("/tmp") / f"reconciler-lvm-{name}", name, size=size) as group:
        yield group


@pytest.fixture(scope="session")
def lvm_vg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VolumeGroup]:
    """This checkout's private VG (this xdist worker's own), for the session;
    LVM_SYSTEM_DIR points at its config."""
    why = not_available()
    if why:
        pytest.skip(why)
    workdir = Path("/tmp") / f"reconciler-lvm-{vg_name()}"
    with make_vg(workdir, vg_name()) as group:
        old = os.environ.get("LVM_SYSTEM_DIR")
        os.environ["LVM_SYSTEM_DIR"] = str(group.sysdir)
        try:
            yield group
        finally:
            if old is None:
                os.environ.pop("LVM_SYSTEM_DIR", None)
            else:
                os.environ["LVM_SYSTEM_DIR"] = old
