"""A file pool's snapshots: each is a read-only file VOLUME+snap-NAME beside its disk.

A snapshot is a copy of the disk's file as it is (a qcow2 overlay's bytes, header and
all, so it stays an overlay of the same cache entry, which its record names as backing
and `cache gc` counts): a FICLONE reflink where the file system shares blocks (XFS with
reflink, btrfs: instant, and no space until either side is written), else a sparse copy
of the file's data extents (SEEK_DATA/SEEK_HOLE; flows/copy.py, in the kernel). A reflink
that fails for any other reason than "this file system cannot" (EIO, ENOSPC, ...) is an
error, never a silent full copy. The copy is fsynced and made read-only (0400) before it
takes its name. A restore is the same copy the other way, grown to the disk's size.

Order and crash windows (the caller holds the locks of the disk and of the snapshot key,
and their records are durable `creating`): a temporary file TEMP_PREFIX+TARGET made
exclusively (O_EXCL|O_NOFOLLOW) and filled (`snapshot.copied`) -> fsynced, mode set ->
renamed to TARGET (the directory fsynced: volumes.py; libvirt sees it at the pool's next
listing) -> [restore: grown]. A crash before
the rename leaves only the temporary file, removed by the next try or swept (under
TARGET's lock, which the caller holds meanwhile); after it, a whole file under its name,
which its `creating` record claims and the next try replaces.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Sequence
from contextlib import AbstractContextManager

from reconciler.drivers.api import QemuImage
from reconciler.drivers.file import migrate
from reconciler.drivers.file.disks import FileDisks
from reconciler.drivers.file.volumes import PoolDir
from reconciler.drivers.flows.copy import FileSink, FileSource, raw_copy
from reconciler.drivers.flows.qemuimg import open_volume
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import TEMP_PREFIX, volume_name
from reconciler.model.record import DiskRecord
from reconciler.util import faults
from reconciler.util.logs import get_logger

log = get_logger(__name__)

FICLONE = 0x40049409  # <linux/fs.h>: _IOW(0x94, 9, int)
# What FICLONE answers where the file system (or this pair of files) cannot share blocks:
# then the data is copied. ioctl_ficlone(2): EOPNOTSUPP (no reflink: ext4, tmpfs; XFS
# without reflink=1), EXDEV (two file systems), EINVAL (unaligned, or not supported by
# the file system), ENOTTY (no such ioctl), ENOSYS. Anything else is an error.
NOT_SUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS})
SNAPSHOT_MODE = 0o400
_ioctl = fcntl.ioctl  # tests replace it to see an error that must not fall back


def reflink(src: int, dst: int) -> bool:
    """Share `src`'s blocks with the empty file `dst` (True), or say the file system
    cannot (False); raise OSError for any other failure."""
    try:
        _ioctl(dst, FICLONE, src)
    except OSError as e:
        if e.errno in NOT_SUPPORTED:
            return False
        raise
    return True


class FileSnapshots:
    """The Snapshots capability (drivers/api.py) of one file pool."""

    def __init__(self, vols: PoolDir, disks: FileDisks) -> None:
        self.vols = vols
        self.disks = disks
        self.reflinks = 0  # copies made by reflink, for tests and logs

    def take(self, snaps: Sequence[DiskRecord], consistency: str) -> dict[str, str]:
        """Copy each disk's file to its snapshot's name, one after another (the guest is
        frozen or idle meanwhile where the plan could make it so)."""
        handles: dict[str, str] = {}
        for s in snaps:
            self.copy(volume_name(s.instance, s.disk), s.volume, SNAPSHOT_MODE, replace=True)
            handles[s.volume] = s.volume
        return handles

    def delete(self, snap: DiskRecord) -> None:
        self.vols.delete(snap.volume)

    def restore(self, snap: DiskRecord, rec: DiskRecord) -> None:
        """Copy the snapshot to rec's volume (which does not exist: the create step
        cleared the name), then grow it to rec's size as the disk's format grows."""
        self.copy(snap.volume, rec.volume, 0o600, replace=False)
        if rec.virtual_size > snap.virtual_size:
            self.disks.resize(rec, rec.virtual_size)

    def image(self, snap: DiskRecord) -> AbstractContextManager[QemuImage]:
        return migrate.qemu_image(self.vols, snap.volume, snap.format, snap.backing, write=False)

    def copy(self, src: str, dst: str, mode: int, *, replace: bool) -> None:
        """Copy volume `src` to a new file named `dst` (see the module docstring)."""
        tmp = TEMP_PREFIX + dst
        tmp_path = self.vols.path(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)  # a killed try's (the caller holds dst's lock)
        what = f"{self.vols.name}/{src}"
        with open_volume(self.vols.path(src), write=False) as sfd:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            dfd = os.open(tmp_path, flags, 0o600)
            try:
                if reflink(sfd, dfd):
                    self.reflinks += 1
                else:
                    os.ftruncate(dfd, os.fstat(sfd).st_size)
                    raw_copy(FileSource(sfd, what), FileSink(dfd, f"{self.vols.name}/{tmp}"))
                faults.point("snapshot.copied")
                os.fsync(dfd)
                os.fchmod(dfd, mode)
            except BaseException:
                os.close(dfd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp_path)
                raise
            os.close(dfd)
        try:
            # libvirt is not told: nothing asks it for a snapshot or a restored disk before
            # the pool's next listing refreshes it. A refresh per copy re-read the whole
            # directory under the pool's lock, so its cost grew with the pool (35 of a
            # restore's 245 ms with 300 volumes, cProfile), and it waited (Connections.call)
            # while another client built a volume in the pool.
            self.vols.rename(tmp, dst, replace=replace, refresh=False)
        except ReconcileError:
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            raise
