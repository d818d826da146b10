"""The `ploop` backend's own parts: a ploop disk made, and a volume libvirt types ploop removed.

A `ploop` disk is one file in qemu's `parallels` format, which libvirt lists as a volume of
format ploop. libvirt 9 cannot make or remove one here: its createXML for format ploop makes
a directory and runs `ploop init` (the ploop tools are absent, and segfault without the
ploop kernel module), and its vol delete of a volume it typed ploop removes a directory tree
(`virFileDeleteTree`), which fails on a file ("Not a directory"). So the driver writes the
image itself, with `qemu-img create -f parallels` and `convert -n -f raw -O parallels` on a
temporary file it made exclusively (O_EXCL|O_NOFOLLOW, swept like any temporary file),
links it to the volume's name without replacing anything, and refreshes the pool. A file
volume is removed by unlinking it before libvirt's delete (file/volumes.py), which then
finds no tree to remove: so a ploop disk goes as any other, and so does a raw disk whose
guest wrote the parallels magic at its start (libvirt types it ploop). qemu-img cannot
resize parallels images, so a ploop disk is never grown: the planner says so as an error.

Allocation (the record's preallocation): qemu's parallels driver allocates a cluster only
when it is written. `off` copies the entry with `--target-is-zero` (the new image reads as
zeros), so runs of zeros stay unallocated; `full` writes every byte of the disk as data
(`-S 0`: the entry's bytes, then zeros to the end, as one convert of both), so every
cluster is allocated. `falloc` and `metadata` cannot be done for parallels (qemu-img
ignores or refuses them) and are refused (schema/common.py's PREALLOCATION_REFUSED).

Order and crash windows of a make: temporary file made and filled (`volume.filled`) ->
fsynced -> linked to the volume's name (`volume.created`) -> temporary name unlinked ->
pool refreshed. A crash before the link leaves only the temporary file (swept under the
volume's lock); after it, a whole image under its name, which its `creating` record claims.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from reconciler.drivers.api import VolumeExists
from reconciler.drivers.flows.qemuimg import (
    convert_argv,
    create_argv,
    fd_path,
    fill_argv,
    open_volume,
    zeros_source,
)
from reconciler.drivers.host.run import run
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.schema.common import Preallocation
from reconciler.util import faults

if TYPE_CHECKING:
    from reconciler.drivers.file.volumes import PoolDir


def make(
    vols: PoolDir,
    volume: str,
    size: int,
    entry: str | None,
    preallocation: Preallocation | None = None,
) -> None:
    """Write a parallels image of `size` bytes (holding `entry`'s raw bytes, if any)
    into a temporary file, then give it the volume's name; the caller holds the
    volume's lock, under which its temporary file is written and swept. `preallocation`
    None leaves runs of zeros unallocated; FULL allocates every cluster."""
    if preallocation not in (None, Preallocation.FULL):
        raise ReconcileError(
            f"not making ploop disk {volume} with preallocation {preallocation}: a "
            "parallels image is allocated only by writing it (off or full)"
        )
    path = vols.path(volume)
    tmp = vols.path(TEMP_PREFIX + volume)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by an interrupted run
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        run(
            create_argv("parallels", fd_path(fd), size),
            fds=(fd,),
            what=f"make ploop image {volume}",
        )
        if preallocation is Preallocation.FULL:
            _fill(vols, volume, size, entry, fd)
        elif entry is not None:
            with open_volume(vols.path(entry), write=False) as src_fd:
                run(
                    convert_argv(
                        "raw", "parallels", fd_path(src_fd), fd_path(fd), target_is_zero=True
                    ),
                    fds=(src_fd, fd),
                    what=f"copy {entry} into {volume}",
                )
        os.fsync(fd)
        faults.point("volume.filled")
        try:
            os.link(tmp, path)  # unlike rename, never replaces a volume made meanwhile
        except FileExistsError:
            raise VolumeExists(
                f"volume {volume} appeared in pool {vols.name} from elsewhere; it is "
                "not ours and is left untouched"
            ) from None
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    faults.point("volume.created")
    vols.refresh()


def _fill(vols: PoolDir, volume: str, size: int, entry: str | None, fd: int) -> None:
    """Write every byte of the new image `fd`: `entry`'s bytes, then zeros to its end."""
    with contextlib.ExitStack() as stack:
        sources: list[str] = []
        fds = [fd]
        used = 0
        if entry is not None:
            src_fd = stack.enter_context(open_volume(vols.path(entry), write=False))
            fds.append(src_fd)
            sources.append(fd_path(src_fd))
            used = -(-os.fstat(src_fd).st_size // 512) * 512  # qemu-img reads whole sectors
        if size > used:
            sources.append(zeros_source(size - used))
        run(
            fill_argv("parallels", sources, fd_path(fd)),
            fds=tuple(fds),
            what=f"write every cluster of {volume} (preallocation full)",
        )
