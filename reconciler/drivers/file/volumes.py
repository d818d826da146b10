"""A file pool's directory and its libvirt pool: where a volume is, how it is made, named,
listed, opened and removed. What every other part of the file driver builds on.

Volumes are created through libvirt with their format stated in the volume XML (mode 0600,
allocation 0); a qcow2 overlay's XML names its backing with format raw. Every file is
opened with O_NOFOLLOW and must be a regular file (flows/qemuimg.py's open_volume); a
symlink or anything else where a volume is expected is refused, never followed.

Crash windows and retries:
- create: libvirtd finishes a call whose client has gone, so after a lost connection the
  volume may be our own, made or half made. Its `creating` record, written under its lock
  before the first try, claims the name: it is removed and made again (as the next run
  would after a crash). A name taken by anyone else is VolumeExists, left untouched.
- delete: the file is unlinked here (after lstat shows a regular file), then libvirt is
  told to forget it (also a volume libvirt types ploop: file/ploop.py says why that
  matters). A volume gone already is fine: a lost reply, or a refresh meanwhile.
- rename: rename(2) with `replace` (the name always holds one whole volume); without it,
  link then unlink, never taking an existing name; a crash between the two leaves both
  names on the one file, which the next try finishes. The directory is fsynced before
  the caller's record names the new volume.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from reconciler.drivers.api import VolumeExists
from reconciler.drivers.flows.copy import FileSink, FileSource
from reconciler.drivers.flows.qemuimg import NotAFile, open_volume
from reconciler.drivers.host.domains import Attachments, attachments
from reconciler.drivers.host.libvirt import Connections, is_connection_lost, is_pool_busy
from reconciler.drivers.host.locks import LockDir
from reconciler.model.errors import PoolError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.schema.config import PoolConfig
from reconciler.util import faults
from reconciler.util.logs import get_logger

log = get_logger(__name__)

FILE_POOL_TYPES = ("dir", "fs", "netfs")
# libvirt's RPC refuses to list more volumes than this in one call (REMOTE_STORAGE_VOL_LIST_MAX
# in src/remote/remote_protocol.x); beyond it the pool directory is listed directly.
LIBVIRT_VOL_LIST_MAX = 16384
STATE_DIR = ".reconciler"  # inside the pool: its locks and owner, shared by all who use it


@dataclass(frozen=True)
class PoolInfo:
    type: str
    path: str


def _same_file(a: str, b: str) -> bool:
    """Whether two names in one directory are links to the same file (neither followed)."""
    sa, sb = os.lstat(a), os.lstat(b)
    return stat.S_ISREG(sb.st_mode) and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def escape(text: str) -> str:
    """XML character data: what xml.sax.saxutils.escape does, without the urllib, http and
    ssl modules that importing xml.sax brings into every `reconcile` start."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _volume_xml(name: str, size: int, fmt: str, backing: str | None = None) -> str:
    compat = "<compat>1.1</compat>" if fmt == "qcow2" else ""
    back = ""
    if backing is not None:
        back = f"<backingStore><path>{escape(backing)}</path><format type='raw'/></backingStore>"
    return (
        f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{size}</capacity>"
        f"<allocation unit='bytes'>0</allocation><target><format type='{fmt}'/>{compat}"
        f"<permissions><mode>0600</mode></permissions></target>{back}</volume>"
    )


def unlink_freeing_later(path: str) -> None:
    """unlink(2) the regular file `path` (a missing one is fine), its blocks freed on a
    thread of this process. The name goes now; the blocks go when the last descriptor on
    the file closes, here one opened just before, closed by that thread. Freeing a file's
    blocks takes time in proportion to its extents, not its size, and waits for the
    journal: on ext4 with online discard 0.2-0.4 s for a 1 GiB file with 128 runs of 1 MiB
    (16 runs: 30 ms), which a migration's worker spent waiting before its next copy (20
    migrations of 128 MiB each: a third of the workers' time). The process waits for its
    threads before it exits, so what a run removed is freed when it ends; a crash before
    that frees it too (the kernel closes the descriptor; after a power cut ext4's orphan
    list does)."""
    try:
        # Never open what is not a regular file (a device's open can act: a tape rewinds).
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise NotAFile(f"{path} is not a regular file; refusing to delete")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotAFile(f"{path} is a symlink; refusing to delete") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"{path} is not a regular file; refusing to delete")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    except BaseException:
        os.close(fd)
        raise
    if st.st_blocks == 0:
        os.close(fd)  # nothing to free
        return
    threading.Thread(target=_close_quietly, args=(fd,), name="free", daemon=False).start()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class PoolDir:
    """One configured file pool: its libvirt pool and the directory it names."""

    def __init__(self, name: str, config: PoolConfig, conns: Connections) -> None:
        self.name = name
        self.config = config
        self.conns = conns
        self._info: PoolInfo | None = None
        self._locks: LockDir | None = None
        # The libvirt pool's handle on each connection it was looked up on (threads of a
        # parallel apply use a few, Connections.spread): one lookup per connection rather
        # than one round trip per call (the lookup also waits for the pool's lock in
        # libvirtd, which every volume made in the pool takes). id(connection) -> (the
        # connection, kept so that its id is not reused while cached; its pool handle).
        self._pools: dict[int, tuple[Any, Any]] = {}

    # -- the pool ---------------------------------------------------------------------

    def pool(self, conn: Any) -> Any:
        cached = self._pools.get(id(conn))
        if cached is not None and cached[0] is conn:
            return cached[1]
        try:
            pool = conn.storagePoolLookupByName(self.config.libvirt_pool)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise PoolError(
                    f"libvirt pool {self.config.libvirt_pool!r} is not defined at {self.config.uri}"
                ) from None
            raise
        pools = dict(self._pools)  # copied: other threads read it without a lock
        if len(pools) >= 8:  # connections re-opened after losses: forget the old ones
            pools.clear()
        pools[id(conn)] = (conn, pool)
        self._pools = pools
        return pool

    def call(self, what: str, fn: Any) -> Any:
        def once_more_if_stale(conn: Any) -> Any:
            try:
                return fn(conn)
            except libvirt.libvirtError as e:
                # A kept handle names the pool by its UUID: a pool undefined and defined
                # again under the same name (a long-running loop sees that) is looked up
                # again, once; a pool that is gone is then a PoolError saying so. The call
                # failed on the pool, so it changed nothing and may be made again.
                if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL or not self._pools:
                    raise
                self._pools = {}
                return fn(conn)

        return self.conns.call(self.config.uri, f"{what} (pool {self.name})", once_more_if_stale)

    def refresh(self) -> None:
        self.call("refresh pool", lambda conn: self.pool(conn).refresh(0))

    def info(self) -> PoolInfo:
        if self._info is None:

            def get(conn: Any) -> PoolInfo:
                pool = self.pool(conn)
                if not pool.isActive():
                    raise PoolError(f"libvirt pool {self.config.libvirt_pool!r} is not active")
                root = ET.fromstring(pool.XMLDesc(0))
                return PoolInfo(root.get("type", ""), root.findtext("target/path") or "")

            info: PoolInfo = self.call("look up pool", get)
            if info.type not in FILE_POOL_TYPES:
                raise PoolError(
                    f"libvirt pool {self.config.libvirt_pool!r} is of type {info.type!r}; "
                    f"the flat, qcow2 and ploop backends need one of {', '.join(FILE_POOL_TYPES)}"
                )
            if not os.path.isabs(info.path) or not os.path.isdir(info.path):
                raise PoolError(f"pool {self.name}: target path {info.path!r} is not a directory")
            self._info = info
        return self._info

    def path(self, volume: str) -> str:
        return os.path.join(self.info().path, volume)

    def state_dir(self) -> Path:
        return Path(self.info().path) / STATE_DIR

    def locks(self) -> LockDir:
        if self._locks is None:
            self._locks = LockDir(self.state_dir() / "locks")
        return self._locks

    # -- observing --------------------------------------------------------------------

    def list_volumes(self) -> frozenset[str]:
        def names(conn: Any) -> frozenset[str] | None:
            pool = self.pool(conn)
            if pool.numOfVolumes() > LIBVIRT_VOL_LIST_MAX:
                return None
            # A refresh makes libvirt re-read the directory, so volumes created or removed
            # behind its back are seen. libvirt refuses it while any client builds a volume
            # in the pool, which other runs on this pool do all the time: then the
            # directory is read here instead, as the refresh would have read it.
            try:
                pool.refresh(0)
            except libvirt.libvirtError as e:
                if is_pool_busy(e):
                    return None
                raise
            if pool.numOfVolumes() > LIBVIRT_VOL_LIST_MAX:
                return None
            return frozenset(v.name() for v in pool.listAllVolumes(0))

        listed: frozenset[str] | None = self.call("list volumes", names)
        if listed is None:
            # Too many for libvirt's RPC, or the pool busy: list what libvirt itself lists,
            # the directory.
            with os.scandir(self.info().path) as it:
                listed = frozenset(e.name for e in it)
        return listed - {STATE_DIR}

    def attachments(self) -> Attachments:
        info = self.info()
        att: Attachments = self.call(
            "list domains",
            lambda conn: attachments(conn, self.config.libvirt_pool, info.path),
        )
        return att

    # -- making, opening, naming and removing volumes -----------------------------------

    def create_xml(self, name: str, size: int, fmt: str, backing: str | None = None) -> None:
        xml = _volume_xml(name, size, fmt, backing)
        maybe_made = False  # a request sent before the connection dropped

        def create(conn: Any) -> None:
            nonlocal maybe_made
            pool = self.pool(conn)
            if maybe_made and os.path.lexists(self.path(name)):
                # libvirtd finishes a call whose client has gone, so the volume may be our
                # own, made or half made. Its `creating` record, written under its lock
                # before the first try, claims the name: remove it and make it again, as
                # the next run would after a crash (apply's _create, entries.begin).
                log.warning("volume.retry_after_lost_connection", pool=self.name, volume=name)
                self._delete_in(pool, name)
            try:
                pool.createXML(xml, 0)
            except libvirt.libvirtError as e:
                if is_connection_lost(e):
                    maybe_made = True
                if e.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                    raise VolumeExists(
                        f"volume {name} appeared in pool {self.name} from elsewhere; it is "
                        "not ours and is left untouched"
                    ) from None
                raise

        self.call(f"create volume {name}", create)

    @contextmanager
    def scratch(self, entry: str) -> Iterator[int]:
        """The pool's temporary file for `entry` (under the entry's lock), removed after."""
        tmp = self.path(TEMP_PREFIX + entry)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by an interrupted run (we hold the entry's lock)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            yield fd
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextmanager
    def reader(self, volume: str) -> Iterator[FileSource]:
        """The file's bytes (all of them: a raw file's size is its disk's)."""
        with open_volume(self.path(volume), write=False) as fd:
            yield FileSource(fd, f"{self.name}/{volume}")

    @contextmanager
    def writer(self, volume: str) -> Iterator[FileSink]:
        with open_volume(self.path(volume)) as fd:
            yield FileSink(fd, f"{self.name}/{volume}")

    def rename(self, old: str, new: str, *, replace: bool, refresh: bool = True) -> None:
        """rename(2) in the pool's directory: atomic, so the name always holds one whole
        volume. Without `replace`, link then unlink, which never takes an existing name.
        `refresh`: have libvirt re-read the pool's directory after (False: it sees the new
        name at the pool's next listing, list_volumes; a volume it has not seen is
        deleted without it, _delete_in)."""
        src, dst = self.path(old), self.path(new)
        if not stat.S_ISREG(os.lstat(src).st_mode):
            raise NotAFile(f"{src} is not a regular file; refusing to rename it")
        if replace:
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(dst).st_mode):
                    raise NotAFile(f"{dst} is not a regular file; refusing to replace it")
            os.rename(src, dst)
        else:
            try:
                os.link(src, dst, follow_symlinks=False)
            except FileExistsError:
                # A run killed between link and unlink (by another step's SIGKILL under
                # --jobs N, or a power cut) left both names on the one file: the rename
                # is half done, not refused. Anything else at the new name is refused.
                if not _same_file(src, dst):
                    raise VolumeExists(
                        f"volume {new} exists in pool {self.name}; {old} is not renamed over it"
                    ) from None
            os.unlink(src)
        root_fd = os.open(self.info().path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(root_fd)  # the new name is durable before the record says so
        finally:
            os.close(root_fd)
        if refresh:
            self.refresh()

    def delete(self, volume: str) -> None:
        """Remove a volume the caller has a record for; a missing one is fine."""
        path = self.path(volume)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"{path} is not a regular file (symlink or other); refusing to delete")

        def delete(conn: Any) -> None:
            # Gone already: an earlier try's request was carried out, its reply lost with
            # the connection (libvirt may list it until the pool's next refresh).
            if os.path.lexists(path):
                self._delete_in(self.pool(conn), volume)

        self.call(f"delete volume {volume}", delete)
        faults.point("volume.deleted")

    def _delete_in(self, pool: Any, volume: str) -> None:
        path = self.path(volume)
        try:
            vol = pool.storageVolLookupByName(volume)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise
            # libvirt has not seen it yet, so it has nothing to forget: the file is removed
            # here, without the refresh that a build of another run's volume in this pool
            # would refuse.
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    raise NotAFile(f"{path} is not a regular file; refusing to delete") from None
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        # The file is unlinked here, then libvirt's delete finds it gone, which it ignores
        # for a file volume, and forgets it (virStorageBackendVolDeleteLocal: "Silently
        # ignore failures where the vol has already gone away"). A file libvirt types
        # ploop (a ploop disk, or a raw one whose guest wrote the parallels magic) it
        # would remove as a directory tree, which fails on a file; with the file gone that
        # tree is missing, which virFileDeleteTree takes as removed: so no type is asked
        # first (vol.info(), a round trip that waits for the pool's lock, as each call
        # here does; tests/test_ploop.py deletes both kinds). libvirtd unlinks with the
        # pool locked (storageVolDelete), so removals in one pool wait for each other
        # while the file system frees their blocks, and every other call on the pool waits
        # behind them (20 migrations of 128 MiB each: 2.4 s -> 2.0 s). The same unlink(2)
        # as libvirt's: a process that still has the file open keeps it until it closes it.
        unlink_freeing_later(path)
        try:
            vol.delete(0)
        except libvirt.libvirtError as e:
            # A refresh of the pool meanwhile (another step's) saw the file gone and
            # forgot it already.
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise

    def sweep_temp(self) -> list[str]:
        """Remove temporary files an interrupted run left, unless their lock is held."""
        removed: list[str] = []
        root = self.info().path
        with os.scandir(root) as it:
            temps = [e.name for e in it if e.name.startswith(TEMP_PREFIX)]
        locks = self.locks()
        for name in temps:
            # A temporary file is written under its cache entry's lock.
            entry = name[len(TEMP_PREFIX) :]
            with locks.attempt(entry) as taken:
                if not taken:
                    continue  # another reconciler is writing it right now
                try:
                    os.unlink(os.path.join(root, name))
                    removed.append(name)
                except FileNotFoundError:
                    pass
        return removed
