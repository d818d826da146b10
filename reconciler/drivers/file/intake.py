"""Volumes a file pool did not make, taken under management: `reconcile adopt`'s check of a
volume without a record, and `reconcile import-nova`'s taking of a Nova instance's files
(a file put in, a qcow2 overlay pointed at the pool's cache entry).

Invariants: a declared format is checked, never found (raw is its file's size; a header
that looks like another format is only reported); a qcow2 is adopted only when backed by
a ready cache entry of this pool named with backing format raw, and never with an
external data file (a backing file outside the pool's own cache is how a guest reads host
files). A file taken in never replaces an existing name.

Order and crash windows of take_file: on the pool's file system a link to the name (then
the source unlinked unless kept: a crash between leaves two names on one file, the
caller's record telling the next run); elsewhere a sparse copy into the volume's
temporary file, chmod 0600 and fsynced, linked to the name, the temporary name unlinked
(`volume.imported`). A crash before the link leaves only the temporary file, swept under
the volume's lock, which the caller holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable
from typing import Any

from reconciler.drivers.api import Inspected, VolumeExists
from reconciler.drivers.file.volumes import PoolDir
from reconciler.drivers.flows.qemuimg import (
    QEMU_FORMAT,
    NotAFile,
    fd_path,
    info_argv,
    open_volume,
    rebase_argv,
)
from reconciler.drivers.host.run import run
from reconciler.drivers.host.store import RecordStore
from reconciler.drivers.ingest.headers import file_header_format
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.model.record import RecordKind, RecordState
from reconciler.schema.common import DiskFormat
from reconciler.util import faults


def inspect_unmanaged(
    vols: PoolDir, store: Callable[[], RecordStore], volume: str, fmt: DiskFormat
) -> Inspected:
    """The declared format is checked, never found: raw is its file's size (a header
    that looks like another format is only reported); qcow2 and ploop are read by
    `qemu-img info -f FMT` under the untrusted-image limits, and a qcow2 may only be
    backed by a ready cache entry of this pool, named with backing format raw."""
    from reconciler.drivers.ingest.check import run_limited  # oslo.utils: only when adopting

    path = vols.path(volume)
    header = file_header_format(path)
    with open_volume(path, write=False) as fd:
        if fmt is DiskFormat.RAW:
            return Inspected(os.fstat(fd).st_size, None, header)
        out = run_limited(
            info_argv(QEMU_FORMAT[fmt], fd_path(fd)),
            fds=(fd,),
            what=f"qemu-img info -f {QEMU_FORMAT[fmt]} {vols.name}/{volume}",
        )
    try:
        info: dict[str, Any] = json.loads(out)
        size = int(info["virtual-size"])
    except (ValueError, KeyError, TypeError):
        raise ReconcileError(f"{vols.name}/{volume}: qemu-img info gave no virtual size") from None
    data = info.get("format-specific", {}).get("data", {})
    if isinstance(data, dict) and data.get("data-file"):
        raise ReconcileError(
            f"{vols.name}/{volume} names an external data file ({data['data-file']}); "
            "it is not adopted"
        )
    backing = info.get("backing-filename")
    if backing is None:
        return Inspected(size, None, header)
    return Inspected(size, _cache_backing(vols, store, volume, info), header)


def _cache_backing(
    vols: PoolDir, store: Callable[[], RecordStore], volume: str, info: dict[str, Any]
) -> str:
    """The cache entry of this pool a qcow2 named in `info` is backed by, or why it is
    not adopted (its backing file is not one, or is not named raw)."""
    backing = info["backing-filename"]
    root = vols.info().path
    where = os.path.normpath(os.path.join(root, str(backing)))
    entry = os.path.basename(where)
    cached = store().get(vols.name, entry)
    if (
        os.path.dirname(where) != os.path.normpath(root)
        or cached is None
        or cached.kind is not RecordKind.CACHE
        or cached.state is not RecordState.READY
    ):
        raise ReconcileError(
            f"{vols.name}/{volume} is backed by {backing}, which is not a cache entry of "
            f"pool {vols.name}; it is not adopted (a backing file outside the pool's own "
            "cache is how a guest reads host files)"
        )
    if info.get("backing-filename-format") != "raw":
        raise ReconcileError(
            f"{vols.name}/{volume}: its backing file {entry} has no backing format raw "
            f"(it says {info.get('backing-filename-format')!r}), so it would be probed; "
            "not adopted"
        )
    return entry


def take_file(vols: PoolDir, path: str, volume: str, *, keep_source: bool) -> None:
    """rename(2) (or link, keeping the source) on one file system, never over an
    existing name; elsewhere a sparse copy into a temporary file, synced, then linked
    to the name. The caller holds the volume's lock (temporary files are swept under
    it)."""
    dst = vols.path(volume)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotAFile(f"{path} is not a regular file; not imported")
    if os.path.lexists(dst):
        raise VolumeExists(f"volume {volume} exists in pool {vols.name}; not replaced")
    if st.st_dev == os.stat(vols.info().path).st_dev:
        try:
            os.link(path, dst, follow_symlinks=False)
        except FileExistsError:
            raise VolumeExists(f"volume {volume} appeared in pool {vols.name}") from None
        if not keep_source:
            os.unlink(path)
    else:
        _copy_in(vols, path, volume)
        if not keep_source:
            os.unlink(path)
    faults.point("volume.imported")
    vols.refresh()


def _copy_in(vols: PoolDir, path: str, volume: str) -> None:
    """A sparse copy of `path` from another file system, synced, linked to `volume`."""
    dst = vols.path(volume)
    tmp = vols.path(TEMP_PREFIX + volume)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    run(
        ["cp", "--sparse=always", "--no-dereference", "--", path, tmp],
        what=f"copy {path} into pool {vols.name}",
    )
    with open_volume(tmp) as fd:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise VolumeExists(f"volume {volume} appeared in pool {vols.name}") from None
    finally:
        os.unlink(tmp)


def volume_at(vols: PoolDir, path: str) -> str | None:
    """The name of this pool's volume at host path `path`, if it is in the pool's directory."""
    where = os.path.normpath(path)
    if os.path.dirname(where) != os.path.normpath(vols.info().path):
        return None
    return os.path.basename(where)


def point_overlay_at(vols: PoolDir, path: str, entry: str) -> None:
    """Rewrite the qcow2 header at `path` so its backing is cache entry `entry`, named raw
    (`qemu-img rebase -u`: the header only), then fsync it."""
    with open_volume(path) as fd:
        run(
            rebase_argv("qcow2", fd_path(fd), vols.path(entry), "raw"),
            fds=(fd,),
            what=f"point {path} at cache entry {entry}",
        )
        os.fsync(fd)
