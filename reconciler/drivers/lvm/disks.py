"""An lvm pool's disks made the two ways of DESIGN (an image, a template), grown; and its
cache entries filled (the flows themselves are drivers/flows/entries.py's Cache).

The image cache is LVs of the same VG: an image is fetched and checked into a temporary
file beside the records database, converted to raw with explicit formats, and copied into
a raw cache entry LV; templates are made by mkfs on a temporary file once per
(kind, size, label) and copied in likewise. A disk is a new LV with the entry's bytes
copied in (raw to raw, through drivers/lvm/tools.py's LvData: /dev/VG/LV in production,
the segment map in the test mode), zeros beyond them; grown with `lvextend` alone (raw).

Invariants: a new LV never shows an earlier tenant's bytes (LVM hands freed extents to the
next LV): a disk is written whole, the entry's bytes then zeros to its last extent, and a
blank one is zeroed whatever volumeClear says. Order and crash windows of a disk made of
an entry: entry held shared -> LV made (`volume.created`) -> filled (`volume.filled`); a
crash between leaves an LV its `creating` record claims, removed and made again next run.

An encrypted disk (its record's `encryption`) is qemu's `luks` over the LV: a LUKS volume
of the disk's size made in an unnamed local file beside the records database (with the
key its create step holds; flows/qemuimg.py), the entry's bytes (copied out of its LV into
another such file) converted into it, then the whole file copied into a new LV of header
+ size (zeros to its last extent, whose payload the guest sees as noise). It grows with
`lvextend` to header + size, without its key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from reconciler.drivers.flows import entries
from reconciler.drivers.flows.copy import FileSink, FileSource, raw_copy
from reconciler.drivers.flows.qemuimg import (
    convert_argv,
    create_encrypted,
    encrypted_convert_argv,
    fd_path,
    mkfs_argv,
)
from reconciler.drivers.host import keys
from reconciler.drivers.host.run import run
from reconciler.drivers.host.store import RecordStore
from reconciler.drivers.lvm.tools import LvmError, PiecesSink, PiecesSource, zero
from reconciler.drivers.lvm.volumes import Lvs, check_lv_name
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.config import ImageConfig
from reconciler.schema.manifest import TemplateKind, TemplateSource
from reconciler.util import faults

if TYPE_CHECKING:
    from reconciler.drivers.ingest.check import Checked


class LvmDisks:
    """Disks and cache entries of one lvm pool."""

    def __init__(
        self,
        pool: entries.EntryPool,
        lvs: Lvs,
        images: Mapping[str, ImageConfig],
        store: Callable[[], RecordStore],
    ) -> None:
        self.lvs = lvs
        self.name = lvs.name
        self.images = images
        self.cache = entries.Cache(
            pool, Backend.LVM, store=store, remove=lvs.delete, scratch=lvs.tmp_file
        )

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None:
        """A disk with an image's content: fetched and checked once into a cache entry LV,
        then copied into a new LV."""
        check_lv_name(rec.volume)
        make = self._from_entry if rec.encryption is None else self._encrypted_from_entry
        self.cache.from_image(rec, image_id, make)

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None:
        """A blank disk (its extents zeroed), or swap or an empty filesystem made once per
        (kind, size, label) as a cache entry and copied like an image."""
        if rec.encryption is not None:
            check_lv_name(rec.volume)
            if template.template is TemplateKind.BLANK:
                self._encrypted(rec, None, None)
            else:
                self.cache.from_template(rec, template, self._encrypted_from_entry)
            return
        if template.template is TemplateKind.BLANK:
            self.lvs.create(rec.volume, rec.virtual_size)
            faults.point("volume.created")
            with self.lvs.data.open(rec.volume, None, write=True) as pieces:
                zero(pieces)  # never a previous tenant's bytes, whatever volumeClear says
            faults.point("volume.filled")
            return
        check_lv_name(rec.volume)
        self.cache.from_template(rec, template, self._from_entry)

    def _from_entry(self, rec: DiskRecord, entry: str, cached: DiskRecord) -> None:
        """A new LV for disk `rec` holding ready cache entry `entry`'s bytes (the caller
        holds the entry shared)."""
        lvs = self.lvs
        check_lv_name(entry)
        lvs.create(rec.volume, rec.virtual_size)
        faults.point("volume.created")
        # All of the new LV (LVM rounds its size up to whole extents): the entry's bytes,
        # then zeros, so no earlier tenant's byte is left in it. Opening the entry is what
        # finds it missing (its record is ready, so it almost never is: one LVM call fewer
        # per disk than asking first).
        sizes = {entry: cached.virtual_size, rec.volume: None}
        try:
            with lvs.data.open_many(sizes, write=True) as maps:
                raw_copy(
                    PiecesSource(maps[entry], f"{self.name}/{entry}", cached.virtual_size),
                    PiecesSink(maps[rec.volume], f"{self.name}/{rec.volume}"),
                )
        except LvmError:
            if lvs.exists(entry):
                raise
            lvs.delete(rec.volume)  # made just now, from nothing yet
            raise entries.EntryGone from None
        faults.point("volume.filled")

    def _encrypted_from_entry(self, rec: DiskRecord, entry: str, cached: DiskRecord) -> None:
        check_lv_name(entry)
        self._encrypted(rec, entry, cached.virtual_size)

    def _encrypted(self, rec: DiskRecord, entry: str | None, entry_size: int | None) -> None:
        """A new LV for encrypted disk `rec`: a LUKS volume holding entry `entry`'s bytes
        (None: nothing, a blank disk), made locally and copied in whole."""
        enc = rec.encryption
        assert enc is not None and enc.header is not None
        lvs = self.lvs
        length = enc.header + rec.virtual_size
        with keys.secret_object(enc.secret) as (secret, key_fd), self._unnamed() as fd:
            create_encrypted(rec, secret, key_fd, fd)
            if entry is not None and entry_size is not None:
                with self._unnamed() as src_fd:
                    os.ftruncate(src_fd, entry_size)
                    with lvs.data.open(entry, entry_size, write=False) as pieces:
                        raw_copy(
                            PiecesSource(pieces, f"{self.name}/{entry}", entry_size),
                            FileSink(src_fd, f"a local copy of {self.name}/{entry}"),
                        )
                    run(
                        encrypted_convert_argv(
                            secret, "raw", DiskFormat.RAW, fd_path(src_fd), fd_path(fd)
                        ),
                        fds=(key_fd, src_fd, fd),
                        what=f"copy {entry} into {rec.volume} (encrypted)",
                    )
            lvs.create(rec.volume, length)
            faults.point("volume.created")
            # All of the LV: the LUKS volume, then zeros to its last extent.
            with lvs.data.open(rec.volume, None, write=True) as pieces:
                raw_copy(
                    FileSource(fd, rec.volume, length),
                    PiecesSink(pieces, f"{self.name}/{rec.volume}"),
                )
        faults.point("volume.filled")

    @contextlib.contextmanager
    def _unnamed(self) -> Iterator[int]:
        """An unnamed file (O_TMPFILE) beside the records database: a crash leaves nothing."""
        root = self.lvs.tmp_dir()
        fd = os.open(root, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            yield fd
        finally:
            os.close(fd)

    # -- cache entries (the flows are entries.Cache's) --------------------------------

    def _fill_entry(self, entry: str, src_fd: int, size: int) -> None:
        """Make the entry's LV and copy a checked raw file's bytes into it."""
        self.lvs.create(entry, size)
        faults.point("cache.volume.created")
        with self.lvs.data.open(entry, None, write=True) as pieces:
            raw_copy(FileSource(src_fd, entry, size), PiecesSink(pieces, f"{self.name}/{entry}"))
        faults.point("cache.volume.filled")

    def ensure_image(self, entry: str, image_id: str, disk_size: int) -> None:
        """Fetch, check and store an image as a raw cache entry LV, unless a ready one
        exists. The checks are those of every pool (reconciler/drivers/ingest/check.py)."""
        check_lv_name(entry)  # before its record is written

        def store(fd: int, checked: Checked) -> None:
            fmt = self.images[image_id].format.value
            size = checked.virtual_size
            if fmt == "raw":
                self._fill_entry(entry, fd, size)
                return
            from reconciler.drivers.ingest.check import run_limited

            with self.lvs.tmp_file(entry + ".raw", size) as raw_fd:
                run_limited(
                    convert_argv(fmt, "raw", fd_path(fd), fd_path(raw_fd)),
                    fds=(fd, raw_fd),
                    what=f"convert {image_id} to raw",
                )
                self._fill_entry(entry, raw_fd, size)

        self.cache.make_image(entry, image_id, disk_size, store)

    def ensure_template(self, entry: str, kind: str, size: int, label: str | None) -> None:
        """Make the template cache entry unless a ready one exists: mkfs on a temporary
        file of the template's size, copied into the entry's LV."""
        check_lv_name(entry)  # before its record is written

        def fill() -> None:
            with self.lvs.tmp_file(entry, size) as fd:
                run(
                    mkfs_argv(kind, label, fd_path(fd)),
                    fds=(fd,),
                    what=f"make {kind} template {entry}",
                )
                self._fill_entry(entry, fd, size)

        self.cache.make_template(entry, kind, size, label, fill)

    def resize(self, rec: DiskRecord, size: int) -> None:
        """Grow an LV (`lvextend`; a raw disk needs nothing else). Its format is the
        record's, never read from the LV; an LV already that large (LVM rounds sizes up
        to whole extents, or an interrupted run grew it) is left as it is."""
        if rec.format is not DiskFormat.RAW:
            raise ReconcileError(f"{rec.volume}: an lvm disk is raw, not {rec.format}")
        if rec.encryption is not None and rec.encryption.header is not None:
            size += rec.encryption.header  # the LUKS payload runs to the LV's end
        lvs = self.lvs
        if lvs.size(rec.volume) < size:
            lvs.lvm.run("lvextend", "-L", f"{size}b", f"{lvs.vg}/{rec.volume}", lv=rec.volume)
        faults.point("volume.resized")
