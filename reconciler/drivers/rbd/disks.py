"""An rbd pool's images changed and removed: a disk grown, a disk or cache entry deleted, an
image renamed (a migration within the pool, a file taken in), and the temporary images an
interrupted import left swept.

Invariants: an image whose record copy names another record is neither grown nor deleted
(drivers/rbd/copies.py: a disagreement is reported, never repaired by deleting); nothing is
shrunk; a rename never takes an existing name unless told to replace it; a temporary image
is swept only while nobody holds its entry's lock.

Delete order and what a crash between the steps leaves: record `deleting` (executor) ->
image removed -> reference on its cache entry dropped (a crash before it leaves a reference
whose disk has no image, which `cache gc` prunes once the record is gone) -> record removed.
"""

from __future__ import annotations

import contextlib

from reconciler.drivers.api import VolumeExists
from reconciler.drivers.rbd.cache import remove_entry_image
from reconciler.drivers.rbd.cluster import Cluster, mods
from reconciler.drivers.rbd.copies import check_copy
from reconciler.drivers.rbd.images import parent, remove_image, remove_temp
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import CACHE_PREFIX, TEMP_PREFIX
from reconciler.model.record import DiskRecord
from reconciler.util import faults
from reconciler.util.logs import get_logger

log = get_logger(__name__)


def resize(c: Cluster, rec: DiskRecord, size: int) -> None:
    """Grow the image; never shrink it."""
    with c.image(rec.volume) as img:
        check_copy(c, img, rec.volume, "resizing")
        with c.op(f"growing {rec.volume}"):
            if img.size() > size:
                raise ReconcileError(f"{rec.volume} is larger than {size} bytes; not shrunk")
            img.resize(size)
    faults.point("volume.resized")


def delete_volume(c: Cluster, volume: str) -> None:
    """Remove an image the caller has a record for (a missing one is fine), then drop
    the reference it held on its cache entry."""
    _, rbd = mods()
    if volume.startswith(CACHE_PREFIX):
        remove_entry_image(c, volume)
        faults.point("volume.deleted")
        return
    held: str | None = None
    with c.op(f"opening image {volume}"):
        try:
            img = rbd.Image(c.io(), volume)
        except rbd.ImageNotFound:
            img = None  # gone, or what an interrupted remove left: removed below
    if img is not None:
        try:
            check_copy(c, img, volume, "deleting")
            held = parent(c, img, volume)
        finally:
            img.close()
    remove_image(c, volume, "image")
    c.removed(volume)
    faults.point("volume.deleted")
    if held is not None and held.startswith(CACHE_PREFIX):
        with contextlib.suppress(ReconcileError):  # else pruned by `cache gc`
            c.record_store().drop_reference(c.name, held, volume)


def rename(c: Cluster, old: str, new: str, *, replace: bool) -> None:
    """RBD rename (one update of the pool's image directory). It never takes an existing
    name (VolumeExists); with `replace`, an existing `new` is removed first (RBD has no
    rename over an image): a crash between the two leaves `old` holding the data under
    its name, and the caller (a `switched` migration) renames it on its next run."""
    _, rbd = mods()
    if replace and c.volume_exists(new):
        delete_volume(c, new)
    with c.op(f"renaming {old} to {new}"):
        try:
            rbd.RBD().rename(c.io(), old, new)
        except rbd.ImageExists:
            raise VolumeExists(
                f"volume {new} exists in pool {c.name}; {old} is not renamed over it"
            ) from None


def sweep_temp(c: Cluster) -> list[str]:
    """Remove temporary images an interrupted import left, unless their lock is held."""
    removed: list[str] = []
    locks = c.locks()
    for name in sorted(c.list_volumes()):
        if not name.startswith(TEMP_PREFIX):
            continue
        with locks.attempt(name[len(TEMP_PREFIX) :]) as taken:
            if taken is None:
                continue  # another reconciler is importing it right now
            try:
                remove_temp(c, name)
            except ReconcileError as e:  # the import that needs it removes it, or fails
                log.warning("temp.sweep_failed", pool=c.name, image=name, error=str(e))
                continue
            removed.append(name)
    return removed
