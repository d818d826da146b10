"""Ceph RBD pools serving the `rbd` backend: disks, their records and the image cache all
live in one Ceph pool that many hosts share (DESIGN invariants 2, 5 and 6). This module is
the driver's face (drivers/api.py's protocols): observing the pool, and each concern
delegated to the module that owns it, all working through one `Cluster` (cluster.py).

Where things are (Ceph pool P of the config's `ceph` section; N its `namespace`):

- Disks: RBD images `<instance>_<disk>` in P's default namespace, where libvirt's rbd pool
  (the config's `libvirtPool`, on the same Ceph pool) and domains see them; each a clone of
  a cache entry or a plain image (clone.py); grown, deleted, renamed in disks.py.
- Cache entries: RBD images `_cache_image-…` and `_cache_template-…` with one snapshot
  `base` (cache.py: import order and crash windows).
- Records: in RADOS namespace N (reconciler/drivers/rbd/records.py). A disk's record is
  kept by its host; a cache entry's record is shared by every host (each change a
  compare-and-swap on its generation). An entry's record holds its references (one omap
  key per disk, added before the clone is made, dropped after the disk's image is
  removed), which `references()` counts (RbdRecordStore, cluster.py).
- Locks: leases on RADOS objects in N (drivers/rbd/leases.py), so two hosts never import
  one image twice and never remove an entry a clone is being made from.
- Each image carries a copy of its record in its RBD metadata (copies.py).
- Temporary images `.reconciler-tmp-<entry>` (an import in progress) are written under the
  entry's lock and removed by `sweep_temp` when nobody holds it; no disk is named so.
- Pool ownership: claimed by the RADOS store, not by a host (owner.py).

Each module states the order of its steps and what a crash between them leaves: clone.py
(a disk made), disks.py (deleted), cache.py (an entry made), migrate.py (migrations in and
out), adopt.py (an image adopted); an image's raw bytes are io.py's.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from reconciler.drivers.api import (
    Access,
    AttachError,
    DiskSource,
    Inspected,
    ManagingDriver,
    MigrationFacts,
    QemuImage,
    RecordCopies,
    no_preallocation,
)
from reconciler.drivers.flows import entries
from reconciler.drivers.flows.copy import scratch
from reconciler.drivers.flows.qemuimg import fd_path
from reconciler.drivers.flows.takein import take_in
from reconciler.drivers.host import freeze, ownership, pause
from reconciler.drivers.host.domains import (
    NO_DOMAIN_DRIVER,
    Attachments,
    all_domains,
    domain_xmls,
)
from reconciler.drivers.host.keys import Secrets
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.host.store import RecordStore
from reconciler.drivers.rbd import (
    adopt,
    cache,
    copies,
    disks,
    images,
    io,
    migrate,
    owner,
    snapshots,
)
from reconciler.drivers.rbd.clone import Clones
from reconciler.drivers.rbd.cluster import Cluster, RbdRecordStore
from reconciler.drivers.rbd.monitors import monitors_of_conf, split_monitor
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import SNAPSHOT_INFIX, TEMP_PREFIX, volume_name
from reconciler.model.observed import ObservedPool
from reconciler.model.record import (
    Consistency,
    DiskRecord,
    Migration,
    RecordKind,
    SnapshotRecord,
    snapshot_of,
)
from reconciler.schema.common import Backend, DiskFormat, Preallocation
from reconciler.schema.config import ImageConfig, PoolConfig
from reconciler.schema.manifest import TemplateSource
from reconciler.util.logs import get_logger

log = get_logger(__name__)


class RbdPoolDriver:
    """A driver bound to one configured rbd pool (see the module docstring)."""

    access = Access.REMOTE

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        conns: Connections,
        store: RecordStore | None = None,
        images: Mapping[str, ImageConfig] | None = None,
        host: str | None = None,
        heartbeat_expiry: float = 300.0,
        changes: Path | None = None,
        listing: Path | None = None,
    ) -> None:
        """`changes`: the host's mark of record writes, in its state directory
        (drivers/rbd/changes.py); None: every load of the records reads them all.
        `listing`: where the pool's image names are kept between runs
        (drivers/rbd/listing.py); None: every observe lists the pool."""
        assert config.ceph is not None  # the config's validator requires it for rbd
        self.name = name
        self.config = config
        self.ceph = config.ceph
        self.conns = conns
        self.images = dict(images or {})
        self.c = Cluster(
            name,
            config.ceph,
            host or (store.identity().host if store is not None else socket.gethostname()),
            offline=store is None,  # planning from a file: never connect
            heartbeat_expiry=heartbeat_expiry,
            changes=changes,
            listing=listing,
        )
        self.cache = entries.Cache(
            self,
            Backend.RBD,
            store=self.record_store,
            remove=lambda entry: cache.remove_entry(self.c, entry),
            scratch=lambda entry: scratch(),
        )
        self.clones = Clones(self.c, self.images, self.cache)

    # -- the cluster --------------------------------------------------------------------

    def record_store(self) -> RbdRecordStore:
        """This pool's records: in the Ceph pool's RADOS namespace, shared by its hosts."""
        return self.c.record_store()

    def close(self) -> None:
        self.c.close()

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        """A lease on `name` (see Cluster.lock)."""
        return self.c.lock(name, shared=shared)

    def secrets(self) -> Secrets:
        """Encrypted disks' keys: libvirt secrets on this host's daemon (host/keys.py);
        another host sharing the Ceph pool has none of them (README: key sources)."""
        return Secrets(self.conns, self.config.uri, self.name, self.config.keys)

    def key_usage(self, volume: str) -> str:
        return f"rbd:{self.ceph.pool}/{volume}"

    def disk_source(self, volume: str) -> DiskSource:
        """The image in the Ceph pool's default namespace (where the images are), with the
        monitors and the cephx user and libvirt secret the config names."""
        if self.ceph.secret_uuid is None:
            raise AttachError(
                f"pool {self.name}: ceph.secretUuid is not set: a domain's rbd disk needs the "
                f"libvirt secret holding {self.ceph.client}'s key"
            )
        hosts = (
            [split_monitor(m) for m in self.ceph.monitors]
            if self.ceph.monitors
            else monitors_of_conf(self.ceph.conf)
        )
        return DiskSource(
            "network",
            f"{self.ceph.pool}/{volume}",
            protocol="rbd",
            hosts=tuple(hosts),
            auth=(self.ceph.client_id(), self.ceph.secret_uuid),
        )

    # -- observing --------------------------------------------------------------------

    def as_managing(self) -> RbdPoolDriver:
        return self

    def list_volumes(self) -> frozenset[str]:
        return self.c.list_volumes()

    def observe(self) -> ObservedPool:
        """The pool's images by name and which domains use them; never raises. libvirt is
        asked for the domains in a thread while Ceph is asked for the owner and the images
        (each is round trips of its own: the Ceph client's connect alone is 10-40 ms), and
        its answer or error is taken after theirs, as when asked one after the other."""
        if self.c.offline:
            return ObservedPool(self.name, None, "not observed (planning from a file)")
        domains = _Asked(self.attachments)
        try:
            self.check_owner()
            volumes = self.list_volumes()
            att = domains.answer()
        except ownership.ManagedElsewhere as e:
            return ObservedPool(self.name, None, str(e), managed_elsewhere=True)
        except ReconcileError as e:
            return ObservedPool(self.name, None, str(e))
        finally:
            domains.join()  # never left running behind a failed observe
        return ObservedPool(
            self.name, volumes, None, {}, att.defined, att.running, att.known, att.why_unknown
        )

    def check_headers(self, pool: ObservedPool, records: Sequence[DiskRecord]) -> ObservedPool:
        """Nothing is probed (reading a disk's first bytes from Ceph buys nothing). The
        snapshots the records name are added to the volumes where their image snapshots
        exist (an image listing names no snapshot), with the clones Ceph lists of each,
        whichever host made them (`snapshot_users`: the plan refuses to delete those): one
        read-only open per image that has snapshot records, none for the others."""
        if pool.volumes is None:
            return pool
        wanted: dict[str, set[str]] = {}
        for r in records:
            if r.kind is RecordKind.SNAPSHOT and r.snapshot is not None and r.pool == self.name:
                wanted.setdefault(volume_name(r.instance, r.disk), set()).add(r.snapshot.name)
        if not wanted:
            return pool
        try:
            present, users = snapshots.present(self.c, wanted)
        except ReconcileError as e:
            return ObservedPool(self.name, None, str(e))
        return dataclasses.replace(pool, volumes=pool.volumes | present, snapshot_users=users)

    def volume_exists(self, volume: str) -> bool:
        """An image, or a snapshot's key (VOLUME+snap-NAME: its image snapshot)."""
        if SNAPSHOT_INFIX in volume:
            image, name = volume.split(SNAPSHOT_INFIX, 1)
            return snapshots.exists(self.c, image, name)
        return self.c.volume_exists(volume)

    def attachments(self) -> Attachments:
        att: Attachments = self.conns.call(
            self.config.uri, f"list domains (pool {self.name})", self._attachments
        )
        return att

    def _attachments(self, conn: Any) -> Attachments:
        domains = all_domains(conn)
        if domains is None:
            return NO_DOMAIN_DRIVER
        defined: dict[str, set[str]] = {}
        running: dict[str, set[str]] = {}
        for dom in domains:
            seen = domain_xmls(dom)
            if seen is None:
                continue
            dname, active, xmls = seen
            for xml in xmls:
                for vol in self._domain_volumes(xml):
                    defined.setdefault(vol, set()).add(dname)
                    if active:
                        running.setdefault(vol, set()).add(dname)
        return Attachments(
            True,
            {k: tuple(sorted(v)) for k, v in defined.items()},
            {k: tuple(sorted(v)) for k, v in running.items()},
        )

    def _domain_volumes(self, xml: str) -> set[str]:
        """Images of this Ceph pool a domain's disks use: an rbd network disk naming
        `POOL/IMAGE` (or `POOL/NAMESPACE/IMAGE` in the default namespace only, which has
        no middle part), or a volume of the libvirt pool."""
        out: set[str] = set()
        for disk in ET.fromstring(xml).iter("disk"):
            for src in disk.iter("source"):
                if src.get("pool") == self.config.libvirt_pool and src.get("volume"):
                    out.add(src.get("volume", ""))
                if src.get("protocol") == "rbd":
                    name = src.get("name", "")
                    parts = name.split("/")
                    if len(parts) == 2 and parts[0] == self.ceph.pool:
                        out.add(parts[1].split("@", 1)[0])
        return out

    # -- ownership (per RADOS store, not per host: owner.py) ----------------------------

    def owner(self) -> ownership.Owner | None:
        return owner.owner(self.c)

    def check_owner(self) -> None:
        owner.check_owner(self.c)

    def claim(self) -> None:
        owner.claim(self.c)

    def take_over(self) -> None:
        owner.take_over(self.c)

    # -- record copies (RBD image metadata: copies.py) ----------------------------------

    def keep_record_copy(self, rec: DiskRecord) -> None:
        """A disk's or entry's copy in its image's metadata; a snapshot's in its disk's
        (snapshots.py: an RBD snapshot carries no metadata of its own)."""
        if rec.kind is RecordKind.SNAPSHOT:
            volume, name = self._snapshot_of(rec)
            try:
                snapshots.keep_copy(self.c, volume, name, rec.model_dump_json())
            except ReconcileError as e:
                log.warning("record_copy.failed", pool=self.name, volume=rec.volume, error=str(e))
            return
        copies.keep_record_copy(self.c, rec)

    def record_copies(self) -> RecordCopies:
        return copies.record_copies(self.c)

    def renew_record_copies(self, records: Sequence[DiskRecord]) -> int:
        """Nothing to renew: image metadata is as trusted as the RADOS store (see
        copies.py), so a copy there is rewritten only as its record changes."""
        return 0

    # -- making disks (clone.py) and the image cache (cache.py) -------------------------

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        return self.clones.entry_for(spec)

    def backing_for(self, spec: Mapping[str, Any]) -> str | None:
        """A clone depends on its entry for as long as it exists; an encrypted disk is a
        full copy (clone.py), which depends on none."""
        if spec.get("encryption") is not None:
            return None
        return self.clones.entry_for(spec)

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None:
        self.clones.create_from_template(rec, template)

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None:
        self.clones.create_from_image(rec, image_id)

    def ensure_image(self, entry: str, image_id: str, disk_size: int) -> None:
        cache.ensure_image(self.c, self.cache, self.images, entry, image_id, disk_size)

    def ensure_template(self, entry: str, kind: str, size: int, label: str | None) -> None:
        cache.ensure_template(self.c, self.cache, entry, kind, size, label)

    # -- changing and removing (disks.py) -----------------------------------------------

    def resize(self, rec: DiskRecord, size: int) -> None:
        # An encrypted disk's LUKS payload runs to the image's end: the image is its
        # recorded header + size, grown without the key.
        header = rec.encryption.header if rec.encryption is not None else None
        disks.resize(self.c, rec, size + (header or 0))

    def delete_volume(self, volume: str) -> None:
        disks.delete_volume(self.c, volume)

    def rename_volume(self, old: str, new: str, *, replace: bool) -> None:
        disks.rename(self.c, old, new, replace=replace)

    def sweep_temp(self) -> list[str]:
        return disks.sweep_temp(self.c)

    def remove_temp(self, tmp: str) -> None:
        images.remove_temp(self.c, tmp)

    # -- raw bytes (drivers/api.py's Volumes: io.py) ------------------------------------

    def create_empty(self, volume: str, size: int) -> None:
        images.create_empty(self.c, volume, size)

    def raw_readable(self, rec: DiskRecord) -> bool:
        return True  # a disk is raw, and a clone is read with its parent's data

    def reader(
        self, volume: str, size: int | None = None
    ) -> AbstractContextManager[io.ImageSource]:
        """The image as a disk reads it (a clone's parent data included), all of it."""
        return io.reader(self.c, volume)

    def writer(self, volume: str) -> AbstractContextManager[io.ImageSink]:
        return io.writer(self.c, volume)

    # -- adoption and importing files (adopt.py) ----------------------------------------

    def inspect_unmanaged(self, volume: str, fmt: DiskFormat) -> Inspected:
        return adopt.inspect_unmanaged(self.c, volume, fmt)

    def take_file(self, path: str, volume: str, *, keep_source: bool) -> None:
        """A host file's bytes, unchanged, into a new image (flows/takein.py: its data
        extents, zero chunks skipped, into the temporary image `.reconciler-tmp-VOLUME`,
        flushed, then renamed). The caller holds the volume's lock, under which
        sweep_temp leaves that temporary image alone."""
        take_in(self, path, volume, keep_source=keep_source)

    def temp_name(self, volume: str) -> str:
        return TEMP_PREFIX + volume

    def volume_at(self, path: str) -> str | None:
        return None  # no image of this pool is a host path

    # -- snapshots (drivers/api.py's Snapshots: snapshots.py) ---------------------------

    def _snapshot_of(self, snap: SnapshotRecord) -> tuple[str, str]:
        """(the disk's image, the snapshot's name) of a checked snapshot record."""
        return volume_name(snap.instance, snap.disk), snapshot_of(snap).name

    def take_snapshots(self, snaps: Sequence[SnapshotRecord], consistency: str) -> dict[str, str]:
        """Image snapshots `snap-NAME` of the instance's disks, all taken while the
        domains running them on this host are paused when there is more than one disk
        (drivers/host/pause.py: the window that makes them one moment, whatever
        `consistency` the guest agent gave; one disk's snapshot is atomic by itself).
        Another host never gets here: its `creating` record was refused by the instance's
        claim (drivers/rbd/claims.py)."""
        parts = [self._snapshot_of(s) for s in snaps]
        names = {n for _, n in parts}
        if len(names) != 1:
            raise ReconcileError(f"pool {self.name}: one snapshot name at a time, not {names}")
        volumes = [v for v, _ in parts]
        domains: set[str] = set()
        if len(volumes) > 1:
            running = self.attachments().running
            for v in volumes:
                domains.update(running.get(v, ()))
        name = names.pop()
        with pause.paused(self.conns, self.config.uri, domains):
            snapshots.take(self.c, volumes, name)
        return {
            s.volume: f"{v}@{snapshots.snap_name(name)}"
            for s, (v, _) in zip(snaps, parts, strict=True)
        }

    def guests_frozen(
        self, domains: Sequence[str], planned: str
    ) -> AbstractContextManager[Consistency]:
        """The guests' filesystems frozen by their agents (drivers/host/freeze.py) where
        the plan found them answering; the pause window above is taken inside it."""
        return freeze.frozen(self.conns, self.config.uri, domains, planned)

    def delete_snapshot(self, snap: SnapshotRecord) -> None:
        volume, name = self._snapshot_of(snap)
        snapshots.delete(self.c, volume, name)
        snapshots.drop_copy(self.c, volume, name)

    def snapshot_dependents(self, snap: SnapshotRecord) -> list[str]:
        """The clones Ceph lists of the snapshot, whichever host made them."""
        return snapshots.dependents(self.c, *self._snapshot_of(snap))

    def restore_snapshot(self, snap: SnapshotRecord, rec: DiskRecord) -> None:
        """A clone v2 of the snapshot, grown to the disk's size, flattened when its chain
        would be deeper than `ceph.maxCloneDepth` (snapshots.restore)."""
        _check_raw_unencrypted(rec)
        volume, name = self._snapshot_of(snap)
        # The snapshot's record holds its disk's source: a disk not itself restored is a
        # clone of a cache entry (or of a catalog snapshot, kept one deep: clone.py), or
        # a plain image, so its restore is at most two deep; else the chain is walked.
        at_most = None if "snapshot" in snap.source else 2
        snapshots.restore(
            self.c,
            volume,
            name,
            rec.volume,
            rec.virtual_size,
            rec.model_dump_json(),
            self.ceph.max_clone_depth,
            at_most=at_most,
        )

    @contextmanager
    def snapshot_image(self, snap: SnapshotRecord) -> Iterator[QemuImage]:
        """The snapshot's raw bytes, its parent's included, as a local export (qemu-img
        here has no rbd driver: migrate.qemu_image)."""
        with snapshots.export_at(self.c, *self._snapshot_of(snap)) as fd:
            node = {"driver": "raw", "file": {"driver": "file", "filename": fd_path(fd)}}
            yield QemuImage("raw", "json:" + json.dumps(node, sort_keys=True), (fd,))

    # -- migrations (migrate.py) --------------------------------------------------------

    def migration_facts(self, volumes: Iterable[str]) -> MigrationFacts:
        return migrate.migration_facts(self.c)

    def prepare_copy(
        self,
        volume: str,
        backend: Backend,
        fmt: DiskFormat,
        size: int,
        preallocation: Preallocation | None = None,
    ) -> None:
        no_preallocation(self.name, preallocation)
        migrate.prepare_copy(self.c, volume, backend, fmt, size)

    def qemu_image(
        self, volume: str, fmt: DiskFormat, backing: str | None, *, write: bool
    ) -> AbstractContextManager[QemuImage]:
        return migrate.qemu_image(self.c, volume, fmt, write=write)

    def native_copy(self, source: ManagingDriver, rec: DiskRecord, to: Migration) -> bool:
        return migrate.native_copy(self.c, source, rec, to)

    def finish_copy(self, volume: str) -> None:
        migrate.finish_copy(self.c, volume)


__all__ = ["RbdPoolDriver"]


class _Asked:
    """`ask()` running in a thread of its own; answer() is its result or its exception."""

    def __init__(self, ask: Callable[[], Attachments]) -> None:
        self._ask = ask
        self._result: Attachments | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rbd-observe-domains", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._ask()
        except BaseException as e:  # raised in the caller's thread by answer()
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def answer(self) -> Attachments:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def _check_raw_unencrypted(rec: DiskRecord) -> None:
    if rec.format is not DiskFormat.RAW or rec.encryption is not None:
        raise ReconcileError(
            f"{rec.volume}: a disk restored from an rbd snapshot is a raw, unencrypted clone"
        )
