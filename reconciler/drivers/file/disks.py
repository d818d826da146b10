"""A file pool's disks made the two ways of DESIGN (an image, a template), grown; and its
cache entries filled (the flows themselves are drivers/flows/entries.py's Cache).

Templates (swap, ext4, xfs, vfat) are made once per (kind, size, label) as a cache entry in
the same pool. A `qcow2`-backend disk is a qcow2 overlay on the entry (`-F raw`): a plain
one is a raw volume libvirt makes, into which the overlay's bytes are written, made once
a run by qemu-img for each entry and size (overlay_image says why); a `flat`
disk is a sparse copy of it in the disk's format (`qemu-img convert` with both formats
named, on descriptors opened with O_NOFOLLOW); a `ploop` one is file/ploop.py's. Blank
disks need no cache entry. Nothing is ever probed: a disk's format, size and backing come
from its record, which is written as `creating` before any of this runs.

A disk is allocated as its record's `preallocation` says (the pool's when it was made;
None: off, sparse): a raw or qcow2 volume libvirt made is made again over the same file by
`qemu-img create -o preallocation=MODE` (an overlay with extended L2 entries, the only way
qemu-img takes a preallocation with a backing file), then filled with `convert -n
--target-is-zero`, which writes no zeros and so unmaps nothing that was allocated; it grows
with `qemu-img resize --preallocation=MODE`. A ploop disk is file/ploop.py's. A mode the
format cannot be made with (common.preallocation_refusal) is refused before anything is
made (the planner refuses it first).

An encrypted disk (its record's `encryption`, flows/qemuimg.py says how qemu-img makes
one) is made again over the file libvirt made, as a preallocated one is, by `qemu-img
create` of a `luks` volume (raw) or a qcow2 with LUKS inside (an overlay of the plain
entry: the image is not secret, what the guest writes is), with the key its create step
holds (host/keys.py), then filled by `convert -n` into the encrypted image. A raw one
grows by growing its file to its recorded header + size (the payload runs to the file's
end: no key needed); an encrypted qcow2 grows only with its key from the pool's key
source (qemu-img opens it only with its key, which its private libvirt secret never gives
back; without a source the planner refuses it).

Order and crash windows of a disk made of an entry: entry held shared (so it is not
collected) -> volume made (`volume.created`) and preallocated -> filled (`volume.filled`).
A crash after the volume is made leaves a partial volume its `creating` record claims; the
next run removes it and makes it again. An image entry is fetched into the pool's temporary file
for it (under the entry's lock, swept otherwise) and renamed (raw) or converted into it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from reconciler.drivers.file import ploop
from reconciler.drivers.file.volumes import PoolDir
from reconciler.drivers.flows import entries
from reconciler.drivers.flows.qemuimg import (
    QEMU_FORMAT,
    convert_argv,
    create_argv,
    create_encrypted,
    encrypted_convert_argv,
    fd_path,
    mkfs_argv,
    open_volume,
    resize_argv,
)
from reconciler.drivers.host import keys
from reconciler.drivers.host.run import run
from reconciler.drivers.host.store import RecordStore
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.model.record import DiskRecord
from reconciler.schema.common import (
    NOT_RESIZABLE,
    Backend,
    DiskFormat,
    Preallocation,
    preallocation_refusal,
)
from reconciler.schema.config import ImageConfig
from reconciler.schema.manifest import TemplateKind, TemplateSource
from reconciler.util import faults

if TYPE_CHECKING:
    from reconciler.drivers.ingest.check import Checked


class FileDisks:
    """Disks and cache entries of one file pool."""

    def __init__(
        self,
        pool: entries.EntryPool,
        vols: PoolDir,
        images: Mapping[str, ImageConfig],
        store: Callable[[], RecordStore],
    ) -> None:
        self.vols = vols
        self.images = images
        self.cache = entries.Cache(
            pool, Backend.FLAT, store=store, remove=vols.delete, scratch=vols.scratch
        )
        # The bytes of a plain overlay, per (entry path, virtual size), made once a run.
        self._overlays: dict[tuple[str, int], Overlay] = {}
        self._overlays_lock = threading.Lock()

    def backing_for(self, spec: Mapping[str, Any]) -> str | None:
        """The cache entry a disk made to `spec` will depend on (qcow2 overlays), known
        before it is made so the record names it and the entry is never collected."""
        if spec["backend"] != Backend.QCOW2.value:
            return None
        return entries.entry_for(self.images, spec)

    # The two ways a disk is made (DESIGN: "the two interfaces that replace cache()").
    # Each is told everything in advance; its record is already written as `creating`.

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None:
        """A disk with an image's content: fetched and checked once into the pool's cache,
        then an overlay on that entry (qcow2 backend) or a copy of it (flat)."""
        _check_preallocation(rec.volume, rec.format, rec.preallocation)
        self.cache.from_image(rec, image_id, self._from_entry)

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None:
        """A blank disk, or swap or an empty filesystem made once per (kind, size, label)
        as a cache entry and overlaid or copied like an image."""
        if template.template is TemplateKind.BLANK:
            if rec.encryption is not None:
                self.vols.create_xml(rec.volume, rec.virtual_size, rec.format.value)
                faults.point("volume.created")
                self._encrypt(rec)
                return
            self.make_empty(rec.volume, rec.format, rec.virtual_size, rec.preallocation)
            return
        _check_preallocation(rec.volume, rec.format, rec.preallocation)
        self.cache.from_template(rec, template, self._from_entry)

    def make_empty(
        self, volume: str, fmt: DiskFormat, size: int, preallocation: Preallocation | None = None
    ) -> None:
        """An empty file of the format, standalone (a blank disk, a copy's target), reading
        as zeros, allocated as `preallocation` says (None: sparse)."""
        _check_preallocation(volume, fmt, preallocation)
        if fmt is DiskFormat.PLOOP:
            ploop.make(self.vols, volume, size, None, preallocation)  # its own boundaries
            return
        self.vols.create_xml(volume, size, fmt.value)
        faults.point("volume.created")
        self._preallocate(volume, fmt, size, preallocation)

    def _preallocate(
        self,
        volume: str,
        fmt: DiskFormat,
        size: int,
        preallocation: Preallocation | None,
        backing: str | None = None,
    ) -> None:
        """Make the volume libvirt just made again, over the same file, allocated as
        `preallocation` says (libvirt's volume XML can ask for no more than falloc): the
        file is empty, so nothing is lost; a crash meanwhile leaves a partial volume its
        `creating` record claims."""
        if preallocation is None:
            return
        with open_volume(self.vols.path(volume)) as fd:
            run(
                create_argv(
                    QEMU_FORMAT[fmt],
                    fd_path(fd),
                    size,
                    preallocation=preallocation,
                    backing=backing,
                ),
                fds=(fd,),
                what=f"preallocate {volume} ({preallocation.value})",
            )

    def _from_entry(self, rec: DiskRecord, entry: str, cached: DiskRecord) -> None:
        """Make disk `rec` of ready cache entry `entry` (held shared by the caller)."""
        vols = self.vols
        if not os.path.lexists(vols.path(entry)):
            raise entries.EntryGone
        fmt = rec.format.value
        mode = rec.preallocation
        if rec.backend is Backend.QCOW2:
            if rec.encryption is None and mode is None:
                self._overlay(rec, vols.path(entry))
                return
            vols.create_xml(rec.volume, rec.virtual_size, "qcow2", vols.path(entry))
            faults.point("volume.created")
            if rec.encryption is not None:
                self._encrypt(rec, vols.path(entry))
                return
            self._preallocate(rec.volume, rec.format, rec.virtual_size, mode, vols.path(entry))
            return
        if rec.format is DiskFormat.PLOOP:
            ploop.make(vols, rec.volume, rec.virtual_size, entry, mode)
            return
        vols.create_xml(rec.volume, rec.virtual_size, fmt)
        faults.point("volume.created")
        if rec.encryption is not None:
            self._encrypt(rec)
            self._fill_encrypted(rec, entry)
            return
        self._preallocate(rec.volume, rec.format, rec.virtual_size, mode)
        with (
            open_volume(vols.path(entry), write=False) as src_fd,
            open_volume(vols.path(rec.volume)) as dst_fd,
        ):
            run(
                convert_argv(
                    "raw", fmt, fd_path(src_fd), fd_path(dst_fd), target_is_zero=mode is not None
                ),
                fds=(src_fd, dst_fd),
                what=f"copy {entry} into {rec.volume}",
            )
        faults.point("volume.filled")

    def _overlay(self, rec: DiskRecord, backing: str) -> None:
        """Make disk `rec` a plain qcow2 overlay on the entry at path `backing`: libvirt
        makes the volume (a raw file of the overlay's length, no process run), then the
        overlay's bytes, made once per (entry, size) by overlay_image, are written into
        it and synced. A crash between the two leaves a partial volume its `creating`
        record claims (removed and made again next run, as after any create)."""
        blocks, length = self._overlay_image(backing, rec.virtual_size)
        self.vols.create_xml(rec.volume, length, "raw")
        faults.point("volume.created")
        with open_volume(self.vols.path(rec.volume)) as fd:
            for offset, data in blocks:
                _pwrite_all(fd, data, offset)
            os.fdatasync(fd)  # the length is libvirt's, already synced by it

    def _overlay_image(self, backing: str, size: int) -> Overlay:
        with self._overlays_lock:
            made = self._overlays.get((backing, size))
            if made is None:
                if len(self._overlays) >= OVERLAYS_KEPT:  # a long `reconcile watch`
                    self._overlays.clear()
                made = self._overlays[(backing, size)] = overlay_image(backing, size)
        return made

    def _encrypt(self, rec: DiskRecord, backing: str | None = None) -> None:
        """Make the volume libvirt just made again, over the same file, as the encrypted
        image its record says (its key held by the create step), allocated as
        `preallocation` says; a raw one must then be its recorded header + size."""
        enc = rec.encryption
        assert enc is not None
        with (
            keys.secret_object(enc.secret) as (secret, key_fd),
            open_volume(self.vols.path(rec.volume)) as fd,
        ):
            create_encrypted(rec, secret, key_fd, fd, backing=backing)
            os.fsync(fd)

    def _fill_encrypted(self, rec: DiskRecord, entry: str) -> None:
        """Write the raw entry's bytes into the encrypted image, every zero too."""
        enc = rec.encryption
        assert enc is not None
        with (
            keys.secret_object(enc.secret) as (secret, key_fd),
            open_volume(self.vols.path(entry), write=False) as src_fd,
            open_volume(self.vols.path(rec.volume)) as dst_fd,
        ):
            run(
                encrypted_convert_argv(secret, "raw", rec.format, fd_path(src_fd), fd_path(dst_fd)),
                fds=(key_fd, src_fd, dst_fd),
                what=f"copy {entry} into {rec.volume} (encrypted)",
            )
            os.fsync(dst_fd)
        faults.point("volume.filled")

    # -- cache entries (the flows are entries.Cache's) --------------------------------

    def ensure_image(self, entry: str, image_id: str, disk_size: int) -> None:
        """Fetch, check and store an image as a raw cache entry, unless a ready one exists."""
        vols = self.vols

        def store(fd: int, checked: Checked) -> None:
            fmt = self.images[image_id].format.value
            if fmt == "raw":
                os.rename(vols.path(TEMP_PREFIX + entry), vols.path(entry))  # the checked bytes
            else:
                from reconciler.drivers.ingest.check import run_limited

                vols.create_xml(entry, checked.virtual_size, "raw")
                with open_volume(vols.path(entry)) as out_fd:
                    run_limited(
                        convert_argv(fmt, "raw", fd_path(fd), fd_path(out_fd)),
                        fds=(fd, out_fd),
                        what=f"convert {image_id} to raw",
                    )
                    os.fsync(out_fd)

        self.cache.make_image(entry, image_id, disk_size, store, filled="cache.volume.filled")

    def ensure_template(self, entry: str, kind: str, size: int, label: str | None) -> None:
        """Make the template cache entry unless a ready one exists."""

        def fill() -> None:
            self.vols.create_xml(entry, size, "raw")
            faults.point("cache.volume.created")
            with open_volume(self.vols.path(entry)) as fd:
                run(
                    mkfs_argv(kind, label, fd_path(fd)),
                    fds=(fd,),
                    what=f"make {kind} template {entry}",
                )
                os.fsync(fd)
            faults.point("cache.volume.filled")

        self.cache.make_template(entry, kind, size, label, fill)

    # -- changing volumes ---------------------------------------------------------------

    def resize(self, rec: DiskRecord, size: int, key: bytes | None = None) -> None:
        """Grow a volume using the format from its record, never a probed one; the new part
        allocated as the disk was made (its record's preallocation). An encrypted qcow2
        grows only with its `key` (from the pool's key source), given to qemu-img as a
        memfd (flows/keyed.py), the image opened as a `json:` node naming it."""
        mode = rec.preallocation
        enc = rec.encryption
        if enc is not None and enc.header is None and key is not None:
            self._resize_keyed(rec, size, key)
            return
        if enc is not None and enc.header is None:
            raise ReconcileError(
                f"not resizing {rec.volume}: an encrypted {rec.format.value} disk is opened "
                "only with its key, which its private libvirt secret never gives back"
            )
        with open_volume(self.vols.path(rec.volume)) as fd:
            if enc is not None and enc.header is not None:
                # A LUKS payload runs to the file's end: the file grows, the key is not needed.
                want = enc.header + size
                if os.fstat(fd).st_size > want:
                    raise ReconcileError(f"{rec.volume} is larger than {want} bytes; not shrunk")
                if mode is None:
                    os.ftruncate(fd, want)
                else:
                    run(
                        resize_argv("raw", fd_path(fd), want, mode),
                        fds=(fd,),
                        what=f"grow {rec.volume} ({mode.value})",
                    )
                os.fsync(fd)
            elif rec.format is DiskFormat.RAW:
                if os.fstat(fd).st_size > size:
                    raise ReconcileError(f"{rec.volume} is larger than {size} bytes; not shrunk")
                if mode is None:
                    os.ftruncate(fd, size)
                else:
                    _check_preallocation(rec.volume, rec.format, mode)
                    run(
                        resize_argv("raw", fd_path(fd), size, mode),
                        fds=(fd,),
                        what=f"grow {rec.volume} ({mode.value})",
                    )
                os.fsync(fd)
            elif rec.format in NOT_RESIZABLE:
                raise ReconcileError(f"not resizing {rec.volume}: {NOT_RESIZABLE[rec.format]}")
            elif rec.format is DiskFormat.QCOW2:
                run(
                    resize_argv("qcow2", fd_path(fd), size, mode),
                    fds=(fd,),
                    what=f"grow {rec.volume}",
                )
            else:
                raise ReconcileError(f"{rec.volume}: cannot resize format {rec.format}")
        faults.point("volume.resized")

    def _resize_keyed(self, rec: DiskRecord, size: int, key: bytes) -> None:
        """Grow an encrypted qcow2 with its key: `qemu-img resize` of the image opened as
        qcow2 over the file (no backing: growing reads none), its key the memfd's."""
        mode = rec.preallocation
        with (
            open_volume(self.vols.path(rec.volume)) as fd,
            keys.key_object(key, keys.SECRET_ID) as (secret, key_fd),
        ):
            node = {
                "driver": "qcow2",
                "encrypt": {"key-secret": keys.SECRET_ID},
                "backing": None,
                "file": {"driver": "file", "filename": fd_path(fd)},
            }
            argv = resize_argv("qcow2", "json:" + json.dumps(node, sort_keys=True), size, mode)
            argv[2:2] = secret
            run(argv, fds=(key_fd, fd), what=f"grow {rec.volume} (encrypted)")
            os.fsync(fd)
        faults.point("volume.resized")


# An overlay's bytes as (offset, data) of its 4 KiB blocks that are not all zeros, and its
# length: what is not written reads as zeros, as in the file qemu-img wrote (which leaves
# its unused tables unallocated too).
Overlay = tuple[tuple[tuple[int, bytes], ...], int]
OVERLAY_BLOCK = 4096
# A fresh overlay is its header and empty tables: about 192 KiB, 1.2 MiB at 64 TiB (L1).
OVERLAY_MAX = 16 << 20
# Kept per (entry, size): about 12 KiB each; a long-running loop starts afresh past this.
OVERLAYS_KEPT = 256


def overlay_image(backing: str, size: int) -> Overlay:
    """The bytes of a fresh qcow2 overlay of `size` bytes on the raw file at `backing`, as
    libvirt's createXML of the same overlay writes them (compared in the tests): made by
    `qemu-img create -f qcow2 -F raw -b BACKING -u -o compat=1.1` into a memfd, with the
    size rounded up to a KiB as libvirt's command line gives it (`SIZEK`).

    Every plain overlay of one entry and size is these same bytes (a qcow2 header holds no
    identifier or time; the backing is named by the entry's path, the same for every disk
    of the pool), so a run makes them once and writes them into each disk's volume: one
    qemu-img run a run, not one per disk. libvirt ran qemu-img for each overlay it made,
    from its daemon (a fork of libvirtd, qemu-img's start, five fdatasyncs): about 7.5 ms
    of CPU and 11-30 ms per disk, against about 0.5 ms of CPU to make a raw volume and
    write these bytes into it (bench/images.py). Nothing is read from a disk: the bytes
    come from a file of our own, made just now, that no guest ever had."""
    fd = os.memfd_create("overlay", os.MFD_CLOEXEC)
    try:
        run(
            create_argv("qcow2", fd_path(fd), -(-size // 1024) * 1024, backing=backing),
            fds=(fd,),
            what=f"make an overlay of {os.path.basename(backing)}",
        )
        length = os.fstat(fd).st_size
        if not 0 < length <= OVERLAY_MAX:
            raise ReconcileError(f"qemu-img made an overlay of {length} bytes; not used")
        data = b"".join(_pread_all(fd, length))
    finally:
        os.close(fd)
    zero = bytes(OVERLAY_BLOCK)
    blocks = tuple(
        (offset, block)
        for offset in range(0, length, OVERLAY_BLOCK)
        if (block := data[offset : offset + OVERLAY_BLOCK]) != zero[: len(block)]
    )
    return blocks, length


def _pread_all(fd: int, length: int) -> Iterator[bytes]:
    offset = 0
    while offset < length:
        chunk = os.pread(fd, length - offset, offset)
        if not chunk:
            raise ReconcileError("qemu-img's overlay ended early")
        offset += len(chunk)
        yield chunk


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _check_preallocation(volume: str, fmt: DiskFormat, mode: Preallocation | None) -> None:
    """Refuse a preallocation `fmt` cannot be made with (the plan says so first)."""
    why = preallocation_refusal(fmt, mode)
    if why is not None:
        assert mode is not None
        raise ReconcileError(f"not making {volume} with preallocation {mode.value}: {why}")
