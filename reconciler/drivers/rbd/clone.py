"""Disks of an rbd pool made the two ways of DESIGN, as copy-on-write clones: every disk is
a clone (clone v2: `rbd_default_clone_format = 2`, no protected snapshot) of a cache
entry's snapshot `base` (drivers/rbd/cache.py), grown to its size, or a plain image
(blank). A disk's format is raw, as recorded; nothing is ever read from a disk's bytes.

Clone depth is 1 by construction: an entry is never a clone. The one source that could
break that, a catalog `rbd://` location in this cluster whose image is itself a clone, is
refused (its data would be two parents away; the operator flattens it or serves it another
way), never flattened by us. A catalog snapshot in this cluster that is not a clone is
cloned from directly: no download, no cache entry.

A cache entry's record holds its references (one omap key per disk, added before the clone
is made, dropped after the disk's image is removed), which `references()` counts
(RbdRecordStore, drivers/rbd/cluster.py). Order of a disk's steps and what a crash between
them leaves: record `creating` (executor) -> reference added (an unused reference is
pruned by `cache gc` when its disk has no record and no image) -> clone (carrying its own
record copy before anything else) -> grow -> record `ready`. The entry's lock is held
shared from the reference to the clone, so an import or a removal (both exclusive) never
runs under a clone.

An encrypted disk (its record's `encryption`) is no clone: Ceph Pacific's librbd (16.2)
cannot encrypt a clone apart from its parent (layered encryption came in a later
release), and qemu's `luks` over a clone of a plain entry would read the entry's bytes as
ciphertext. So it is a full copy of the entry's bytes into a LUKS payload: the entry
exported to an unnamed local file, a LUKS volume (flows/qemuimg.py) made in another with
the key its create step holds, the entry converted into it, then written into a new plain
image of header + size with python-rbd (`volume.created`, `volume.filled`). It holds no
reference to the entry (it depends on none once made; the entry's lock, held shared by
the caller, keeps it while it is read); a blank one holds only its LUKS header.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from typing import Any

from reconciler.drivers.flows import entries
from reconciler.drivers.flows.copy import scratch
from reconciler.drivers.flows.qemuimg import (
    create_encrypted,
    encrypted_convert_argv,
    fd_path,
)
from reconciler.drivers.host import keys
from reconciler.drivers.host.run import run
from reconciler.drivers.host.store import ConflictError
from reconciler.drivers.rbd import copies, io
from reconciler.drivers.rbd.cache import SNAP, make_sized, sized_snap
from reconciler.drivers.rbd.cluster import Cluster, mods
from reconciler.drivers.rbd.images import create_empty
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord
from reconciler.schema.common import DiskFormat
from reconciler.schema.config import ImageConfig
from reconciler.schema.manifest import TemplateSource
from reconciler.util import faults

RBD_LOCATION = re.compile(r"^rbd://([0-9a-fA-F-]{36})/([^/@]+)/([^/@]+)/([^/@]+)$")


def parse_rbd_location(location: str) -> tuple[str, str, str, str] | None:
    """(fsid, pool, image, snapshot) of an rbd:// catalog location, else None."""
    m = RBD_LOCATION.match(location)
    if m is None:
        return None
    return (m[1].lower(), m[2], m[3], m[4])


def conf_fsid(conffile: str) -> str | None:
    """The fsid a ceph.conf names in its [global] section (read without connecting)."""
    section = ""
    try:
        with open(conffile) as f:
            for line in f:
                s = line.strip()
                if s.startswith("["):
                    section = s.strip("[]").strip()
                elif section == "global" and "=" in s:
                    k, v = s.split("=", 1)
                    if k.strip().replace("_", " ") == "fsid":
                        return v.strip().lower()
    except OSError:
        return None
    return None


class Clones:
    """How one rbd pool makes its disks: of its catalog (`images`), through its image
    cache (`cache`, flows/entries.py's, held by the driver)."""

    def __init__(self, c: Cluster, images: Mapping[str, ImageConfig], cache: entries.Cache) -> None:
        self.c = c
        self.images = images
        self.cache = cache

    # -- what a disk is made from -------------------------------------------------------

    def _same_cluster(self, fsid: str) -> bool:
        known = conf_fsid(self.c.ceph.conf)
        if known is None and not self.c.offline:
            known = self.c.client().fsid
        return known == fsid

    def _direct(self, image_id: str) -> tuple[str, str, str] | None:
        """(pool, image, snapshot) of a catalog image cloned from directly, else None."""
        image = self.images.get(image_id)
        if image is None:
            return None
        loc = parse_rbd_location(image.location)
        if loc is None or not self._same_cluster(loc[0]):
            return None
        return loc[1], loc[2], loc[3]

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        if "snapshot" in spec["source"]:
            return None  # a clone of a disk's snapshot (snapshots.py): no cache entry
        image = spec["source"].get("image")
        if image in self.images and self._direct(image) is not None:
            return None  # cloned from the catalog's own snapshot: no cache entry
        return entries.entry_for(self.images, spec)

    # -- making disks -------------------------------------------------------------------

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None:
        _check_raw(rec)
        if rec.encryption is not None:
            if template.template.value == "blank":
                self._encrypted(rec, None)
            else:
                self.cache.from_template(rec, template, self._encrypted_from_entry)
            return
        if template.template.value == "blank":
            create_empty(self.c, rec.volume, rec.virtual_size)
            faults.point("volume.created")
            return
        self.cache.from_template(rec, template, self._from_entry)

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None:
        _check_raw(rec)
        direct = self._direct(image_id)
        if rec.encryption is not None:
            if direct is not None:
                raise ReconcileError(
                    f"{rec.volume}: an encrypted disk of a catalog rbd:// snapshot is not built "
                    "yet (it would be copied from the snapshot); give the catalog another "
                    "location, or leave the disk unencrypted"
                )
            self.cache.from_image(rec, image_id, self._encrypted_from_entry)
            return
        if direct is not None:
            self._clone_direct(rec, image_id, *direct)
            return
        self.cache.from_image(rec, image_id, self._from_entry)

    def _from_entry(self, rec: DiskRecord, entry: str, cached: DiskRecord) -> None:
        """Clone disk `rec` of ready cache entry `entry`, its reference added first. The
        caller holds the entry's lock shared while the reference is added and the clone
        made, so an import or a removal (both exclusive) never runs under a clone."""
        c = self.c
        records = c.record_store()
        try:
            records.add_reference(c.name, entry, rec.volume)
        except ConflictError:
            raise entries.EntryGone from None  # its record went meanwhile: made again
        faults.point("cache.reference.added")
        try:
            self._clone_entry(rec, entry, cached)
        except BaseException:
            with contextlib.suppress(ReconcileError):
                records.drop_reference(c.name, entry, rec.volume)
            raise

    def _clone_entry(self, rec: DiskRecord, entry: str, cached: DiskRecord) -> None:
        """The clone of entry@base when the disk is the entry's size; else of the entry's
        snapshot of the disk's size, which needs no grow (a grow opens the clone and its
        parent again and takes the clone's lock): made once per size, and while another
        maker holds it too long, entry@base and a grow."""
        c = self.c
        try:
            if cached.virtual_size == rec.virtual_size:
                _clone(c, c.io(), entry, SNAP, rec, grow=False)
                return
            try:
                _clone(c, c.io(), entry, sized_snap(rec.virtual_size), rec, grow=False)
            except _NoParent:
                sized = make_sized(c, entry, rec.virtual_size)
                snap = sized_snap(rec.virtual_size) if sized else SNAP
                _clone(c, c.io(), entry, snap, rec, grow=not sized)
        except _NoParent:
            raise ReconcileError(f"pool {c.name}: cache entry {entry} is gone") from None

    def _encrypted_from_entry(self, rec: DiskRecord, entry: str, cached: DiskRecord) -> None:
        """A full copy of ready cache entry `entry` (held shared by the caller) into an
        encrypted disk `rec`."""
        with io.export(self.c, entry, SNAP) as src_fd:
            self._encrypted(rec, src_fd)

    def _encrypted(self, rec: DiskRecord, src_fd: int | None) -> None:
        """Image `rec.volume`: a LUKS volume of the disk's size holding `src_fd`'s raw
        bytes (None: nothing, a blank disk), made locally, then written into the image."""
        enc = rec.encryption
        assert enc is not None and enc.header is not None
        length = enc.header + rec.virtual_size
        with keys.secret_object(enc.secret) as (secret, key_fd), scratch() as fd:
            create_encrypted(rec, secret, key_fd, fd)
            if src_fd is not None:
                run(
                    encrypted_convert_argv(
                        secret, "raw", DiskFormat.RAW, fd_path(src_fd), fd_path(fd)
                    ),
                    fds=(key_fd, src_fd, fd),
                    what=f"copy into {rec.volume} (encrypted)",
                )
            create_empty(self.c, rec.volume, length)
            copies.write_copy(self.c, rec.volume, rec.model_dump_json())
            faults.point("volume.created")
            io.write_file(self.c, fd, rec.volume, length)
        faults.point("volume.filled")

    def _clone_direct(
        self, rec: DiskRecord, image_id: str, pool: str, name: str, snap: str
    ) -> None:
        """Clone the catalog's own snapshot in this cluster: no download. Its image must
        be a raw image that is not itself a clone (depth 1), of at most the disk's size."""
        c = self.c
        image = self.images[image_id]
        where = f"rbd://{pool}/{name}@{snap}"
        if image.format.value != "raw":
            raise ReconcileError(
                f"image {image_id}: an RBD snapshot is raw data; the catalog declares "
                f"{image.format.value}"
            )
        client = c.client()
        with c.op(f"opening {where}"):
            pio = client.cluster.open_ioctx(pool)
        try:
            size, has_parent = _look_at(c, pio, image_id, where, name, snap)
            if has_parent:
                raise ReconcileError(
                    f"image {image_id}: {where} is itself a clone; a disk cloned from it would "
                    "be two parents deep, and this reconciler keeps clone depth 1 and flattens "
                    "nothing it does not own. Flatten that image, or give the catalog a copy"
                )
            if size != image.size:
                raise ReconcileError(
                    f"image {image_id}: {where} holds {size} bytes, the catalog declares "
                    f"{image.size}"
                )
            if size > rec.virtual_size:
                raise ReconcileError(
                    f"image {image_id}: {where} ({size} bytes) is larger than the disk "
                    f"({rec.virtual_size})"
                )
            try:
                _clone(c, pio, name, snap, rec, grow=True)
            except _NoParent:
                raise ReconcileError(f"image {image_id}: {where} is gone") from None
        finally:
            pio.close()


def _check_raw(rec: DiskRecord) -> None:
    if rec.format is not DiskFormat.RAW:
        raise ReconcileError(f"{rec.volume}: an rbd disk is raw, not {rec.format.value}")


def _look_at(
    c: Cluster, pio: Any, image_id: str, where: str, name: str, snap: str
) -> tuple[int, bool]:
    """The size of catalog snapshot name@snap, and whether its image is a clone."""
    _, rbd = mods()
    with c.op(f"looking at {where}"):
        try:
            src = rbd.Image(pio, name, snapshot=snap, read_only=True)
        except rbd.ImageNotFound:
            raise ReconcileError(
                f"image {image_id}: {where} does not exist in this cluster"
            ) from None
        try:
            size = src.size()
            try:
                src.get_parent_image_spec()
                has_parent = True
            except rbd.ImageNotFound:
                has_parent = False
        finally:
            src.close()
    return size, has_parent


class _NoParent(Exception):
    """The image or snapshot a clone was to be made of does not exist."""


def _clone(
    c: Cluster, parent_io: Any, parent: str, snap: str, rec: DiskRecord, *, grow: bool
) -> None:
    """Clone parent@snap (v2) as the disk and, if `grow`, grow it to the disk's size."""
    _, rbd = mods()
    with c.op(f"cloning {parent}@{snap} as {rec.volume}"):
        try:
            rbd.RBD().clone(parent_io, parent, snap, c.io(), rec.volume)
        except rbd.ImageExists:
            raise c.appeared(rec.volume) from None
        except rbd.ImageNotFound:
            raise _NoParent from None
    faults.point("volume.cloned")
    # A clone starts with its parent's metadata, so with the entry's record copy: replace
    # it by this disk's own (its intent) before anything else. Written on the header
    # (copies.py), so librbd's own metadata_set does not make the open below refresh.
    # Not grown: the snapshot's size was the disk's, as its header says.
    copies.write_copy(c, rec.volume, rec.model_dump_json(), size=None if grow else rec.virtual_size)
    if grow:
        with c.image(rec.volume) as img, c.op(f"growing {rec.volume}"):
            if img.size() < rec.virtual_size:
                img.resize(rec.virtual_size)
    faults.point("volume.created")
