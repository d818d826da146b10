"""File pools (libvirt `dir`, `fs`, `netfs`) serving the `flat`, `qcow2` and `ploop` backends.

Volumes are created through libvirt with their format stated in the volume XML, and filled
by mkfs or `qemu-img convert` run with explicit formats on a file descriptor opened with
O_NOFOLLOW. Nothing is ever probed: a volume's format, size and backing come from its record.

Templates (swap, ext4, xfs, vfat) are made once per (kind, size, label) as a cache entry in
the same pool. A `qcow2`-backend disk is a qcow2 overlay on the entry (`-F raw`); a `flat`
disk is a sparse copy of it in the disk's format. Blank disks need no cache entry.

A `ploop` disk is one file in qemu's `parallels` format, which libvirt lists as a volume of
format ploop. libvirt 9 cannot make or remove one here: its createXML for format ploop makes
a directory and runs `ploop init` (the ploop tools are absent, and segfault without the
ploop kernel module), and its vol delete of a volume it typed ploop removes a directory tree
(`virFileDeleteTree`), which fails on a file ("Not a directory"). So the driver writes the
image itself, with `qemu-img create -f parallels` and `convert -n -f raw -O parallels` on a
temporary file it made exclusively (O_EXCL|O_NOFOLLOW, swept like any temporary file),
links it to the volume's name without replacing anything, and refreshes the pool; and it
unlinks (after lstat shows a regular file) any file volume libvirt types as ploop, which
includes a raw disk whose guest wrote the parallels magic at its start. qemu-img cannot
resize parallels images, so a ploop disk is never grown: the planner says so as an error.

Each volume's copy of its record (for `records rebuild`) is the file's extended attribute
`trusted.reconciler.record`, which only root can write; anyone who can write the file (its
guest's qemu process, a tenant) can set `user.*` attributes, so a `user.*` copy is trusted
only when sealed with the host's key (drivers/copykey.py; file systems without the
trusted namespace, such as NFS), and an apply replaces an unsealed one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from reconciler.drivers.api import (
    Access,
    Inspected,
    ManagingDriver,
    MigrationFacts,
    NoCopy,
    QemuImage,
    RecordCopies,
    VolumeExists,
)
from reconciler.drivers.flows import entries
from reconciler.drivers.flows.copy import FileSink, FileSource, raw_copy
from reconciler.drivers.flows.qemuimg import (
    QEMU_FORMAT,
    NotAFile,
    convert_argv,
    create_argv,
    fd_path,
    info_argv,
    mkfs_argv,
    open_volume,
    rebase_argv,
    resize_argv,
)
from reconciler.drivers.host import copykey, ownership
from reconciler.drivers.host.domains import Attachments, attachments
from reconciler.drivers.host.libvirt import Connections, is_connection_lost, is_pool_busy
from reconciler.drivers.host.locks import LockDir
from reconciler.drivers.host.run import run
from reconciler.drivers.host.store import RecordStore, SqliteRecordStore
from reconciler.drivers.ingest.headers import file_header_format
from reconciler.model.errors import PoolError, ReconcileError
from reconciler.model.naming import TEMP_PREFIX
from reconciler.model.observed import ObservedPool
from reconciler.model.record import DiskRecord, Migration, RecordKind, RecordState
from reconciler.schema.bounded import check_json
from reconciler.schema.common import BACKEND_FORMATS, NOT_RESIZABLE, Backend, DiskFormat
from reconciler.schema.config import ImageConfig, PoolConfig
from reconciler.schema.manifest import TemplateKind, TemplateSource
from reconciler.util import faults
from reconciler.util.logs import get_logger

if TYPE_CHECKING:
    from reconciler.drivers.ingest.check import Checked

log = get_logger(__name__)

FILE_POOL_TYPES = ("dir", "fs", "netfs")
# libvirt's RPC refuses to list more volumes than this in one call (REMOTE_STORAGE_VOL_LIST_MAX
# in src/remote/remote_protocol.x); beyond it the pool directory is listed directly.
LIBVIRT_VOL_LIST_MAX = 16384
STATE_DIR = ".reconciler"  # inside the pool: its locks and owner, shared by all who use it
# Each volume's copy of its record, kept by the host beside the volume for `records
# rebuild`: in the trusted namespace, which only root can read or write; where a file
# system has none (NFS), in the user namespace sealed with the host's key (copykey.py).
# A user.* copy that is not sealed with it can have been set by anyone who can write the
# file (a qemu process, a tenant), so it is never trusted.
TRUSTED_XATTR = "trusted.reconciler.record"
RECORD_XATTR = "user.reconciler.record"


FILE_LAYOUT_BACKENDS = (Backend.FLAT, Backend.QCOW2, Backend.PLOOP)


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


class FilePoolDriver:
    access = Access.FILE

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        conns: Connections,
        store: RecordStore | None = None,
        images: Mapping[str, ImageConfig] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.conns = conns
        self.store = store
        self.images = dict(images or {})
        self._info: PoolInfo | None = None
        self._locks: LockDir | None = None
        self.cache = entries.Cache(
            self,
            Backend.FLAT,
            store=self._store,
            remove=self.delete_volume,
            scratch=self._image_scratch,
        )

    # -- the pool ---------------------------------------------------------------------

    def _pool(self, conn: Any) -> Any:
        try:
            return conn.storagePoolLookupByName(self.config.libvirt_pool)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise PoolError(
                    f"libvirt pool {self.config.libvirt_pool!r} is not defined at {self.config.uri}"
                ) from None
            raise

    def _call(self, what: str, fn: Any) -> Any:
        return self.conns.call(self.config.uri, f"{what} (pool {self.name})", fn)

    def info(self) -> PoolInfo:
        if self._info is None:

            def get(conn: Any) -> PoolInfo:
                pool = self._pool(conn)
                if not pool.isActive():
                    raise PoolError(f"libvirt pool {self.config.libvirt_pool!r} is not active")
                root = ET.fromstring(pool.XMLDesc(0))
                return PoolInfo(root.get("type", ""), root.findtext("target/path") or "")

            info: PoolInfo = self._call("look up pool", get)
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

    def locks(self) -> LockDir:
        if self._locks is None:
            self._locks = LockDir(Path(self.info().path) / STATE_DIR / "locks")
        return self._locks

    @contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        with self.locks().hold(name, shared=shared):
            yield

    # -- observing --------------------------------------------------------------------

    def list_volumes(self) -> frozenset[str]:
        def names(conn: Any) -> frozenset[str] | None:
            pool = self._pool(conn)
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

        listed: frozenset[str] | None = self._call("list volumes", names)
        if listed is None:
            # Too many for libvirt's RPC, or the pool busy: list what libvirt itself lists,
            # the directory.
            with os.scandir(self.info().path) as it:
                listed = frozenset(e.name for e in it)
        return listed - {STATE_DIR}

    def attachments(self) -> Attachments:
        info = self.info()
        att: Attachments = self._call(
            "list domains",
            lambda conn: attachments(conn, self.config.libvirt_pool, info.path),
        )
        return att

    def record_store(self) -> RecordStore | None:
        return None  # file pools keep their records in the host's database

    def as_managing(self) -> FilePoolDriver:
        return self

    def close(self) -> None:
        pass  # a file pool holds nothing open

    def state_dir(self) -> Path:
        return Path(self.info().path) / STATE_DIR

    def check_owner(self) -> None:
        """Raise ManagedElsewhere if another record store manages the pool."""
        ownership.check(self.state_dir(), self.name, self._store().identity())

    def claim(self) -> None:
        """Make this driver's record store the pool's manager, before the first change in
        it; raises ManagedElsewhere if another store manages the pool."""
        ownership.claim(self.state_dir(), self.name, self._store().identity())

    def observe(self) -> ObservedPool:
        """The pool's volumes by name and which domains use them; never raises."""
        try:
            if self.store is not None:
                self.check_owner()
            volumes = self.list_volumes()
            att = self.attachments()
        except ownership.ManagedElsewhere as e:
            return ObservedPool(self.name, None, str(e), managed_elsewhere=True)
        except PoolError as e:
            return ObservedPool(self.name, None, str(e))
        except OSError as e:
            return ObservedPool(self.name, None, f"cannot list {e.filename}: {e.strerror}")
        return ObservedPool(
            self.name, volumes, None, {}, att.defined, att.running, att.known, att.why_unknown
        )

    def check_headers(self, pool: ObservedPool, records: Sequence[DiskRecord]) -> ObservedPool:
        """Note managed volumes whose first bytes announce another format than recorded."""
        if pool.volumes is None:
            return pool
        root = self.info().path
        headers: dict[str, str] = {}
        for rec in records:
            if rec.volume in pool.volumes:
                fmt = file_header_format(os.path.join(root, rec.volume))
                if fmt != rec.format.value:
                    headers[rec.volume] = fmt
        return dataclasses.replace(pool, header_formats=headers)

    def volume_exists(self, volume: str) -> bool:
        return os.path.lexists(self.path(volume))

    # -- copies of records, beside the volumes ------------------------------------------

    def keep_record_copy(self, rec: DiskRecord) -> None:
        """Write the volume's copy of its record: `trusted.*`, else a sealed `user.*`.

        The store stays the truth; a copy that cannot be written only costs `records
        rebuild` that volume, so it is logged, not fatal. Writing the trusted copy removes
        a `user.*` one (an old unsealed copy, or anyone's forgery).
        """
        data = rec.model_dump_json().encode()
        try:
            with open_volume(self.path(rec.volume), write=False) as fd:
                try:
                    os.setxattr(fd, TRUSTED_XATTR, data)
                except OSError as e:
                    if not copykey.no_trusted_namespace(e):
                        raise
                    self._keep_sealed(fd, rec, data)
                    return
                with contextlib.suppress(OSError):  # ENODATA: there is none
                    os.removexattr(fd, RECORD_XATTR)
        except (OSError, ReconcileError) as e:
            log.warning("record_copy.failed", pool=self.name, volume=rec.volume, error=str(e))

    def _keep_sealed(self, fd: int, rec: DiskRecord, data: bytes) -> None:
        key_dir = self._key_dir()
        key = None if key_dir is None else copykey.load(key_dir, create=True)
        if key is None:
            with contextlib.suppress(OSError):
                os.removexattr(fd, RECORD_XATTR)
            log.warning(
                "record_copy.none",
                pool=self.name,
                volume=rec.volume,
                error="no trusted.* namespace here and no key to seal a user.* copy",
            )
            return
        os.setxattr(fd, RECORD_XATTR, copykey.seal(key, data))

    def _key_dir(self) -> Path | None:
        """Where the key sealing user.* copies lives: beside the host's database."""
        return self.store.path.parent if isinstance(self.store, SqliteRecordStore) else None

    def _trusted_copy(self, path: str) -> tuple[bytes | None, str]:
        """The trusted copy a file carries (bytes), or None and why there is none."""
        try:
            return os.getxattr(path, TRUSTED_XATTR, follow_symlinks=False), ""
        except OSError as e:
            if e.errno != errno.ENODATA and not copykey.no_trusted_namespace(e):
                raise
        try:
            raw = os.getxattr(path, RECORD_XATTR, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                return None, "no record copy"
            raise
        try:
            key_dir = self._key_dir()
            key = None if key_dir is None else copykey.load(key_dir, create=False)
        except copykey.CopyKeyError as e:
            return None, f"its copy in {RECORD_XATTR} cannot be checked: {e}"
        data = copykey.unseal(key, raw)
        if data is None:
            why = "no key to check it" if key is None else "not sealed with this host's key"
            return None, (
                f"its copy in {RECORD_XATTR} is not trusted ({why}; anyone who can write "
                "the file can set that attribute)"
            )
        return data, ""

    def record_copies(self) -> RecordCopies:
        """The trusted records the pool's volumes carry, and why the others carry none
        (read from the files' attributes only: never from a volume's bytes)."""
        names = sorted(n for n in self.list_volumes() if not n.startswith(TEMP_PREFIX))
        return RecordCopies.read(self.name, names, self._copy_of)

    def _copy_of(self, name: str) -> DiskRecord | None:
        path = os.path.join(self.info().path, name)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise NoCopy("not a regular file")
            raw, why = self._trusted_copy(path)
        except FileNotFoundError:
            return None  # removed while we looked
        except OSError as e:
            raise NoCopy(e.strerror or str(e)) from None
        if raw is None:
            raise NoCopy(why)
        try:
            return DiskRecord.model_validate_json(check_json(raw, what="the copy"))
        except ValueError as e:
            raise NoCopy(f"its record copy is unreadable ({str(e).splitlines()[0]})") from None

    def renew_record_copies(self, records: Sequence[DiskRecord]) -> int:
        """Write the trusted copy of each record whose volume lacks it (an older
        reconciler's unsealed user.* copy, or one set by someone else); how many. Only in
        a pool this driver's store manages (PoolError otherwise): another's copies are its."""
        self.check_owner()
        root = self.info().path
        renewed = 0
        for rec in records:
            path = os.path.join(root, rec.volume)
            if self._copy_is_current(path, rec):
                continue
            # Under the volume's lock and from the store again: a step under way (the
            # loop's workers) writes its own copy, never overwritten by an older one.
            try:
                with self.lock(rec.volume):
                    fresh = self._store().get(self.name, rec.volume)
                    if fresh is not None and not self._copy_is_current(path, fresh):
                        self.keep_record_copy(fresh)
                        renewed += 1
            except (OSError, ReconcileError) as e:  # left for the next run: never fatal
                log.warning("record_copy.failed", pool=self.name, volume=rec.volume, error=str(e))
        return renewed

    def _copy_is_current(self, path: str, rec: DiskRecord) -> bool:
        """Whether the file carries `rec`'s trusted copy and nothing untrusted beside it
        (True also for a volume that cannot be read: the plan reports it)."""
        try:
            raw, _ = self._trusted_copy(path)
            has_user = RECORD_XATTR in os.listxattr(path, follow_symlinks=False)
        except OSError:
            return True
        if raw != rec.model_dump_json().encode():
            return False
        return not (has_user and self._trusted_namespace(path))

    def _trusted_namespace(self, path: str) -> bool:
        try:
            os.getxattr(path, TRUSTED_XATTR, follow_symlinks=False)
        except OSError as e:
            return not copykey.no_trusted_namespace(e)
        return True

    def owner(self) -> ownership.Owner | None:
        return ownership.read_owner(self.state_dir(), self.name)

    def take_over(self) -> None:
        """Make this driver's store the pool's manager, whoever managed it (rebuild)."""
        ownership.take_over(self.state_dir(), self._store().identity())

    # -- making volumes ---------------------------------------------------------------

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        return entries.entry_for(self.images, spec)

    def backing_for(self, spec: Mapping[str, Any]) -> str | None:
        """The cache entry a disk made to `spec` will depend on (qcow2 overlays), known
        before it is made so the record names it and the entry is never collected."""
        if spec["backend"] != Backend.QCOW2.value:
            return None
        return self.entry_for(spec)

    def _create_xml(self, name: str, size: int, fmt: str, backing: str | None = None) -> None:
        xml = _volume_xml(name, size, fmt, backing)
        maybe_made = False  # a request sent before the connection dropped

        def create(conn: Any) -> None:
            nonlocal maybe_made
            pool = self._pool(conn)
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

        self._call(f"create volume {name}", create)

    # The two ways a disk is made (DESIGN: "the two interfaces that replace cache()").
    # Each is told everything in advance; its record is already written as `creating`.

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None:
        """A disk with an image's content: fetched and checked once into the pool's cache,
        then an overlay on that entry (qcow2 backend) or a copy of it (flat)."""
        self.cache.from_image(rec, image_id, self._from_entry)

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None:
        """A blank disk, or swap or an empty filesystem made once per (kind, size, label)
        as a cache entry and overlaid or copied like an image."""
        if template.template is TemplateKind.BLANK:
            if rec.format is DiskFormat.PLOOP:
                self._make_ploop(rec.volume, rec.virtual_size, None)
                return
            self._create_xml(rec.volume, rec.virtual_size, rec.format.value)
            faults.point("volume.created")
            return
        self.cache.from_template(rec, template, self._from_entry)

    def _from_entry(self, rec: DiskRecord, entry: str, cached: DiskRecord) -> None:
        """Make disk `rec` of ready cache entry `entry` (held shared by the caller)."""
        if not self.volume_exists(entry):
            raise entries.EntryGone
        fmt = rec.format.value
        if rec.backend is Backend.QCOW2:
            self._create_xml(rec.volume, rec.virtual_size, "qcow2", self.path(entry))
            faults.point("volume.created")
            return
        if rec.format is DiskFormat.PLOOP:
            self._make_ploop(rec.volume, rec.virtual_size, entry)
            return
        self._create_xml(rec.volume, rec.virtual_size, fmt)
        faults.point("volume.created")
        with (
            open_volume(self.path(entry), write=False) as src_fd,
            open_volume(self.path(rec.volume)) as dst_fd,
        ):
            run(
                convert_argv("raw", fmt, fd_path(src_fd), fd_path(dst_fd)),
                fds=(src_fd, dst_fd),
                what=f"copy {entry} into {rec.volume}",
            )
        faults.point("volume.filled")

    def _make_ploop(self, volume: str, size: int, entry: str | None) -> None:
        """Write a parallels image of `size` bytes (holding `entry`'s raw bytes, if any)
        into a temporary file, then give it the volume's name; the caller holds the
        volume's lock, under which its temporary file is written and swept."""
        path = self.path(volume)
        tmp = self.path(TEMP_PREFIX + volume)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by an interrupted run
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            run(
                create_argv("parallels", fd_path(fd), size),
                fds=(fd,),
                what=f"make ploop image {volume}",
            )
            if entry is not None:
                with open_volume(self.path(entry), write=False) as src_fd:
                    run(
                        convert_argv("raw", "parallels", fd_path(src_fd), fd_path(fd)),
                        fds=(src_fd, fd),
                        what=f"copy {entry} into {volume}",
                    )
            os.fsync(fd)
            faults.point("volume.filled")
            try:
                os.link(tmp, path)  # unlike rename, never replaces a volume made meanwhile
            except FileExistsError:
                raise VolumeExists(
                    f"volume {volume} appeared in pool {self.name} from elsewhere; it is "
                    "not ours and is left untouched"
                ) from None
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        faults.point("volume.created")
        self._call("refresh pool", lambda conn: self._pool(conn).refresh(0))

    # -- cache entries (the flows are entries.Cache's) --------------------------------

    @contextmanager
    def _image_scratch(self, entry: str) -> Iterator[int]:
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

    def ensure_image(self, entry: str, image_id: str, disk_size: int) -> None:
        """Fetch, check and store an image as a raw cache entry, unless a ready one exists."""

        def store(fd: int, checked: Checked) -> None:
            fmt = self.images[image_id].format.value
            if fmt == "raw":
                os.rename(self.path(TEMP_PREFIX + entry), self.path(entry))  # the checked bytes
            else:
                from reconciler.drivers.ingest.check import run_limited

                self._create_xml(entry, checked.virtual_size, "raw")
                with open_volume(self.path(entry)) as out_fd:
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
            self._create_xml(entry, size, "raw")
            faults.point("cache.volume.created")
            with open_volume(self.path(entry)) as fd:
                run(
                    mkfs_argv(kind, label, fd_path(fd)),
                    fds=(fd,),
                    what=f"make {kind} template {entry}",
                )
                os.fsync(fd)
            faults.point("cache.volume.filled")

        self.cache.make_template(entry, kind, size, label, fill)

    def _store(self) -> RecordStore:
        if self.store is None:
            raise AssertionError("this driver was made without a record store")
        return self.store

    # -- changing and removing volumes ------------------------------------------------

    def resize(self, rec: DiskRecord, size: int) -> None:
        """Grow a volume using the format from its record, never a probed one."""
        with open_volume(self.path(rec.volume)) as fd:
            if rec.format is DiskFormat.RAW:
                if os.fstat(fd).st_size > size:
                    raise ReconcileError(f"{rec.volume} is larger than {size} bytes; not shrunk")
                os.ftruncate(fd, size)
                os.fsync(fd)
            elif rec.format in NOT_RESIZABLE:
                raise ReconcileError(f"not resizing {rec.volume}: {NOT_RESIZABLE[rec.format]}")
            elif rec.format is DiskFormat.QCOW2:
                run(
                    resize_argv("qcow2", fd_path(fd), size),
                    fds=(fd,),
                    what=f"grow {rec.volume}",
                )
            else:
                raise ReconcileError(f"{rec.volume}: cannot resize format {rec.format}")
        faults.point("volume.resized")

    def delete_volume(self, volume: str) -> None:
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
                self._delete_in(self._pool(conn), volume)

        self._call(f"delete volume {volume}", delete)
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
        if vol.info()[0] == libvirt.VIR_STORAGE_VOL_PLOOP:
            # libvirt would remove a directory tree here (and fails on a file): a ploop
            # disk, or a raw one whose guest wrote the parallels magic at its start.
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise NotAFile(f"{path} is not a regular file; refusing to delete")
            os.unlink(path)
            pool.refresh(0)
            return
        # The file is unlinked here, then libvirt's delete finds it gone, which it ignores
        # for a file volume, and forgets it (virStorageBackendVolDeleteLocal: "Silently
        # ignore failures where the vol has already gone away"). libvirtd unlinks with the
        # pool locked (storageVolDelete), so removals in one pool wait for each other
        # while the file system frees their blocks, and every other call on the pool waits
        # behind them (20 migrations of 128 MiB each: 2.4 s -> 2.0 s). The same unlink(2)
        # as libvirt's: a process that still has the file open keeps it until it closes it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        try:
            vol.delete(0)
        except libvirt.libvirtError as e:
            # A refresh of the pool meanwhile (another step's) saw the file gone and
            # forgot it already.
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise

    # -- adoption -----------------------------------------------------------------------

    def inspect_unmanaged(self, volume: str, fmt: DiskFormat) -> Inspected:
        """The declared format is checked, never found: raw is its file's size (a header
        that looks like another format is only reported); qcow2 and ploop are read by
        `qemu-img info -f FMT` under the untrusted-image limits, and a qcow2 may only be
        backed by a ready cache entry of this pool, named with backing format raw."""
        from reconciler.drivers.ingest.check import run_limited  # oslo.utils: only when adopting

        path = self.path(volume)
        header = file_header_format(path)
        with open_volume(path, write=False) as fd:
            if fmt is DiskFormat.RAW:
                return Inspected(os.fstat(fd).st_size, None, header)
            out = run_limited(
                info_argv(QEMU_FORMAT[fmt], fd_path(fd)),
                fds=(fd,),
                what=f"qemu-img info -f {QEMU_FORMAT[fmt]} {self.name}/{volume}",
            )
        try:
            info: dict[str, Any] = json.loads(out)
            size = int(info["virtual-size"])
        except (ValueError, KeyError, TypeError):
            raise ReconcileError(
                f"{self.name}/{volume}: qemu-img info gave no virtual size"
            ) from None
        data = info.get("format-specific", {}).get("data", {})
        if isinstance(data, dict) and data.get("data-file"):
            raise ReconcileError(
                f"{self.name}/{volume} names an external data file ({data['data-file']}); "
                "it is not adopted"
            )
        backing = info.get("backing-filename")
        if backing is None:
            return Inspected(size, None, header)
        root = self.info().path
        where = os.path.normpath(os.path.join(root, str(backing)))
        entry = os.path.basename(where)
        cached = self._store().get(self.name, entry)
        if (
            os.path.dirname(where) != os.path.normpath(root)
            or cached is None
            or cached.kind is not RecordKind.CACHE
            or cached.state is not RecordState.READY
        ):
            raise ReconcileError(
                f"{self.name}/{volume} is backed by {backing}, which is not a cache entry of "
                f"pool {self.name}; it is not adopted (a backing file outside the pool's own "
                "cache is how a guest reads host files)"
            )
        if info.get("backing-filename-format") != "raw":
            raise ReconcileError(
                f"{self.name}/{volume}: its backing file {entry} has no backing format raw "
                f"(it says {info.get('backing-filename-format')!r}), so it would be probed; "
                "not adopted"
            )
        return Inspected(size, entry, header)

    # -- importing files ----------------------------------------------------------------

    def take_file(self, path: str, volume: str, *, keep_source: bool) -> None:
        """rename(2) (or link, keeping the source) on one file system, never over an
        existing name; elsewhere a sparse copy into a temporary file, synced, then linked
        to the name. The caller holds the volume's lock (temporary files are swept under
        it)."""
        dst = self.path(volume)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"{path} is not a regular file; not imported")
        if os.path.lexists(dst):
            raise VolumeExists(f"volume {volume} exists in pool {self.name}; not replaced")
        if st.st_dev == os.stat(self.info().path).st_dev:
            try:
                os.link(path, dst, follow_symlinks=False)
            except FileExistsError:
                raise VolumeExists(f"volume {volume} appeared in pool {self.name}") from None
            if not keep_source:
                os.unlink(path)
        else:
            tmp = self.path(TEMP_PREFIX + volume)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            run(
                ["cp", "--sparse=always", "--no-dereference", "--", path, tmp],
                what=f"copy {path} into pool {self.name}",
            )
            with open_volume(tmp) as fd:
                os.fchmod(fd, 0o600)
                os.fsync(fd)
            try:
                os.link(tmp, dst)
            except FileExistsError:
                raise VolumeExists(f"volume {volume} appeared in pool {self.name}") from None
            finally:
                os.unlink(tmp)
            if not keep_source:
                os.unlink(path)
        faults.point("volume.imported")
        self._call("refresh pool", lambda conn: self._pool(conn).refresh(0))

    def volume_at(self, path: str) -> str | None:
        where = os.path.normpath(path)
        if os.path.dirname(where) != os.path.normpath(self.info().path):
            return None
        return os.path.basename(where)

    def point_overlay_at(self, path: str, entry: str) -> None:
        with open_volume(path) as fd:
            run(
                rebase_argv("qcow2", fd_path(fd), self.path(entry), "raw"),
                fds=(fd,),
                what=f"point {path} at cache entry {entry}",
            )
            os.fsync(fd)

    # -- migrations ---------------------------------------------------------------------

    def migration_facts(self, volumes: Iterable[str]) -> MigrationFacts:
        """The file system's free space and the blocks each managed file occupies (lstat:
        the host's view of the file, never its bytes)."""
        root = self.info().path
        st = os.statvfs(root)
        allocated: dict[str, int] = {}
        for v in volumes:
            with contextlib.suppress(OSError):
                allocated[v] = os.lstat(os.path.join(root, v)).st_blocks * 512
        layouts = frozenset(
            f"{b.value}/{f.value}"
            for b in self.config.backends
            if b in FILE_LAYOUT_BACKENDS
            for f in BACKEND_FORMATS[b]
        )
        return MigrationFacts(st.f_bavail * st.f_frsize, allocated, layouts)

    def prepare_copy(self, volume: str, backend: Backend, fmt: DiskFormat, size: int) -> None:
        """An empty sparse file of the format, standalone (a copy is always flattened)."""
        if fmt is DiskFormat.PLOOP:
            self._make_ploop(volume, size, None)  # its own step boundaries
            return
        self._create_xml(volume, size, fmt.value)
        faults.point("volume.created")

    @contextmanager
    def qemu_image(
        self, volume: str, fmt: DiskFormat, backing: str | None, *, write: bool
    ) -> Iterator[QemuImage]:
        """The volume as a `json:` filename on descriptors opened without following links;
        a qcow2's backing is the recorded cache entry (read-only, raw) or explicitly none,
        so a backing file named in the header is never opened."""
        with ExitStack() as stack:
            fd = stack.enter_context(open_volume(self.path(volume), write=write))
            qfmt = QEMU_FORMAT[fmt]
            node: dict[str, Any] = {
                "driver": qfmt,
                "file": {"driver": "file", "filename": fd_path(fd)},
            }
            fds = [fd]
            if fmt is DiskFormat.QCOW2:
                node["backing"] = None
                if backing is not None:
                    bfd = stack.enter_context(open_volume(self.path(backing), write=False))
                    fds.append(bfd)
                    node["backing"] = {
                        "driver": "raw",
                        "read-only": True,
                        "file": {"driver": "file", "filename": fd_path(bfd)},
                    }
            yield QemuImage(qfmt, "json:" + json.dumps(node, sort_keys=True), tuple(fds))

    def native_copy(self, source: ManagingDriver, rec: DiskRecord, to: Migration) -> bool:
        """raw to raw from a pool of files (flows.copy: the data extents copied in the
        kernel, a reflink where the file system shares blocks, holes left holes; three
        times qemu-img's speed on ext4). Every other pair (a format to convert, an overlay
        to flatten, an LV or an image to read) is qemu-img's."""
        if not (
            source.access is Access.FILE
            and source.raw_readable(rec)
            and to.format is DiskFormat.RAW
        ):
            return False
        with source.reader(rec.volume) as src, self.writer(to.volume) as dst:
            raw_copy(src, dst, room=to.virtual_size)
        return True

    # -- raw bytes (drivers/api.py's Volumes) -------------------------------------------

    def create_empty(self, volume: str, size: int) -> None:
        self._create_xml(volume, size, "raw")

    def raw_readable(self, rec: DiskRecord) -> bool:
        """Whether reader() gives disk `rec`'s bytes: a raw file without backing."""
        return rec.format is DiskFormat.RAW and rec.backing is None

    @contextmanager
    def reader(self, volume: str, size: int | None = None) -> Iterator[FileSource]:
        """The file's bytes (all of them: a raw file's size is its disk's)."""
        with open_volume(self.path(volume), write=False) as fd:
            yield FileSource(fd, f"{self.name}/{volume}")

    @contextmanager
    def writer(self, volume: str) -> Iterator[FileSink]:
        with open_volume(self.path(volume)) as fd:
            yield FileSink(fd, f"{self.name}/{volume}")

    def finish_copy(self, volume: str) -> None:
        with open_volume(self.path(volume)) as fd:
            os.fsync(fd)

    def rename_volume(self, old: str, new: str, *, replace: bool) -> None:
        """rename(2) in the pool's directory: atomic, so the name always holds one whole
        volume. Without `replace`, link then unlink, which never takes an existing name."""
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
        self._call("refresh pool", lambda conn: self._pool(conn).refresh(0))

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
