"""Migrations (apply/steps/migrate.py) in and out of an rbd pool: the one layout is rbd/raw.

Debian's qemu-img here has no rbd block driver (it is the qemu-block-extra package, which
is not installed; it would also take the conf and client on its command line and bound
nothing by opTimeout), so qemu-img never opens an image. Into this pool, native_copy
always does the work, with python-rbd into a plain new image (prepare_copy), zero chunks
skipped: from another rbd pool image to image, from a file pool's raw file its data
extents, from anything else (a qcow2, an overlay to flatten, an LV) the raw bytes
`qemu-img convert -f FMT -O raw` makes of it in an unnamed local file (O_TMPFILE). Out of
this pool, qemu_image() gives qemu-img a raw export of the image (its parent's data
included, so a clone's copy is flat) in an unnamed local file; migrate.py's compare reads
the copy the same way, so the verification reads both sides back from where they are.
The cost is local scratch space (TMPDIR, default /var/tmp) for the data of one image (two
while a copy out of the pool is compared), never a named file: a crash leaves nothing to
sweep. Free space is `ceph df`'s MAX AVAIL where a ceph-mgr makes it real; without one
every figure is zero, so it is unknown and the plan makes no space check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

from reconciler.drivers.api import Access, ManagingDriver, MigrationFacts, QemuImage
from reconciler.drivers.flows.copy import FileSource, raw_copy, scratch
from reconciler.drivers.flows.qemuimg import convert_argv, fd_path
from reconciler.drivers.host.run import run
from reconciler.drivers.rbd.cluster import Cluster, rados_only
from reconciler.drivers.rbd.images import create_empty
from reconciler.drivers.rbd.io import export, writer
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord, Migration
from reconciler.schema.common import Backend, DiskFormat
from reconciler.util import faults

LAYOUTS = frozenset({"rbd/raw"})  # what a migration copies out of and into an rbd pool


def migration_facts(c: Cluster) -> MigrationFacts:
    """The Ceph pool's free bytes where Ceph reports them, and rbd/raw as the one
    layout. No allocation is given per image: knowing it means opening every image
    (17 ms each) on every plan, and without it the planner counts each disk's whole
    size, which is also what a flattened copy of a clone may need."""
    return MigrationFacts(_available(c), {}, LAYOUTS)


def _available(c: Cluster) -> int | None:
    """`ceph df`'s MAX AVAIL for the pool (replication and the full ratio counted), or
    None (no space check) where Ceph has no real figure: without a ceph-mgr the
    monitors report every statistic, cluster and pool, as zero and list no pools."""
    rados = rados_only()
    try:
        ret, out, _ = c.client().cluster.mon_command(
            json.dumps({"prefix": "df", "format": "json"}), b""
        )
    except rados.Error:
        return None
    if ret != 0:
        return None
    try:
        doc = json.loads(out)
        if int(doc["stats"]["total_bytes"]) <= 0:
            return None
        for p in doc["pools"]:
            if p["name"] == c.ceph.pool:
                return int(p["stats"]["max_avail"])
    except (ValueError, KeyError, TypeError):
        return None
    return None


def _check_layout(c: Cluster, volume: str, backend: Backend, fmt: DiskFormat) -> None:
    if (backend, fmt) != (Backend.RBD, DiskFormat.RAW):
        raise ReconcileError(
            f"pool {c.name} holds raw rbd disks only; {volume} cannot be {backend}/{fmt}"
        )


def prepare_copy(c: Cluster, volume: str, backend: Backend, fmt: DiskFormat, size: int) -> None:
    """A plain image (never a clone: a copy is standalone), made as a blank disk is
    (RBD's default features), reading as zeros; its record copy follows its record."""
    _check_layout(c, volume, backend, fmt)
    create_empty(c, volume, size)
    faults.point("volume.created")


@contextmanager
def qemu_image(c: Cluster, volume: str, fmt: DiskFormat, *, write: bool) -> Iterator[QemuImage]:
    """qemu-img here has no rbd driver (it is Debian's qemu-block-extra, not installed),
    so it reads an image as a raw local export of its bytes (see io.export; a clone's
    parent data included, so a backing needs no node of its own). Nothing writes an
    rbd image through qemu-img: native_copy always copies into one."""
    if fmt is not DiskFormat.RAW:
        raise ReconcileError(f"{c.name}/{volume}: an rbd disk is raw, not {fmt.value}")
    if write:
        raise ReconcileError(
            f"{c.name}/{volume}: an rbd image is written with python-rbd "
            "(native_copy), never through qemu-img"
        )
    with export(c, volume) as fd:
        node = {"driver": "raw", "file": {"driver": "file", "filename": fd_path(fd)}}
        yield QemuImage("raw", "json:" + json.dumps(node, sort_keys=True), (fd,))


def native_copy(c: Cluster, source: ManagingDriver, rec: DiskRecord, to: Migration) -> bool:
    """Always True: the copy's bytes are written with python-rbd, zero chunks skipped
    (flows.copy). From a source whose raw bytes are the disk's (an image, a clone read
    with its parent's data so the copy is flat; a raw file without backing: its data
    extents), through its reader(); from anything else, through a raw local file
    `qemu-img convert -f FMT -O raw` makes of what the source's qemu_image() reaches
    (a qcow2 overlay is flattened so; an LV is read so, as it always was)."""
    _check_layout(c, to.volume, to.backend, to.format)
    if rec.virtual_size > to.virtual_size:
        raise ReconcileError(f"{rec.volume} is larger than its copy; not copied")
    if source.access is not Access.DEVICE and source.raw_readable(rec):
        with source.reader(rec.volume, rec.virtual_size) as src, writer(c, to.volume) as dst:
            raw_copy(src, dst, room=to.virtual_size)
        return True
    what = f"migrate {source.name}/{rec.volume} to {c.name}/{to.volume}"
    with (
        source.qemu_image(rec.volume, rec.format, rec.backing, write=False) as s,
        scratch() as raw,
    ):
        os.ftruncate(raw, to.virtual_size)
        run(
            convert_argv(s.format, "raw", s.filename, fd_path(raw), out_of_order=True),
            fds=(*s.fds, raw),
            what=what,
        )
        with writer(c, to.volume) as dst:
            raw_copy(FileSource(raw, f"{what}: its raw copy"), dst)
    return True


def finish_copy(c: Cluster, volume: str) -> None:
    """Flush the image: python-rbd's writes are acknowledged once the OSDs hold them,
    and each copy flushes as it ends; this covers any other writer's cache."""
    with c.image(volume) as img, c.op(f"flushing {volume}"):
        img.flush()
