"""Migrations into and out of a file pool (apply/steps/migrate.py drives them): the facts
the planner judges a migration by, the empty copy made before it is filled, how qemu-img
reaches a volume, and the copy done without qemu-img (raw file to raw file).

Invariants: a copy is always flattened (its target is made standalone, no backing); a
qcow2 read by qemu-img has as backing exactly the recorded cache entry (read-only, raw) or
explicitly none, so a backing file named in its header is never opened; every file is
opened without following links, and qemu-img gets only those descriptors. Free space and
what a volume occupies come from the host's view of the files (statvfs, lstat), never
their bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

from reconciler.drivers.api import Access, ManagingDriver, MigrationFacts, QemuImage
from reconciler.drivers.file.volumes import PoolDir
from reconciler.drivers.flows.copy import raw_copy
from reconciler.drivers.flows.qemuimg import QEMU_FORMAT, fd_path, open_volume
from reconciler.model.record import DiskRecord, Migration
from reconciler.schema.common import BACKEND_FORMATS, Backend, DiskFormat

FILE_LAYOUT_BACKENDS = (Backend.FLAT, Backend.QCOW2, Backend.PLOOP)


def migration_facts(
    vols: PoolDir, volumes: Iterable[str], seen: Mapping[str, os.stat_result] | None = None
) -> MigrationFacts:
    """The file system's free space and the blocks each managed file occupies (lstat:
    the host's view of the file, never its bytes); `seen`, lstats of some of `volumes`
    just taken."""
    root = vols.info().path
    st = os.statvfs(root)
    prefix = os.path.join(root, "")
    seen = seen or {}
    allocated: dict[str, int] = {}
    for v in volumes:
        got = seen.get(v)
        if got is not None:
            allocated[v] = got.st_blocks * 512
            continue
        with contextlib.suppress(OSError):
            allocated[v] = os.lstat(prefix + v).st_blocks * 512
    layouts = frozenset(
        f"{b.value}/{f.value}"
        for b in vols.config.backends
        if b in FILE_LAYOUT_BACKENDS
        for f in BACKEND_FORMATS[b]
    )
    return MigrationFacts(st.f_bavail * st.f_frsize, allocated, layouts)


@contextmanager
def qemu_image(
    vols: PoolDir, volume: str, fmt: DiskFormat, backing: str | None, *, write: bool
) -> Iterator[QemuImage]:
    """The volume as a `json:` filename on descriptors opened without following links;
    a qcow2's backing is the recorded cache entry (read-only, raw) or explicitly none,
    so a backing file named in the header is never opened."""
    with ExitStack() as stack:
        fd = stack.enter_context(open_volume(vols.path(volume), write=write))
        qfmt = QEMU_FORMAT[fmt]
        node: dict[str, Any] = {
            "driver": qfmt,
            "file": {"driver": "file", "filename": fd_path(fd)},
        }
        fds = [fd]
        if fmt is DiskFormat.QCOW2:
            node["backing"] = None
            if backing is not None:
                bfd = stack.enter_context(open_volume(vols.path(backing), write=False))
                fds.append(bfd)
                node["backing"] = {
                    "driver": "raw",
                    "read-only": True,
                    "file": {"driver": "file", "filename": fd_path(bfd)},
                }
        yield QemuImage(qfmt, "json:" + json.dumps(node, sort_keys=True), tuple(fds))


def native_copy(vols: PoolDir, source: ManagingDriver, rec: DiskRecord, to: Migration) -> bool:
    """raw to raw from a pool of files (flows.copy: the data extents copied in the
    kernel, a reflink where the file system shares blocks, holes left holes; three
    times qemu-img's speed on ext4). Every other pair (a format to convert, an overlay
    to flatten, an LV or an image to read) is qemu-img's, and so is a copy into a
    preallocated volume: where the file system shares blocks (XFS, btrfs) the kernel's copy
    would swap its allocated blocks for the source's shared ones, which a write then has
    to copy again, so the room preallocation promised would not be held."""
    if not (
        source.access is Access.FILE
        and source.raw_readable(rec)
        and to.format is DiskFormat.RAW
        and to.preallocation is None
    ):
        return False
    with source.reader(rec.volume) as src, vols.writer(to.volume) as dst:
        raw_copy(src, dst, room=to.virtual_size)
    return True


def finish_copy(vols: PoolDir, volume: str) -> None:
    """fsync what was written into `volume`."""
    with open_volume(vols.path(volume)) as fd:
        os.fsync(fd)
