"""File pools (libvirt `dir`, `fs`, `netfs`) serving the `flat`, `qcow2` and `ploop` backends:
the driver's face, which the layers above drivers/ call (drivers/api.py's ManagingDriver).

Volumes are created through libvirt with their format stated in the volume XML (a plain
qcow2 overlay as a raw volume, then written with an overlay's bytes: file/disks.py), and filled
by mkfs or `qemu-img convert` run with explicit formats on a file descriptor opened with
O_NOFOLLOW. Nothing is ever probed: a volume's format, size and backing come from its record.

The driver is composed of one part per concern, each in its own module (no hooks to
override): file/volumes.py (the pool's directory and libvirt pool: volumes made, named,
listed, opened, removed; the pool's locks), file/disks.py (disks made of images and
templates, the cache entries they use, growth), file/ploop.py (ploop's own
make), file/copies.py (each volume's record copy in its extended attributes),
file/intake.py (adopt's check and import-nova's take-in), file/migrate.py (migrations).
Here: observing the pool, its ownership (drivers/host/ownership.py: a file in the pool's
`.reconciler` directory) and the raw-bytes core the shared flows use.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from reconciler.drivers.api import (
    Access,
    DiskSource,
    Inspected,
    ManagingDriver,
    MigrationFacts,
    QemuImage,
    RecordCopies,
)
from reconciler.drivers.file import intake, migrate
from reconciler.drivers.file.copies import XattrCopies
from reconciler.drivers.file.disks import FileDisks
from reconciler.drivers.file.headercache import HeaderCache
from reconciler.drivers.file.snapshots import FileSnapshots
from reconciler.drivers.file.volumes import PoolDir
from reconciler.drivers.flows import entries
from reconciler.drivers.flows.copy import FileSink, FileSource
from reconciler.drivers.host import freeze, ownership
from reconciler.drivers.host.domains import Attachments
from reconciler.drivers.host.keys import Secrets
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.host.store import RecordStore
from reconciler.drivers.ingest.headers import file_header
from reconciler.model.errors import PoolError, ReconcileError
from reconciler.model.observed import ObservedPool
from reconciler.model.record import Consistency, DiskRecord, Migration
from reconciler.schema.common import Backend, DiskFormat, Preallocation
from reconciler.schema.config import ImageConfig, PoolConfig
from reconciler.schema.manifest import TemplateSource


class FilePoolDriver:
    access = Access.FILE

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        conns: Connections,
        store: RecordStore | None = None,
        images: Mapping[str, ImageConfig] | None = None,
        header_cache: Path | None = None,
    ) -> None:
        """`header_cache`: the file keeping what the volumes' headers announced between
        runs (file/headercache.py; None: every header is read every time)."""
        self.name = name
        self.header_cache = header_cache
        # The lstat of each volume check_headers took, for the migration_facts that follows
        # it in the same observation (one lstat per volume, not two); taken once.
        self._lstats: dict[str, os.stat_result] = {}
        self.config = config
        self.conns = conns
        self.store = store
        self.images = dict(images or {})
        self.vols = PoolDir(name, config, conns)
        self.copies = XattrCopies(self.vols, store)
        self.disks = FileDisks(self, self.vols, self.images, self._store)
        self.snaps = FileSnapshots(self.vols, self.disks)

    def _store(self) -> RecordStore:
        if self.store is None:
            raise AssertionError("this driver was made without a record store")
        return self.store

    def path(self, volume: str) -> str:
        return self.vols.path(volume)

    def disk_source(self, volume: str) -> DiskSource:
        """A file in the pool's directory (flat, qcow2 and ploop disks alike)."""
        return DiskSource("file", self.path(volume))

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        return self.vols.locks().hold(name, shared=shared)

    def secrets(self) -> Secrets:
        """Encrypted disks' keys: libvirt secrets on the pool's daemon (host/keys.py)."""
        return Secrets(self.conns, self.config.uri, self.name, self.config.keys)

    def key_usage(self, volume: str) -> str:
        """The path a domain opens, as libvirt's own storage driver names a key's volume."""
        return self.path(volume)

    # -- observing --------------------------------------------------------------------

    def list_volumes(self) -> frozenset[str]:
        return self.vols.list_volumes()

    def attachments(self) -> Attachments:
        return self.vols.attachments()

    def record_store(self) -> RecordStore | None:
        return None  # file pools keep their records in the host's database

    def as_managing(self) -> FilePoolDriver:
        return self

    def close(self) -> None:
        pass  # a file pool holds nothing open

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
        """Note managed volumes whose first bytes announce another format than recorded.

        A header unchanged since it was last read (the name's lstat is the regular file it
        was read from, with the same identity and times: file/headercache.py) is not read
        again."""
        self._lstats = {}
        if pool.volumes is None:
            return pool
        prefix = os.path.join(self.vols.info().path, "")
        cache = HeaderCache(self.header_cache) if self.header_cache is not None else None
        stats: dict[str, os.stat_result] = {}
        headers: dict[str, str] = {}
        for rec in records:
            if rec.volume in pool.volumes:
                path = prefix + rec.volume
                fmt = None
                if cache is not None:
                    try:
                        st = os.lstat(path)
                    except OSError:
                        pass
                    else:
                        stats[rec.volume] = st
                        fmt = cache.get(rec.volume, st)
                if fmt is None:
                    fmt, read = file_header(path)
                    if cache is not None and read is not None:
                        cache.put(rec.volume, read, fmt)
                # An encrypted raw disk starts with its LUKS header (the guest writes only
                # the payload after it).
                made = "luks" if rec.encryption and rec.format is DiskFormat.RAW else None
                if fmt != (made or rec.format):  # a StrEnum: equal to its value
                    headers[rec.volume] = fmt
        if cache is not None:
            cache.save()
        self._lstats = stats
        return dataclasses.replace(pool, header_formats=headers)

    def volume_exists(self, volume: str) -> bool:
        return os.path.lexists(self.path(volume))

    # -- ownership: a file in the pool's .reconciler directory --------------------------

    def check_owner(self) -> None:
        """Raise ManagedElsewhere if another record store manages the pool."""
        ownership.check(self.vols.state_dir(), self.name, self._store().identity())

    def claim(self) -> None:
        """Make this driver's record store the pool's manager, before the first change in
        it; raises ManagedElsewhere if another store manages the pool."""
        ownership.claim(self.vols.state_dir(), self.name, self._store().identity())

    def owner(self) -> ownership.Owner | None:
        return ownership.read_owner(self.vols.state_dir(), self.name)

    def take_over(self) -> None:
        """Make this driver's store the pool's manager, whoever managed it (rebuild)."""
        ownership.take_over(self.vols.state_dir(), self._store().identity())

    # -- copies of records, beside the volumes (file/copies.py) -------------------------

    def keep_record_copy(self, rec: DiskRecord) -> None:
        self.copies.keep(rec)

    def record_copies(self) -> RecordCopies:
        return self.copies.read_all()

    def renew_record_copies(self, records: Sequence[DiskRecord]) -> int:
        """Only in a pool this driver's store manages (PoolError otherwise)."""
        self.check_owner()
        return self.copies.renew(self._store(), records)

    # -- making and changing disks (file/disks.py) --------------------------------------

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        return entries.entry_for(self.images, spec)

    def backing_for(self, spec: Mapping[str, Any]) -> str | None:
        return self.disks.backing_for(spec)

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None:
        self.disks.create_from_image(rec, image_id)

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None:
        self.disks.create_from_template(rec, template)

    def ensure_image(self, entry: str, image_id: str, disk_size: int) -> None:
        self.disks.ensure_image(entry, image_id, disk_size)

    def ensure_template(self, entry: str, kind: str, size: int, label: str | None) -> None:
        self.disks.ensure_template(entry, kind, size, label)

    def resize(self, rec: DiskRecord, size: int) -> None:
        enc = rec.encryption
        if enc is not None and enc.header is None:
            # An encrypted qcow2 is opened only with its key: from the key source, if any.
            source = self.secrets().source
            if source is None:
                raise ReconcileError(
                    f"not resizing {rec.volume}: an encrypted {rec.format.value} disk is "
                    "opened only with its key, which its private libvirt secret never gives "
                    f"back; give pool {self.name} a key source (config `keys`) holding it"
                )
            self.disks.resize(rec, size, key=source.get(enc.secret))
            return
        self.disks.resize(rec, size)

    def delete_volume(self, volume: str) -> None:
        self.vols.delete(volume)

    def sweep_temp(self) -> list[str]:
        return self.vols.sweep_temp()

    # -- adoption and importing files (file/intake.py) ----------------------------------

    def inspect_unmanaged(self, volume: str, fmt: DiskFormat) -> Inspected:
        return intake.inspect_unmanaged(self.vols, self._store, volume, fmt)

    def take_file(self, path: str, volume: str, *, keep_source: bool) -> None:
        intake.take_file(self.vols, path, volume, keep_source=keep_source)

    def volume_at(self, path: str) -> str | None:
        return intake.volume_at(self.vols, path)

    def point_overlay_at(self, path: str, entry: str) -> None:
        intake.point_overlay_at(self.vols, path, entry)

    # -- snapshots (file/snapshots.py) ---------------------------------------------------

    def take_snapshots(self, snaps: Sequence[DiskRecord], consistency: str) -> dict[str, str]:
        return self.snaps.take(snaps, consistency)

    def delete_snapshot(self, snap: DiskRecord) -> None:
        self.snaps.delete(snap)

    def snapshot_dependents(self, snap: DiskRecord) -> list[str]:
        return []  # a restore is a copy: nothing depends on the snapshot

    def restore_snapshot(self, snap: DiskRecord, rec: DiskRecord) -> None:
        self.snaps.restore(snap, rec)

    def snapshot_image(self, snap: DiskRecord) -> AbstractContextManager[QemuImage]:
        return self.snaps.image(snap)

    def guests_frozen(
        self, domains: Sequence[str], planned: str
    ) -> AbstractContextManager[Consistency]:
        return freeze.frozen(self.conns, self.config.uri, domains, planned)

    # -- migrations (file/migrate.py) ---------------------------------------------------

    def migration_facts(self, volumes: Iterable[str]) -> MigrationFacts:
        """The lstats check_headers just took serve here, once (Session observes the
        headers, then these facts, of the same volumes at one moment)."""
        seen, self._lstats = self._lstats, {}
        return migrate.migration_facts(self.vols, volumes, seen)

    def prepare_copy(
        self,
        volume: str,
        backend: Backend,
        fmt: DiskFormat,
        size: int,
        preallocation: Preallocation | None = None,
    ) -> None:
        """An empty file of the format, standalone (a copy is always flattened), allocated
        as `preallocation` says (the migration's record's: this pool's when it began)."""
        self.disks.make_empty(volume, fmt, size, preallocation)

    def qemu_image(
        self, volume: str, fmt: DiskFormat, backing: str | None, *, write: bool
    ) -> AbstractContextManager[QemuImage]:
        return migrate.qemu_image(self.vols, volume, fmt, backing, write=write)

    def native_copy(self, source: ManagingDriver, rec: DiskRecord, to: Migration) -> bool:
        return migrate.native_copy(self.vols, source, rec, to)

    def finish_copy(self, volume: str) -> None:
        migrate.finish_copy(self.vols, volume)

    # -- raw bytes (drivers/api.py's Volumes) -------------------------------------------

    def create_empty(self, volume: str, size: int) -> None:
        self.vols.create_xml(volume, size, "raw")

    def raw_readable(self, rec: DiskRecord) -> bool:
        """Whether reader() gives disk `rec`'s bytes: a raw file without backing."""
        return rec.format is DiskFormat.RAW and rec.backing is None

    def reader(self, volume: str, size: int | None = None) -> AbstractContextManager[FileSource]:
        """The file's bytes (all of them: a raw file's size is its disk's)."""
        return self.vols.reader(volume)

    def writer(self, volume: str) -> AbstractContextManager[FileSink]:
        return self.vols.writer(volume)

    def rename_volume(self, old: str, new: str, *, replace: bool) -> None:
        self.vols.rename(old, new, replace=replace)
