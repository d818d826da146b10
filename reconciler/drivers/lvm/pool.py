"""LVM pools (a volume group on the host) serving the `lvm` backend: the driver's face, which
the layers above drivers/ call (drivers/api.py's ManagingDriver).

Disks are logical volumes of the pool's VG, made, grown and removed with LVM2's own tools
(drivers/lvm/tools.py runs them, confined to the VG), as libvirt's `logical` pool cannot
resize. The libvirt pool of the config is a `logical` pool over the same VG: it is what
domains name, and the "in use by a domain" check matches the domains' disks against it by
`<source pool= volume=>` and by the paths /dev/VG/LV and /dev/mapper/VG-LV. libvirt cannot
start a logical pool on a kernel without device-mapper (its pool start runs
`vgchange -aly VG`, which fails on /dev/mapper/control), so the driver needs it defined,
not active, and never asks libvirt for its volumes: they are LVM's (`lvs`, names only).

Records stay in the host's store (SQLite). Everything the reconciler keeps in LVM's
metadata is written by the host, never by a guest (which writes only an LV's bytes): each
LV's back-pointer to its record (lvm/volumes.py) and copy of it (lvm/copies.py), and the
VG's owner tag (lvm/owner.py). The driver is composed of one part per concern, each in its
own module (no hooks to override): lvm/volumes.py (the VG's LVs: made, renamed, cleared,
removed; the host's locks; temporary files and LVs), lvm/disks.py (disks made of images
and templates, the cache entries they use, growth), lvm/copies.py, lvm/owner.py,
lvm/migrate.py (migrations). Here: observing the pool, adopting an LV and taking a file
in, and the raw-bytes core the shared flows use.

Adopting takes an existing LV as raw at LVM's size; importing a file fills a temporary LV,
renamed when whole (drivers/flows/takein.py).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import libvirt

from reconciler.drivers.api import (
    Access,
    DiskSource,
    Inspected,
    ManagingDriver,
    MigrationFacts,
    QemuImage,
    RecordCopies,
    no_preallocation,
)
from reconciler.drivers.flows import entries
from reconciler.drivers.flows.copy import raw_copy
from reconciler.drivers.flows.takein import take_in
from reconciler.drivers.host import freeze, ownership
from reconciler.drivers.host.domains import Attachments, attachments
from reconciler.drivers.host.keys import Secrets
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.host.store import RecordStore
from reconciler.drivers.ingest.headers import HEADER_BYTES, header_format
from reconciler.drivers.lvm import copies, migrate
from reconciler.drivers.lvm.disks import LvmDisks
from reconciler.drivers.lvm.owner import VgOwner
from reconciler.drivers.lvm.tools import LvmError, PiecesSink, PiecesSource, pieces_reader
from reconciler.drivers.lvm.volumes import LV_TEMP_PREFIX, Lvs
from reconciler.model.errors import PoolError, ReconcileError
from reconciler.model.naming import volume_name
from reconciler.model.observed import ObservedPool
from reconciler.model.record import Consistency, DiskRecord, Migration
from reconciler.schema.common import Backend, DiskFormat, Preallocation
from reconciler.schema.config import ImageConfig, LvmConfig, PoolConfig
from reconciler.schema.manifest import TemplateSource
from reconciler.util import faults
from reconciler.util.logs import get_logger

log = get_logger(__name__)

DM_CONTROL = "/dev/mapper/control"


def device_mapper_present() -> bool:
    """Whether the kernel has device-mapper: its control node opens (LVM2 makes the node
    even where the kernel lacks the driver, and opening it then fails with ENODEV)."""
    try:
        fd = os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return e.errno not in (errno.ENOENT, errno.ENODEV, errno.ENXIO)
    os.close(fd)
    return True


class LvmPoolDriver:
    access = Access.DEVICE
    # `lvcreate` (and `lvrename`) refuse a taken name under the VG's lock, changing
    # nothing (VolumeExists): a new disk's create need not ask first (steps/context.py).
    creates_exclusively = True

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        conns: Connections,
        store: RecordStore | None = None,
        images: Mapping[str, ImageConfig] | None = None,
    ) -> None:
        assert config.lvm is not None  # PoolConfig requires it for the lvm backend
        self.name = name
        self.config = config
        self.lvm_config: LvmConfig = config.lvm
        self.conns = conns
        self.store = store
        self.images = dict(images or {})
        self.vg = config.lvm.vg
        self._libvirt_checked = False
        self.lvs = Lvs(name, config.lvm, self._store)
        self.tags = VgOwner(self.lvs)
        self.disks = LvmDisks(self, self.lvs, self.images, self._store)

    def _store(self) -> RecordStore:
        if self.store is None:
            raise AssertionError("this driver was made without a record store")
        return self.store

    def disk_source(self, volume: str) -> DiskSource:
        """The LV's device node, /dev/VG/LV, where LVM makes it once the LV is active (a
        domain needs device-mapper on its host, as activation does)."""
        return DiskSource("block", f"/dev/{self.vg}/{volume}")

    # -- the pool ---------------------------------------------------------------------

    def _call(self, what: str, fn: Any) -> Any:
        return self.conns.call(self.config.uri, f"{what} (pool {self.name})", fn)

    def check_libvirt_pool(self) -> None:
        """The config's libvirt pool must be a `logical` pool over this VG (defined; it
        need not be active, which it cannot be without device-mapper). And the test mode
        (activation off) is refused where device-mapper exists: LVs may be active there,
        and their bytes must not be written behind them through the PV."""
        if self._libvirt_checked:
            return
        if not self.lvm_config.activate and device_mapper_present():
            raise PoolError(
                f"pool {self.name}: `activate: false` is for hosts without device-mapper, "
                f"and this one has it ({DM_CONTROL}); set `activate: true`"
            )

        def get(conn: Any) -> tuple[str, str]:
            try:
                pool = conn.storagePoolLookupByName(self.config.libvirt_pool)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise PoolError(
                        f"libvirt pool {self.config.libvirt_pool!r} is not defined at "
                        f"{self.config.uri}; define a logical pool over VG {self.vg}"
                    ) from None
                raise
            root = ET.fromstring(pool.XMLDesc(0))
            return root.get("type", ""), root.findtext("source/name") or ""

        kind, vg = self._call("look up pool", get)
        if (kind, vg) != ("logical", self.vg):
            raise PoolError(
                f"libvirt pool {self.config.libvirt_pool!r} is a {kind or '?'} pool of "
                f"{vg or 'no VG'}; the lvm backend needs a logical pool over VG {self.vg}"
            )
        self._libvirt_checked = True

    def secrets(self) -> Secrets:
        """Encrypted disks' keys: libvirt secrets on the pool's daemon (host/keys.py)."""
        return Secrets(self.conns, self.config.uri, self.name, self.config.keys)

    def key_usage(self, volume: str) -> str:
        """The LV's device node, the path a domain opens."""
        return self.disk_source(volume).path

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        return self.lvs.lock(name, shared=shared)

    # -- observing --------------------------------------------------------------------

    def list_volumes(self) -> frozenset[str]:
        return self.lvs.lvm.lv_names()

    def attachments(self) -> Attachments:
        def get(conn: Any) -> Attachments:
            by_pool = attachments(conn, self.config.libvirt_pool, f"/dev/{self.vg}")
            if not by_pool.known:
                return by_pool
            mapped = attachments(conn, self.config.libvirt_pool, "/dev/mapper")
            prefix = self.vg.replace("-", "--") + "-"

            def merge(a: dict[str, tuple[str, ...]], b: dict[str, tuple[str, ...]]) -> Any:
                out = {k: set(v) for k, v in a.items()}
                for name, doms in b.items():
                    lv = name[len(prefix) :].replace("--", "-")
                    if name.startswith(prefix):
                        out.setdefault(lv, set()).update(doms)
                    elif name in a:  # a `<source pool= volume=>` match
                        out[name].update(doms)
                return {k: tuple(sorted(v)) for k, v in out.items()}

            return Attachments(
                True, merge(by_pool.defined, mapped.defined), merge(by_pool.running, mapped.running)
            )

        att: Attachments = self._call("list domains", get)
        return att

    def as_managing(self) -> LvmPoolDriver:
        return self

    def close(self) -> None:
        pass  # an lvm pool holds nothing open

    def record_store(self) -> RecordStore | None:
        return None  # an lvm pool's records are in the host's database, as a file pool's

    def observe(self) -> ObservedPool:
        """The VG's LVs by name and which domains use them; never raises."""
        try:
            self.check_libvirt_pool()
            vg = self.lvs.lvm.check_vg()
            if self.store is not None:
                self.tags.check(self.tags.owner_from(vg))
            volumes = self.list_volumes()
            att = self.attachments()
        except ownership.ManagedElsewhere as e:
            return ObservedPool(self.name, None, str(e), managed_elsewhere=True)
        except (PoolError, LvmError) as e:
            return ObservedPool(self.name, None, str(e))
        return ObservedPool(
            self.name, volumes, None, {}, att.defined, att.running, att.known, att.why_unknown
        )

    def check_headers(self, pool: ObservedPool, records: Sequence[DiskRecord]) -> ObservedPool:
        """Note managed LVs whose first bytes announce another format than recorded."""
        if pool.volumes is None:
            return pool
        managed = {r.volume: r for r in records if r.volume in pool.volumes}
        if not managed:
            return pool
        headers: dict[str, str] = {}
        try:
            with self.lvs.data.open_many({v: HEADER_BYTES for v in managed}, write=False) as maps:
                for v, pieces in maps.items():
                    fmt = header_format(pieces_reader(pieces)(0, HEADER_BYTES))
                    # An encrypted disk starts with its LUKS header (the guest writes
                    # only the payload after it).
                    made = "luks" if managed[v].encryption else managed[v].format.value
                    if fmt != made:
                        headers[v] = fmt
        except (OSError, ReconcileError) as e:
            # Warnings only: an LV removed meanwhile, or not active, costs this look.
            log.warning("headers.unreadable", pool=self.name, error=str(e))
            return pool
        return dataclasses.replace(pool, header_formats=headers)

    def volume_exists(self, volume: str) -> bool:
        return self.lvs.exists(volume)

    # -- ownership: a VG tag (lvm/owner.py) ---------------------------------------------

    def owner(self) -> ownership.Owner | None:
        return self.tags.owner()

    def check_owner(self) -> None:
        self.tags.check(self.tags.owner())

    def claim(self) -> None:
        """Tag the VG with this store unless it is tagged (lvm/owner.py), once the libvirt
        pool is checked."""
        self.check_libvirt_pool()
        self.tags.claim()

    def take_over(self) -> None:
        self.tags.take_over()

    # -- copies of records, as LV tags (lvm/copies.py) ----------------------------------

    def keep_record_copy(self, rec: DiskRecord) -> None:
        copies.keep(self.lvs, rec)

    def record_copies(self) -> RecordCopies:
        return copies.read_all(self.lvs)

    def renew_record_copies(self, records: Sequence[DiskRecord]) -> int:
        """Nothing to renew: an LV's tags are in the VG's metadata, which only root on
        this host writes, so every copy there is already in a trusted place."""
        return 0

    # -- making and changing disks (lvm/disks.py) ---------------------------------------

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        return entries.entry_for(self.images, spec)

    def backing_for(self, spec: Mapping[str, Any]) -> str | None:
        return None  # a disk is a copy of its entry: it depends on none once made

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None:
        self.disks.create_from_image(rec, image_id)

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None:
        self.disks.create_from_template(rec, template)

    def ensure_image(self, entry: str, image_id: str, disk_size: int) -> None:
        self.disks.ensure_image(entry, image_id, disk_size)

    def ensure_template(self, entry: str, kind: str, size: int, label: str | None) -> None:
        self.disks.ensure_template(entry, kind, size, label)

    def resize(self, rec: DiskRecord, size: int) -> None:
        self.disks.resize(rec, size)

    def delete_volume(self, volume: str) -> None:
        self.lvs.delete(volume)

    def sweep_temp(self) -> list[str]:
        return self.lvs.sweep_temp()

    # -- adoption and importing files ---------------------------------------------------

    def inspect_unmanaged(self, volume: str, fmt: DiskFormat) -> Inspected:
        """An existing LV is adopted as raw, its size the LV's (LVM's metadata, never its
        bytes); its first bytes are read through LvData only to report a header that
        announces another format (a guest may have written it; it is never followed)."""
        if fmt is not DiskFormat.RAW:
            raise ReconcileError(
                f"pool {self.name} is an lvm pool: its disks are raw LVs, so "
                f"{volume} cannot be adopted as {fmt}"
            )
        size = self.lvs.size(volume)
        with self.lvs.data.open(volume, min(HEADER_BYTES, size), write=False) as pieces:
            header = header_format(pieces_reader(pieces)(0, min(HEADER_BYTES, size)))
        return Inspected(size, None, header)

    def take_file(self, path: str, volume: str, *, keep_source: bool) -> None:
        """A host file's bytes, unchanged, into a new LV (flows/takein.py: filled under the
        temporary name `_tmp_VOLUME`, zeros past the file's end to the LV's, which LVM
        rounds up to whole extents, synced, then renamed). The caller holds the volume's
        lock (temporary LVs are swept under it)."""
        take_in(self, path, volume, keep_source=keep_source)

    def temp_name(self, volume: str) -> str:
        return LV_TEMP_PREFIX + volume

    def remove_temp(self, temp: str) -> None:
        self.lvs.delete(temp)  # cleared first, as any LV (volumeClear)

    def volume_at(self, path: str) -> str | None:
        """The LV at /dev/VG/LV of this pool's VG; None for any other path."""
        where = os.path.normpath(path)
        if os.path.dirname(where) != f"/dev/{self.vg}":
            return None
        return os.path.basename(where) or None

    # -- migrations (lvm/migrate.py) ----------------------------------------------------

    # -- snapshots: a read-only copy LV beside the disk's -------------------------------

    def take_snapshots(self, snaps: Sequence[DiskRecord], consistency: str) -> dict[str, str]:
        """Copy each disk's LV into a new LV VOLUME+snap-NAME, made read-only (`lvchange
        --permission r`). Not an LVM snapshot: that needs device-mapper, absent here, and
        a thick snapshot's COW area would fail the snapshot when it fills. A killed take's
        LV is removed and made again (its record is `creating`)."""
        handles: dict[str, str] = {}
        for s in snaps:
            if self.lvs.exists(s.volume):
                self.lvs.delete(s.volume)
            self.lvs.create(s.volume, s.virtual_size)
            src = volume_name(s.instance, s.disk)
            with self.reader(src, s.virtual_size) as r, self.writer(s.volume) as w:
                raw_copy(r, w)
            faults.point("snapshot.copied")
            self.lvs.lvm.run("lvchange", "--permission", "r", f"{self.vg}/{s.volume}", lv=s.volume)
            handles[s.volume] = s.volume
        return handles

    def delete_snapshot(self, snap: DiskRecord) -> None:
        self.lvs.delete(snap.volume)

    def snapshot_dependents(self, snap: DiskRecord) -> list[str]:
        return []  # a restore is a copy: nothing depends on the snapshot

    def restore_snapshot(self, snap: DiskRecord, rec: DiskRecord) -> None:
        """A new LV of the disk's size with the snapshot's bytes, zeros after them."""
        self.lvs.create(rec.volume, rec.virtual_size)
        with self.reader(snap.volume, snap.virtual_size) as r, self.writer(rec.volume) as w:
            raw_copy(r, w, room=rec.virtual_size)

    def snapshot_image(self, snap: DiskRecord) -> AbstractContextManager[QemuImage]:
        return self.qemu_image(snap.volume, snap.format, None, write=False)

    def guests_frozen(
        self, domains: Sequence[str], planned: str
    ) -> AbstractContextManager[Consistency]:
        return freeze.frozen(self.conns, self.config.uri, domains, planned)

    def migration_facts(self, volumes: Iterable[str]) -> MigrationFacts:
        return migrate.migration_facts(self.lvs, volumes)

    def prepare_copy(
        self,
        volume: str,
        backend: Backend,
        fmt: DiskFormat,
        size: int,
        preallocation: Preallocation | None = None,
    ) -> None:
        no_preallocation(self.name, preallocation)
        migrate.prepare_copy(self.lvs, volume, backend, fmt, size)

    def qemu_image(
        self, volume: str, fmt: DiskFormat, backing: str | None, *, write: bool
    ) -> AbstractContextManager[QemuImage]:
        return migrate.qemu_image(self.lvs, volume, self._recorded_size, fmt, backing, write)

    def _recorded_size(self, volume: str) -> int | None:
        """The bytes of the LV that are its disk: an encrypted disk's LUKS header too
        (qemu-img reads a LUKS volume as raw bytes, e.g. a migration keeping its key)."""
        rec = self._store().get(self.name, volume) if self.store is not None else None
        if rec is None:
            return None
        header = rec.encryption.header if rec.encryption is not None else None
        return rec.virtual_size + (header or 0)

    def native_copy(self, source: ManagingDriver, rec: DiskRecord, to: Migration) -> bool:
        return migrate.native_copy(self.lvs, source is self, source, rec, to)

    def finish_copy(self, volume: str) -> None:
        """fsync the device(s) the LV's bytes are on: /dev/VG/LV, or its PV(s)."""
        with self.lvs.data.open(volume, None, write=True) as pieces:
            for fd in {p.fd for p in pieces}:
                os.fsync(fd)

    # -- raw bytes (drivers/api.py's Volumes) -------------------------------------------

    def create_empty(self, volume: str, size: int) -> None:
        self.lvs.create(volume, max(size, 512))  # LVM makes no empty LV

    def raw_readable(self, rec: DiskRecord) -> bool:
        return rec.format is DiskFormat.RAW and rec.backing is None  # always, in an lvm pool

    def reader(self, volume: str, size: int | None = None) -> AbstractContextManager[PiecesSource]:
        return self.lvs.reader(volume, size)

    def writer(self, volume: str) -> AbstractContextManager[PiecesSink]:
        """All of the LV (whole extents), to be written whole."""
        return self.lvs.writer(volume)

    def rename_volume(self, old: str, new: str, *, replace: bool) -> None:
        self.lvs.rename(old, new, replace=replace)
