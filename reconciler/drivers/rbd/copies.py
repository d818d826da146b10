"""Each image's copy of its record, in its RBD metadata (`reconciler.record`), the
back-pointer from an image to its record, read by `records rebuild` and checked before an
image is deleted, resized or adopted.

The host writes it; a guest writes only the image's data. Where it names another record
than the one acting on it, delete and resize refuse and say so: a disagreement is
reported, never repaired by deleting. Who can write it: any client with the Ceph pool's
caps (a guest cannot: librbd gives it the image's data only). Those are the very clients
that can write the RADOS records, which are the truth here, so the copy is not sealed (a
MAC under a key shared by the hosts would stop no one the store itself does not); it is
checked as input like every record (schema/recordcheck.py), and rebuild restores only what
cannot make the next plan destroy something (reconciler/commands/rebuild.py).

A clone starts with its parent's metadata, so with its cache entry's copy: until the
clone's own is written (drivers/rbd/clone.py writes it first), that inherited one says
nothing about the clone and is read as no copy.

A copy is written with one RADOS call on the image's header object (cls_rbd
`metadata_set`, what librbd's own metadata_set sends), after one read of the image's id:
opening the image through librbd would build two image contexts (the clone's and its
parent's, each a copy of the whole client configuration) and take its exclusive lock, some
forty round trips and most of a disk's client CPU, for one omap key. The write is guarded
in the same op by a read of the header (`get_size`), so an image removed meanwhile fails
it instead of a header object being made again. librbd caches no metadata but `conf_`
keys, so a client with the image open (a running guest) sees nothing stale.
"""

from __future__ import annotations

import struct
from typing import Any

from reconciler.drivers.api import NoCopy, RecordCopies
from reconciler.drivers.rbd.cluster import Cluster, mods
from reconciler.drivers.rbd.images import parent
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import TEMP_PREFIX, snapshot_name
from reconciler.model.record import DiskRecord, RecordKind
from reconciler.schema.bounded import check_json
from reconciler.util.logs import get_logger

log = get_logger(__name__)

RECORD_KEY = "reconciler.record"  # RBD metadata: the image's copy of its record
# RBD metadata of a disk's image: SNAPSHOT_KEY + NAME is the copy of its snapshot NAME's
# record (drivers/rbd/snapshots.py); only a copy naming a snapshot of that very image counts.
SNAPSHOT_KEY = "reconciler.snapshot."


_NOSNAP = struct.pack("<Q", 0xFFFFFFFFFFFFFFFE)  # CEPH_NOSNAP: the image's head


def _enc(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def write_copy(c: Cluster, volume: str, record: str, *, size: int | None = None) -> None:
    """Set image `volume`'s record copy (see the module docstring: one read of its id,
    one guarded write on its header); ReconcileError if the image is gone, or if `size`
    is given and the image is not that size (read from its header first: a clone that
    is never opened)."""
    rados, _ = mods()
    io = c.io()
    with c.op(f"writing {volume}'s record"):
        _, out = io.execute(f"rbd_id.{volume}", "rbd", "get_id", b"")
        try:
            (n,) = struct.unpack_from("<I", out)
            image_id = bytes(out[4 : 4 + n]).decode("ascii")
        except (struct.error, UnicodeDecodeError):
            # A pool's objects are others' writing too: a damaged id object is an error.
            raise ReconcileError(
                f"pool {c.name}: image {volume}'s id object rbd_id.{volume} is damaged "
                f"({len(out)} bytes); check it with `rbd info`"
            ) from None
        if size is not None:
            _, out = io.execute(f"rbd_header.{image_id}", "rbd", "get_size", _NOSNAP)
            try:
                _, has = struct.unpack_from("<BQ", out)  # its order, its size
            except struct.error:
                raise ReconcileError(
                    f"pool {c.name}: image {volume}'s header answered get_size with "
                    f"{len(out)} bytes; check it with `rbd info`"
                ) from None
            if has != size:
                raise ReconcileError(
                    f"pool {c.name}: image {volume} holds {has} bytes, not its record's "
                    f"{size}: the snapshot it was cloned from was not made by this reconciler"
                )
        data = struct.pack("<I", 1) + _enc(RECORD_KEY.encode()) + _enc(record.encode())
        with rados.WriteOpCtx() as op:
            op.execute("rbd", "get_size", _NOSNAP)  # the header exists: never made again
            op.execute("rbd", "metadata_set", data)
            io.operate_write_op(op, f"rbd_header.{image_id}")


def keep_record_copy(c: Cluster, rec: DiskRecord) -> None:
    """The image's copy of its record, in its RBD metadata (the back-pointer)."""
    try:
        write_copy(c, rec.volume, rec.model_dump_json())
    except ReconcileError as e:
        log.warning("record_copy.failed", pool=c.name, volume=rec.volume, error=str(e))


def _copy_of(c: Cluster, img: Any, volume: str) -> DiskRecord | None:
    """The record copy an open image carries (None: none); a damaged one is an error."""
    try:
        raw = img.metadata_get(RECORD_KEY)
    except KeyError:
        return None
    try:
        return DiskRecord.model_validate_json(check_json(raw, what="the copy"))
    except ValueError as e:
        raise ReconcileError(
            f"pool {c.name}: image {volume}'s record copy is unreadable ({str(e).splitlines()[0]})"
        ) from None


def own_copy(c: Cluster, img: Any, volume: str) -> DiskRecord | None:
    """The image's own record copy: a clone starts with its parent's (the entry's), and
    until the clone's own is written that one says nothing about the clone."""
    with c.op(f"reading {volume}'s record copy"):
        copy = _copy_of(c, img, volume)
    inherited = (
        copy is not None
        and copy.kind in (RecordKind.CACHE, RecordKind.DISK)
        and copy.volume != volume
        and copy.volume == parent(c, img, volume)
    )
    return None if inherited else copy


def check_copy(c: Cluster, img: Any, volume: str, doing: str) -> None:
    """Refuse to act on an image whose record copy names another record."""
    copy = own_copy(c, img, volume)
    if copy is not None and (copy.pool, copy.volume) != (c.name, volume):
        raise ReconcileError(
            f"not {doing} {c.name}/{volume}: the image's record copy describes "
            f"{copy.pool}/{copy.volume} (instance {copy.instance or '-'}); record and image "
            "disagree, so it is reported and left as it is"
        )


def record_copies(c: Cluster) -> RecordCopies:
    """The copies the pool's images carry (temporary images left out), each checked: each
    image's own, and the copies of its snapshots' records."""
    names = sorted(n for n in c.list_volumes() if not n.startswith(TEMP_PREFIX))
    own = RecordCopies.read(c.name, names, lambda name: _image_copy(c, name))
    found: list[tuple[str, DiskRecord]] = []
    without: list[tuple[str, str]] = []
    for name in names:
        for snap, raw in _snapshot_copies(c, name).items():
            key = snapshot_name(name, snap)
            try:
                rec = DiskRecord.model_validate_json(check_json(raw, what="the copy"))
            except ValueError as e:
                without.append((key, f"its record copy is unreadable ({str(e).splitlines()[0]})"))
                continue
            found.append((key, rec))
    snaps = RecordCopies.checked(c.name, found, without)
    return RecordCopies(
        own.records + snaps.records, own.without + snaps.without, own.refused + snaps.refused
    )


def _snapshot_copies(c: Cluster, name: str) -> dict[str, str]:
    """The snapshot record copies image `name` carries: snapshot name -> raw JSON (a
    restore inherits its source disk's and removes them; a copy naming another image's
    snapshot is refused by the check, as any copy naming another volume is)."""
    _, rbd = mods()
    with c.op(f"reading {name}'s snapshot record copies"):
        try:
            with rbd.Image(c.io(), name, read_only=True) as img:
                return {
                    str(k)[len(SNAPSHOT_KEY) :]: str(v)
                    for k, v in img.metadata_list()
                    if str(k).startswith(SNAPSHOT_KEY)
                }
        except rbd.ImageNotFound:
            return {}


def _image_copy(c: Cluster, name: str) -> DiskRecord:
    try:
        with c.image(name, read_only=True) as img:
            copy = own_copy(c, img, name)
    except ReconcileError as e:
        raise NoCopy(str(e)) from None
    if copy is None:
        raise NoCopy("no record copy")
    return copy
