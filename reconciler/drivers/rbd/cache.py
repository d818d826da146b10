"""An rbd pool's image cache, in the pool (DESIGN invariant 5): cache entries are RBD images
`_cache_image-…` and `_cache_template-…` (names as for file pools), each with a snapshot
`base` that the disks of its size are cloned from (drivers/rbd/clone.py), and one
`base-<size>` per larger disk size in use (`make_sized`: the same data, zeros past it), so
a clone needs no grow: a grow opens the clone and its parent (two librbd image contexts,
most of a disk's client CPU) and takes the clone's lock. An entry is never a clone,
so every disk has clone depth 1 by construction and nothing ever needs flattening. The
flows around an entry (its record first, its lock, the uses that retry) are
drivers/flows/entries.py's; this module says where an entry's bytes go.

Import: the image is fetched into an unnamed local file (O_TMPFILE: a crash leaves
nothing) and checked exactly as for file pools (sha256, oslo's format inspector, `qemu-img
info -f` under limits), converted to raw with `qemu-img convert -f FMT -O raw` into another
unnamed file if it is not raw, then written into the temporary image with python-rbd
(skipping zero runs, so the entry stays sparse), snapshotted and renamed to the entry's
name. python-rbd rather than qemu-img's rbd driver: the bytes written are exactly the
checked raw bytes, with no second client, conf or key on a command line. A template's file
system is made (mkfs) in an unnamed local file and written in the same way.

Order of steps and what a crash between them leaves (each found and finished or removed by
the next run): entry record `creating` -> temporary image `.reconciler-tmp-<entry>`
(written under the entry's lock; swept) -> snapshot -> renamed to the entry (a `creating`
entry with an image: removed and made again) -> record `ready`. An entry's image is never
removed while RBD reports clones of it. A sized snapshot (under the entry's lock held
shared, and its sizing lock): head grown -> snapshot -> head shrunk back to `base`'s size;
a crash leaves at most a larger head (nothing reads the head: an encrypted copy reads
`base`), made right by the next maker; the entry's removal takes its sized snapshots and
its sizing lock's object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from reconciler.drivers.flows import entries
from reconciler.drivers.flows.copy import scratch
from reconciler.drivers.flows.qemuimg import convert_argv, fd_path, mkfs_argv
from reconciler.drivers.host.run import run
from reconciler.drivers.rbd.cluster import Cluster, mods
from reconciler.drivers.rbd.images import remove_image, remove_temp
from reconciler.drivers.rbd.io import write_file
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.schema.config import ImageConfig
from reconciler.util import faults

if TYPE_CHECKING:
    from reconciler.drivers.ingest.check import Checked

SNAP = "base"  # the snapshot of a cache entry that disks are cloned from
SIZE_WAIT = 5.0  # seconds to wait for another maker of a sized snapshot before growing


def sized_snap(size: int) -> str:
    """The snapshot of an entry holding its data at `size` bytes (zeros past its own)."""
    return f"{SNAP}-{size}"


def sizing_lock(entry: str) -> str:
    """The lock under which an entry's sized snapshots are made (see make_sized)."""
    return f"{entry}@sizes"


def make_sized(c: Cluster, entry: str, size: int) -> bool:
    """Snapshot `sized_snap(size)` of ready entry `entry` (held shared by the caller),
    made unless present: the entry's head grown to `size`, snapshotted and shrunk back,
    under the entry's sizing lock so two makers never snapshot each other's size. A disk
    of that size is then a clone of it with no grow (clone.py). False if another maker
    held the lock past SIZE_WAIT: the caller grows instead."""
    from reconciler.drivers.rbd.leases import LockBusy

    snap = sized_snap(size)
    try:
        with c.locks().hold(sizing_lock(entry), wait=SIZE_WAIT):
            with c.image(entry) as img, c.op(f"making snapshot {entry}@{snap}"):
                sizes = {str(s["name"]): int(s["size"]) for s in img.list_snaps()}
                base = sizes.get(SNAP)
                if base is None or size < base:
                    raise ReconcileError(f"pool {c.name}: {entry}@{SNAP} is gone or larger")
                if snap not in sizes:
                    # The head is `base` (nothing is written after it): grown, snapshotted,
                    # and back to base's size, so the head reads as the entry again.
                    img.resize(size)
                    img.create_snap(snap)
                    img.resize(base, allow_shrink=True)
                    sizes = {str(s["name"]): int(s["size"]) for s in img.list_snaps()}
            if sizes.get(snap) != size:
                raise ReconcileError(
                    f"pool {c.name}: snapshot {entry}@{snap} holds {sizes.get(snap)} bytes, "
                    f"not {size}; it was not made by this reconciler: remove it"
                )
    except LockBusy:
        return False
    faults.point("cache.sized.created")
    return True


def remove_entry(c: Cluster, entry: str) -> None:
    """Remove what a half-made or left-over entry consists of: its temporary image
    (an import cut short) and its image with its snapshot."""
    remove_temp(c, TEMP_PREFIX + entry)
    remove_entry_image(c, entry)


def remove_entry_image(c: Cluster, entry: str) -> None:
    """Remove an entry's image with its snapshots; refused while clones exist."""
    _, rbd = mods()
    with c.op(f"removing cache entry image {entry}"):
        try:
            img = rbd.Image(c.io(), entry)
        except rbd.ImageNotFound:
            img = None  # gone, or half made: removed below
        try:
            if img is not None and list(img.list_children2()):
                raise ReconcileError(
                    f"not removing cache entry {c.name}/{entry}: RBD reports clones of it"
                )
            snaps = [str(s["name"]) for s in img.list_snaps()] if img is not None else []
            for snap in snaps:
                img.remove_snap(snap)
        finally:
            if img is not None:
                img.close()
    remove_image(c, entry, "cache entry")
    if any(s != SNAP for s in snaps):
        # Its sizing lock's object goes with it, if free (a maker holds the entry shared,
        # and the caller holds it exclusively: only a dead maker's lease can be left).
        with c.locks().attempt(sizing_lock(entry)) as h:
            if h is not None:
                h.remove = True


def _new_temp(c: Cluster, entry: str, size: int) -> str:
    """A fresh temporary image for an import into `entry` (under its lock)."""
    _, rbd = mods()
    tmp = TEMP_PREFIX + entry
    remove_temp(c, tmp)  # left by an interrupted run
    with c.op(f"creating temporary image {tmp}"):
        rbd.RBD().create(c.io(), tmp, size, old_format=False)
    faults.point("cache.temp.created")
    return tmp


def _publish(c: Cluster, tmp: str, entry: str) -> None:
    """Snapshot the filled temporary image and give it the entry's name."""
    _, rbd = mods()
    with c.image(tmp) as img, c.op(f"snapshotting {tmp}"):
        img.create_snap(SNAP)
    faults.point("cache.snapshot.created")
    with c.op(f"renaming {tmp} to {entry}"):
        try:
            rbd.RBD().rename(c.io(), tmp, entry)
        except rbd.ImageExists:
            raise c.appeared(entry) from None
    faults.point("cache.volume.filled")


def ensure_image(
    c: Cluster,
    cache: entries.Cache,
    images: Mapping[str, ImageConfig],
    entry: str,
    image_id: str,
    disk_size: int,
) -> None:
    """Fetch, check and store an image as a raw cache entry, unless a ready one exists."""

    def store(fd: int, checked: Checked) -> None:
        fmt = images[image_id].format.value
        tmp = _new_temp(c, entry, checked.virtual_size)
        if fmt == "raw":
            write_file(c, fd, tmp, checked.size)
        else:
            from reconciler.drivers.ingest.check import run_limited

            with scratch() as raw_fd:
                os.ftruncate(raw_fd, checked.virtual_size)
                run_limited(
                    convert_argv(fmt, "raw", fd_path(fd), fd_path(raw_fd)),
                    fds=(fd, raw_fd),
                    what=f"convert {image_id} to raw",
                )
                write_file(c, raw_fd, tmp, checked.virtual_size)
        faults.point("cache.temp.filled")
        _publish(c, tmp, entry)

    cache.make_image(entry, image_id, disk_size, store)


def ensure_template(
    c: Cluster, cache: entries.Cache, entry: str, kind: str, size: int, label: str | None
) -> None:
    """Make the template cache entry unless a ready one exists."""

    def fill() -> None:
        with scratch() as fd:
            os.ftruncate(fd, size)
            run(
                mkfs_argv(kind, label, fd_path(fd)),
                fds=(fd,),
                what=f"make {kind} template {entry}",
            )
            tmp = _new_temp(c, entry, size)
            write_file(c, fd, tmp, size)
            faults.point("cache.temp.filled")
        _publish(c, tmp, entry)

    cache.make_template(entry, kind, size, label, fill)
