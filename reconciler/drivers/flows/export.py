"""A disk's content written into a local file as a standalone image (`reconcile export`),
read as its record says, written once for every backend.

Invariant 1, as everywhere: the disk is read in its RECORDED format, never probed.
- raw out of a disk whose driver's reader() gives its bytes (raw_readable: a raw file
  without backing, an LV, an rbd image with its parent's data): a raw copy
  (flows.copy.raw_copy), data extents only (SEEK_DATA/SEEK_HOLE where the source is a
  file), zero chunks skipped, so the export stays sparse; no qemu-img, so nothing ever
  reads the bytes as a format. A guest-written qcow2 header on a raw disk is exported as
  the bytes it is.
- everything else: `qemu-img convert -f FMT -O raw|qcow2` from what the driver's
  qemu_image() gives (a `json:` filename over descriptors, an overlay's backing pinned to
  its recorded cache entry and format), into the file (`-n`: a raw file truncated to the
  disk's size, or a qcow2 made by `qemu-img create` at it first). A convert without `-B`
  writes every byte the disk reads, so a qcow2 export of an overlay stands alone.
A qcow2 export with a raw disk's guest-written header names that header's backing
nowhere: the source is opened as `raw`, which reads no header.
- an encrypted disk (`write_decrypted`): its key from the pool's key source (a private
  libvirt secret never gives it back), to qemu-img through a memfd; the driver's node
  with qemu's encryption layered on (flows/keyed.py's `keyed_view`), converted to a plain image.
- a snapshot (`write_image`): qemu-img convert from what the driver's snapshot_image()
  gives, in the snapshot's recorded format (Snapshots in drivers/api.py), raw or not.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import AbstractContextManager

from reconciler.drivers.api import ManagingDriver, QemuImage
from reconciler.drivers.flows.copy import FileSink, data_extents, raw_copy
from reconciler.drivers.flows.keyed import keyed_view
from reconciler.drivers.flows.qemuimg import (
    convert_argv,
    create_argv,
    fd_path,
    keyed_convert_argv,
)
from reconciler.drivers.host import keys
from reconciler.drivers.host.keys import SECRET_ID
from reconciler.drivers.host.run import run as run_command
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord
from reconciler.schema.config import ImageFormat
from reconciler.util import progress

HASH_CHUNK = 4 << 20
# A block of zeros this long is left a hole in a raw export read in chunks (an LV, an rbd
# image): flows.copy skips only whole 4 MiB chunks of zeros, too coarse for a file.
HOLE = 64 << 10
_ZEROS = bytes(HOLE)


class SparseFileSink(FileSink):
    """A new file of this host (reading as zeros) whose writes leave holes where a
    HOLE-long block of zeros would go; the kernel's copy from a file keeps its holes."""

    def write(self, data: bytes, at: int) -> None:
        view = memoryview(data)
        for i in range(0, len(view), HOLE):
            block = view[i : i + HOLE]
            if block != _ZEROS[: len(block)]:
                super().write(bytes(block), at + i)


def write_disk(d: ManagingDriver, rec: DiskRecord, fmt: ImageFormat, fd: int, doing: str) -> str:
    """Write disk `rec` of pool `d` into the empty file at `fd` as an image of `fmt`
    (`doing` names the export in messages); how it was written ("raw copy" or "qemu-img
    convert")."""
    what = f"{rec.pool}/{rec.volume}"
    if rec.encryption is not None:
        raise ReconcileError(f"{what} is encrypted: write_decrypted exports it")
    if fmt is ImageFormat.RAW and d.raw_readable(rec):
        os.ftruncate(fd, rec.virtual_size)
        with d.reader(rec.volume, rec.virtual_size) as src:
            if src.size > rec.virtual_size:
                raise ReconcileError(
                    f"{what} holds {src.size} bytes, more than its recorded size "
                    f"{rec.virtual_size}; not exported"
                )
            raw_copy(src, SparseFileSink(fd, f"export of {what}"))
        return "raw copy"
    return write_image(
        d.qemu_image(rec.volume, rec.format, rec.backing, write=False),
        rec.virtual_size,
        fmt,
        fd,
        doing,
    )


def write_image(
    source: AbstractContextManager[QemuImage], size: int, fmt: ImageFormat, fd: int, doing: str
) -> str:
    """`qemu-img convert` of what `source` opens (its format named, as its driver says)
    into the empty file at `fd` as an image of `fmt` and `size` bytes."""
    target = fd_path(fd)
    if fmt is ImageFormat.RAW:
        os.ftruncate(fd, size)
    else:
        run_command(create_argv("qcow2", target, size), fds=(fd,), what=doing)
    with source as s, progress.task(doing, size):
        # -n into the file made above (it reads as zeros: no zeros written); -S 4k keeps
        # runs of zeros unallocated; -W: the file is ours alone.
        run_command(
            convert_argv(
                s.format, fmt.value, s.filename, target, out_of_order=True, target_is_zero=True
            ),
            fds=(*s.fds, fd),
            what=doing,
        )
    return "qemu-img convert"


def write_decrypted(
    d: ManagingDriver, rec: DiskRecord, key: bytes, fmt: ImageFormat, fd: int, doing: str
) -> str:
    """Write encrypted disk `rec`'s plain content into the empty file at `fd` as an image
    of `fmt`, its key `key` given to qemu-img through a memfd (host/keys.py), never in an
    argv, a file or the output."""
    assert rec.encryption is not None
    target = fd_path(fd)
    if fmt is ImageFormat.RAW:
        os.ftruncate(fd, rec.virtual_size)
    else:
        run_command(create_argv("qcow2", target, rec.virtual_size), fds=(fd,), what=doing)
    uuid = rec.encryption.secret
    with (
        keys.held(uuid, key),
        keys.secret_object(uuid) as (secret, key_fd),
        d.qemu_image(rec.volume, rec.format, rec.backing, write=False) as s,
        progress.task(doing, rec.virtual_size),
    ):
        # Cut to the recorded size by a raw node, which qemu refuses to open when what is
        # under it is smaller: a driver whose node holds less than the whole LUKS volume
        # fails the export, never truncates it.
        view = keyed_view(s, rec.format, SECRET_ID, rec.virtual_size)
        run_command(
            keyed_convert_argv(secret, view.format, fmt.value, view.filename, target),
            fds=(*view.fds, key_fd, fd),
            what=doing,
        )
    return "qemu-img convert (decrypted)"


def digest(fd: int) -> tuple[str, int]:
    """The sha256 and size of the file at `fd`, read back from it (holes hashed as the
    zeros they read as, without reading them)."""
    size = os.fstat(fd).st_size
    h = hashlib.sha256()
    zeros = bytes(HASH_CHUNK)
    at = 0
    with progress.task("sha256 of the export", max(size, 1)) as hashing:
        for start, end in [*data_extents(fd, size), (size, size)]:
            while at < start:  # a hole
                n = min(HASH_CHUNK, start - at)
                h.update(zeros[:n] if n < HASH_CHUNK else zeros)
                at += n
                hashing.advance(n)
            while at < end:
                data = os.pread(fd, min(HASH_CHUNK, end - at), at)
                if not data:
                    raise ReconcileError("the export shrank while it was read back")
                h.update(data)
                at += len(data)
                hashing.advance(len(data))
    return h.hexdigest(), size
