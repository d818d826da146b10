"""Taking a host file into a pool whose volumes are not files of the host (an LV, an RBD
image), written once: the bytes unchanged into a new volume made under a temporary name,
then renamed to the volume's, so the name only ever holds a whole copy.

Order and crash windows: temporary volume made (`volume.created`) -> filled (a sink that
is not zeroed gets zeros past the file's end) -> renamed to `volume` -> source removed
(unless kept) (`volume.imported`). A crash before the rename leaves the temporary volume,
which the pool's sweep_temp removes when its lock is free (the caller holds the volume's
lock, under which the temporary one is written); a crash after it leaves the source,
which the caller's record (taken in before the file is removed) tells the next run about.
A file pool takes a file in by link or rename on its own file system instead.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Protocol

from reconciler.drivers.api import VolumeExists, Volumes
from reconciler.drivers.flows.copy import FileSource, raw_copy
from reconciler.drivers.flows.qemuimg import NotAFile, open_volume
from reconciler.util import faults


class TakesIn(Volumes, Protocol):
    """A pool that fills a temporary volume before it takes the volume's name."""

    def temp_name(self, volume: str) -> str:
        """The temporary volume `volume` is filled under (swept by sweep_temp when its
        lock is free)."""
        ...

    def remove_temp(self, temp: str) -> None:
        """Remove a temporary volume (a missing one is fine)."""
        ...


def take_in(pool: TakesIn, path: str, volume: str, *, keep_source: bool) -> None:
    """Put regular file `path` into `pool` as `volume` through its temporary volume
    (what an interrupted run left of it removed first). Raises NotAFile for anything but
    a regular file, VolumeExists if the name is taken."""
    temp, discard = pool.temp_name(volume), pool.remove_temp
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise NotAFile(f"{path} is not a regular file; not imported")
    if pool.volume_exists(volume):
        raise VolumeExists(f"volume {volume} exists in pool {pool.name}; not replaced")
    discard(temp)  # a partial copy an interrupted run left (ours)
    with open_volume(path, write=False) as fd:
        src = FileSource(fd, path)
        pool.create_empty(temp, src.size)
        faults.point("volume.created")
        try:
            with pool.writer(temp) as dst:
                raw_copy(src, dst)
        except BaseException:
            with contextlib.suppress(Exception):
                discard(temp)
            raise
    try:
        pool.rename_volume(temp, volume, replace=False)
    except VolumeExists:
        discard(temp)
        raise
    if not keep_source:
        os.unlink(path)
    faults.point("volume.imported")
