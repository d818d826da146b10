"""Snapshots of rbd disks and disks restored from them: plain RBD image snapshots in the
user namespace, and clone v2 children of them.

Design (measured on this Ceph, Pacific 16.2; tests/test_rbd_snapshots.py pins each fact):

- A snapshot `NAME` of disk `VOLUME` is the image snapshot `VOLUME@snap-NAME`
  (`snap_name`). It is an ordinary user-namespace snapshot, which `RBD.clone` reaches by
  name, so a restore is one clone v2 of it (no protect needed) grown to the disk's size:
  no bytes are copied.
- Not RBD group snapshots. On Pacific a group snapshot's image snapshots live in the
  group namespace, which `RBD.clone`, `Image(snapshot=)` and `rename_snap` cannot reach by
  name (cloning by snapshot id came later), `Image.deep_copy` at one aborts the process
  (a librbd assertion) and `Image.copy` of a clone at a snapshot drops the parent's data.
  Nothing here opens, lists or removes a group-namespace snapshot.
- Multi-disk crash consistency comes from the caller's window, not from RBD: the driver
  takes all of one instance's disks' snapshots while the instance's filesystems are frozen
  by its guest agent, or while its domain is paused (drivers/host/pause.py: qemu's `stop`
  drains and flushes every disk's in-flight I/O before it returns), or while no domain
  runs it. A paused domain issues no write, so every disk's snapshot holds the same
  moment. Holding RBD's exclusive lock instead (`Image.lock_acquire`) is no window: a
  running writer's writes then FAIL with EROFS (measured), which a guest sees as I/O
  errors.
- Clone depth is read from `get_parent_image_spec()` of images opened read-only, by
  name, in the calling thread, each closed before the next is opened (`depth`); a restore
  whose chain would be deeper than `ceph.maxCloneDepth` is flattened before it is ready.
  A parent's snapshot may be in the trash namespace (its user snapshot was removed while
  clones still needed it): only the image name is used, never that snapshot.
- A snapshot is deleted only when Ceph lists no clone of it (`dependents`, trash clones
  included): `remove_snap` of a snapshot with clone v2 children does not fail, it moves the
  snapshot to the trash namespace, where it would hold the disk forever.

Crash windows: taking is idempotent (an existing `snap-NAME` on a disk whose snapshot
record says `creating` is this reconciler's own, made before a kill); a restore killed
after its clone leaves an image whose record copy already names it (written before it is
grown or flattened), which the disk's `creating` record covers as any half-made disk;
a delete removes image snapshots one by one, each removal of a missing one fine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from reconciler.drivers.flows.copy import FileSink, raw_copy, scratch
from reconciler.drivers.rbd import io
from reconciler.drivers.rbd.cluster import Cluster, mods
from reconciler.drivers.rbd.copies import RECORD_KEY
from reconciler.drivers.rbd.copies import SNAPSHOT_KEY as COPY_PREFIX
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import snapshot_name
from reconciler.util import faults

PREFIX = "snap-"
MAX_CHAIN = 32  # a parent chain longer than this is refused, never walked further
PARALLEL = 8  # images observed at once (`present`), each in one thread only


class SnapshotInUse(ReconcileError):
    """A snapshot that clones still depend on."""


def snap_name(name: str) -> str:
    """The RBD snapshot name of reconciler snapshot `name`."""
    return PREFIX + name


def take(c: Cluster, volumes: Sequence[str], name: str) -> dict[str, int]:
    """Snapshot `snap-NAME` of each image, in order; an existing one is kept (a retry
    after a kill). Returns each image's snapshot id. The caller holds the window that
    makes them one moment (the module docstring)."""
    _, rbd = mods()
    snap = snap_name(name)
    ids: dict[str, int] = {}
    for volume in volumes:
        with c.image(volume) as img, c.op(f"snapshotting {volume}@{snap}"):
            if not img.snap_exists(snap):
                # made meanwhile by a retry racing this one: the same moment's intent
                with contextlib.suppress(rbd.ImageExists):
                    img.create_snap(snap)
            ids[volume] = int(img.snap_get_id(snap))
        faults.point("snapshot.image.taken")
    return ids


def exists(c: Cluster, volume: str, name: str) -> bool:
    """Whether image `volume` has snapshot `snap-NAME` (a missing image has none)."""
    _, rbd = mods()
    snap = snap_name(name)
    with c.op(f"looking up {volume}@{snap}"):
        try:
            with rbd.Image(c.io(), volume, read_only=True) as img:
                return bool(img.snap_exists(snap))
        except rbd.ImageNotFound:
            return False


def present(
    c: Cluster, wanted: Mapping[str, Collection[str]]
) -> tuple[frozenset[str], dict[str, tuple[str, ...]]]:
    """Of `wanted` (image -> snapshot names): the snapshot keys (VOLUME+snap-NAME) whose
    image snapshots exist, and per key the clones Ceph lists of it (none: left out). Each
    image is opened read-only once, its user snapshots listed (a group's or the trash's
    are never named snap-NAME) and only those set to. Up to PARALLEL images at once, each
    opened, read and closed within one worker thread: no Image is shared between threads
    (a plan of a hundred snapshotted disks otherwise waits a hundred round trips)."""
    out: set[str] = set()
    users: dict[str, tuple[str, ...]] = {}
    volumes = sorted(wanted)
    with ThreadPoolExecutor(max_workers=min(PARALLEL, max(1, len(volumes)))) as pool:
        for keys, found in pool.map(lambda v: _present_in(c, v, wanted[v]), volumes):
            out.update(keys)
            users.update(found)
    return frozenset(out), users


def _present_in(
    c: Cluster, volume: str, names: Collection[str]
) -> tuple[set[str], dict[str, tuple[str, ...]]]:
    _, rbd = mods()
    out: set[str] = set()
    users: dict[str, tuple[str, ...]] = {}
    with c.op(f"listing {volume}'s snapshots"):
        try:
            with rbd.Image(c.io(), volume, read_only=True) as img:
                have = {str(s["name"]) for s in img.list_snaps()}
                for n in sorted(names):
                    if snap_name(n) not in have:
                        continue
                    key = snapshot_name(volume, n)
                    out.add(key)
                    img.set_snap(snap_name(n))
                    clones = _children(img)
                    if clones:
                        users[key] = tuple(clones)
        except rbd.ImageNotFound:
            pass
    return out, users


def _children(img: Any) -> list[str]:
    """The clones of the snapshot an open image is set to, sorted, trash clones named so."""
    out = []
    for child in list(img.list_children2()):
        where = child.get("pool_namespace") or ""
        tag = " (in the trash)" if child.get("trash") else ""
        out.append(f"{where + '/' if where else ''}{child['image']}{tag}")
    return sorted(out)


def dependents(c: Cluster, volume: str, name: str) -> list[str]:
    """The images Ceph lists as clones of `volume@snap-NAME`, sorted, trash clones
    included (a trashed clone still holds its parent); none when either is missing."""
    _, rbd = mods()
    snap = snap_name(name)
    with c.op(f"listing clones of {volume}@{snap}"):
        try:
            with rbd.Image(c.io(), volume, read_only=True) as img:
                if not img.snap_exists(snap):
                    return []
                img.set_snap(snap)
                return _children(img)
        except rbd.ImageNotFound:
            return []


def delete(c: Cluster, volume: str, name: str) -> None:
    """Remove `volume@snap-NAME`, refused while clones of it exist (named); a missing
    image or snapshot is fine."""
    _, rbd = mods()
    snap = snap_name(name)
    users = dependents(c, volume, name)
    if users:
        raise SnapshotInUse(
            f"pool {c.name}: snapshot {volume}@{snap} has clones: {', '.join(users)}; "
            "delete or flatten them first"
        )
    with c.op(f"removing snapshot {volume}@{snap}"):
        try:
            with rbd.Image(c.io(), volume) as img:
                if img.snap_exists(snap):
                    img.remove_snap(snap)
        except rbd.ImageNotFound:
            pass


def depth(c: Cluster, volume: str) -> int:
    """How many parents image `volume` has (0: not a clone), each image opened read-only
    by name, in this thread, and closed before its parent is opened. A parent in another
    pool or namespace ends the walk there (counted); a chain past MAX_CHAIN is refused."""
    _, rbd = mods()
    n = 0
    name = volume
    while True:
        spec = _parent_spec(c, rbd, name)
        if spec is None:
            return n
        n += 1
        if spec["pool_name"] != c.ceph.pool or spec["pool_namespace"] or n > MAX_CHAIN:
            if n > MAX_CHAIN:
                raise ReconcileError(
                    f"pool {c.name}: image {volume} has a clone chain over {MAX_CHAIN} deep"
                )
            return n
        name = str(spec["image_name"])


def _parent_spec(c: Cluster, rbd: Any, name: str) -> dict[str, Any] | None:
    with c.op(f"reading {name}'s parent"):
        try:
            with rbd.Image(c.io(), name, read_only=True) as img:
                try:
                    return dict(img.get_parent_image_spec())
                except rbd.ImageNotFound:
                    return None
        except rbd.ImageNotFound:
            return None


def restore(
    c: Cluster,
    volume: str,
    name: str,
    target: str,
    size: int,
    record: str,
    max_depth: int,
    *,
    at_most: int | None = None,
) -> bool:
    """Image `target`: a clone v2 of `volume@snap-NAME`, its record copy (`record`, JSON)
    set first, grown to `size`, and flattened when its chain is deeper than `max_depth`.
    `at_most`: the deepest the chain can be, known from the records (a disk made of a
    cache entry or a template is at most one deep, so its restore two), which spares the
    walk where it fits. Returns whether it was flattened."""
    _, rbd = mods()
    snap = snap_name(name)
    with c.op(f"cloning {volume}@{snap} as {target}"):
        try:
            rbd.RBD().clone(c.io(), volume, snap, c.io(), target)
        except rbd.ImageExists:
            raise c.appeared(target) from None
        except rbd.ImageNotFound:
            raise ReconcileError(
                f"pool {c.name}: snapshot {volume}@{snap} is gone; nothing was restored"
            ) from None
    faults.point("volume.cloned")
    with c.image(target) as img, c.op(f"growing {target}"):
        # A clone starts with its parent's metadata, so with the disk's record copy:
        # replace it by this disk's own before anything else.
        img.metadata_set(RECORD_KEY, record)
        _drop_inherited(c, img, target)
        if img.size() < size:
            img.resize(size)
    faults.point("volume.created")
    if (at_most is not None and at_most <= max_depth) or depth(c, target) <= max_depth:
        return False
    with c.image(target) as img, c.op(f"flattening {target}"):
        img.flatten()
    faults.point("volume.flattened")
    return True


@contextmanager
def export_at(c: Cluster, volume: str, name: str) -> Iterator[int]:
    """`volume@snap-NAME`'s bytes (its parent's data included) in an unnamed local file,
    sparse; the image opened read-only at the snapshot, in this thread."""
    _, rbd = mods()
    snap = snap_name(name)
    with scratch() as fd:
        with c.op(f"opening {volume}@{snap}"):
            try:
                img = rbd.Image(c.io(), volume, snapshot=snap, read_only=True)
            except rbd.ImageNotFound:
                raise ReconcileError(f"pool {c.name}: snapshot {volume}@{snap} is gone") from None
        try:
            src = io.ImageSource(c, img, f"{volume}@{snap}")
            os.ftruncate(fd, src.size)
            raw_copy(src, FileSink(fd, f"a local export of {c.name}/{volume}@{snap}"))
        finally:
            img.close()
        yield fd


# -- record copies ------------------------------------------------------------------------
# A snapshot's record copy lives in its disk image's metadata, under COPY_PREFIX + NAME
# (an RBD snapshot carries no metadata of its own). A clone starts with its parent's
# metadata, so a restore inherits its source disk's snapshot copies: `restore` removes
# them, and a copy is read only where it names a snapshot of the image carrying it.


def keep_copy(c: Cluster, volume: str, name: str, record: str) -> None:
    with c.image(volume) as img, c.op(f"writing {volume}'s copy of snapshot {name}'s record"):
        img.metadata_set(COPY_PREFIX + name, record)


def drop_copy(c: Cluster, volume: str, name: str) -> None:
    _, rbd = mods()
    with c.op(f"removing {volume}'s copy of snapshot {name}'s record"):
        try:
            with rbd.Image(c.io(), volume) as img, contextlib.suppress(KeyError):
                img.metadata_remove(COPY_PREFIX + name)
        except rbd.ImageNotFound:
            pass


def _drop_inherited(c: Cluster, img: Any, target: str) -> None:
    with c.op(f"clearing {target}'s inherited snapshot copies"):
        for k, _ in list(img.metadata_list()):
            if str(k).startswith(COPY_PREFIX):
                img.metadata_remove(k)
