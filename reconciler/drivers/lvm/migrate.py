"""Migrations into and out of an lvm pool (apply/steps/migrate.py drives them).

The one layout is lvm/raw. A copy is a new LV (zeroed past its size); a raw file or LV is
copied in through LvData, anything else by qemu-img, which reaches an LV as its raw driver
with `offset` and `size` over a host_device (/dev/VG/LV; without activation, the LV's one
segment of its PV: an LV of several segments cannot be addressed so, and is refused).
Free space is the VG's, and a copy takes its whole size in extents (`thick_unit`),
whatever its data.

Invariants: nothing is read as a format here (raw to raw only; a format is qemu-img's);
no earlier tenant's byte is left in a copy (what lies past the copied size is zeroed);
without activation a copy's LV is allocated contiguous, and qemu's locks are off on the PV
(a lock on the whole PV would be a lock on the VG's other disks).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from reconciler.drivers.api import Access, ManagingDriver, MigrationFacts, QemuImage
from reconciler.drivers.flows.copy import raw_copy
from reconciler.drivers.flows.qemuimg import fd_path
from reconciler.drivers.lvm.tools import LvmError, Piece, PiecesSink, PiecesSource, zero
from reconciler.drivers.lvm.volumes import Lvs
from reconciler.model.errors import PoolError, ReconcileError
from reconciler.model.record import DiskRecord, Migration
from reconciler.schema.common import Backend, DiskFormat
from reconciler.util import faults

LAYOUTS = frozenset({"lvm/raw"})  # what a migration copies out of and into an lvm pool


def migration_facts(lvs: Lvs, volumes: Iterable[str]) -> MigrationFacts:
    """The VG's free bytes, each managed LV's size as what it occupies (an LV holds all
    its extents), and raw LVs as the one layout. A copy into the VG takes its whole
    size in extents whatever its data, which `thick_unit` tells the planner."""
    try:
        (vg,) = lvs.lvm.report("vgs", "vg_free,vg_extent_size", lvs.vg)
        sizes = {
            r["lv_name"]: int(r["lv_size"])
            for r in lvs.lvm.report("lvs", "lv_name,lv_size", lvs.vg)
        }
        free, extent = int(vg["vg_free"]), int(vg["vg_extent_size"])
    except (LvmError, ValueError, KeyError) as e:
        raise PoolError(f"{lvs.lvm.where()}: its free space is unknown ({e})") from None
    allocated = {v: sizes[v] for v in volumes if v in sizes}
    return MigrationFacts(free, allocated, LAYOUTS, thick_unit=extent)


def check_layout(lvs: Lvs, volume: str, backend: Backend, fmt: DiskFormat) -> None:
    if (backend, fmt) != (Backend.LVM, DiskFormat.RAW):
        raise ReconcileError(
            f"pool {lvs.name} holds raw lvm disks only; {volume} cannot be {backend}/{fmt}"
        )


def prepare_copy(lvs: Lvs, volume: str, backend: Backend, fmt: DiskFormat, size: int) -> None:
    """A new LV (the pool's usual flags and back-pointer tag) for a copy: what lies past
    `size` (LVM rounds up to whole extents) is zeroed, so no earlier tenant's byte is
    in it; the first `size` bytes are the copy's to write, zeros included."""
    check_layout(lvs, volume, backend, fmt)
    # Without activation qemu-img reaches an LV only as one range of its PV: the copy
    # is allocated in one (LVM refuses if the VG has no such run of free extents).
    lvs.create(volume, size, contiguous=not lvs.config.activate)
    faults.point("volume.created")
    with lvs.data.open(volume, None, write=True) as pieces:
        tail = _beyond(pieces, size)
        if tail:
            zero(tail)


@contextmanager
def qemu_image(
    lvs: Lvs,
    volume: str,
    recorded_size: Callable[[str], int | None],
    fmt: DiskFormat,
    backing: str | None,
    write: bool,
) -> Iterator[QemuImage]:
    """The LV as qemu-img's raw driver over a host_device, with `offset` and `size`: the
    recorded size of a disk (the LV may be larger, whole extents), else the whole LV.
    With activation that is /dev/VG/LV (offset 0); without it, the LV's one segment on
    its PV (the test mode). An LV of several segments has no single range qemu can
    address without device-mapper: refused (raw to raw copies do not need qemu-img)."""
    if fmt is not DiskFormat.RAW or backing is not None:
        raise ReconcileError(f"{lvs.name}/{volume}: an lvm disk is raw with no backing")
    with lvs.data.open(volume, recorded_size(volume), write=write) as pieces:
        if len(pieces) != 1:
            raise ReconcileError(
                f"{lvs.name}/{volume} lies in {len(pieces)} segments of its PVs and this "
                "host cannot activate it (no device-mapper), so qemu-img cannot address it "
                "as one device; it is not copied by qemu-img"
            )
        (p,) = pieces
        node: dict[str, Any] = {"driver": "host_device", "filename": fd_path(p.fd)}
        if not lvs.config.activate:
            # The file node is the whole PV, which every LV of the VG shares: a qemu
            # lock on it would be a lock on the VG's other disks.
            node["locking"] = "off"
        raw = {"driver": "raw", "offset": p.offset, "size": p.length, "file": node}
        yield QemuImage("raw", "json:" + json.dumps(raw, sort_keys=True), (p.fd,))


def native_copy(
    lvs: Lvs, mine: bool, source: ManagingDriver, rec: DiskRecord, to: Migration
) -> bool:
    """Raw to raw (flows.copy) from a pool whose bytes are on this host (a raw file
    without backing, or an LV of another or this pool, `mine`), then zeros to the LV's
    end; nothing is read as a format. A qcow2 or ploop source (a format to read) and an
    image over the network are qemu-img's."""
    check_layout(lvs, to.volume, to.backend, to.format)
    if not source.raw_readable(rec):
        return False
    if rec.virtual_size > to.virtual_size:
        raise ReconcileError(f"{rec.volume} is larger than its copy; not copied")
    if source.access is Access.REMOTE:
        return False
    if mine:  # both LVs in one pair of reports
        n = rec.virtual_size
        with lvs.data.open_many({rec.volume: n, to.volume: None}, write=True) as m:
            raw_copy(
                PiecesSource(m[rec.volume], f"{lvs.name}/{rec.volume}", n),
                PiecesSink(m[to.volume], f"{lvs.name}/{to.volume}"),
            )
        return True
    with source.reader(rec.volume, rec.virtual_size) as src, lvs.writer(to.volume) as dst:
        raw_copy(src, dst, room=to.virtual_size)
    return True


def _beyond(pieces: Sequence[Piece], size: int) -> list[Piece]:
    """The parts of the pieces past their first `size` bytes."""
    out: list[Piece] = []
    base = 0
    for p in pieces:
        skip = max(0, min(p.length, size - base))
        if skip < p.length:
            out.append(Piece(p.fd, p.offset + skip, p.length - skip))
        base += p.length
    return out
