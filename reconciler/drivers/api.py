"""What every backend driver provides; nothing backend-specific lives above drivers/.

Two layers. `Volumes` is the small core a backend implements for the shared flows
(drivers/flows/: a cache entry made and used, a file taken in, raw copies): a volume's
existence, its lock, an empty volume, its raw bytes read (`reader`) and written
(`writer`), rename and delete, and how its bytes are reached (`access`). `PoolDriver` and
`ManagingDriver` are what the layers above drivers/ call (observe, plan, apply, migrate,
adopt, import, rebuild, attach), grouped by concern; a backend says what it cannot do by leaving
out an opt-in capability (`Overlays`: an lvm pool has none; overlays_of() says so as an
error), by raising, or by returning no layouts (no migrations).

Invariants: a RawSource/RawSink carries raw bytes only (never read as a format: a
format to convert is qemu-img's, with its formats named); a driver never reaches into
another driver (a cross-backend copy is flows.copy.raw_copy(src.reader(), dst.writer())).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from reconciler.drivers.host.domains import Attachments
from reconciler.drivers.host.keys import Secrets
from reconciler.drivers.host.ownership import Owner
from reconciler.drivers.host.store import RecordStore
from reconciler.model.errors import ReconcileError
from reconciler.model.observed import ObservedPool
from reconciler.model.record import Consistency, DiskRecord, Migration, SnapshotRecord
from reconciler.schema.common import Backend, DiskFormat, Preallocation
from reconciler.schema.manifest import TemplateSource
from reconciler.schema.recordcheck import problem


class VolumeExists(ReconcileError):
    """A volume of the name to create already exists: someone else's, never removed."""


class VolumeInUse(ReconcileError):
    """A domain uses the volume a step would destroy: the step fails, nothing is destroyed."""


class NoCopy(Exception):
    """A volume carries no trusted, readable record copy; the message says why."""


@dataclass(frozen=True)
class RecordCopies:
    """The copies of records a pool's volumes carry, and the volumes that carry none."""

    records: tuple[DiskRecord, ...]
    without: tuple[tuple[str, str], ...]  # (volume, why): no trusted, readable copy
    refused: tuple[tuple[str, str], ...] = ()  # (volume, why): a copy that fails its checks

    @classmethod
    def read(
        cls, pool: str, volumes: Iterable[str], copy_of: Callable[[str], DiskRecord | None]
    ) -> RecordCopies:
        """The copies of `volumes`, each read by the driver's `copy_of` (its record; None:
        the volume went while they were read, so it is left out; NoCopy: it has none, with
        why), then checked."""
        found: list[tuple[str, DiskRecord]] = []
        without: list[tuple[str, str]] = []
        for volume in volumes:
            try:
                rec = copy_of(volume)
            except NoCopy as e:
                without.append((volume, str(e)))
                continue
            if rec is not None:
                found.append((volume, rec))
        return cls.checked(pool, found, without)

    @classmethod
    def checked(
        cls, pool: str, read: Iterable[tuple[str, DiskRecord]], without: Iterable[tuple[str, str]]
    ) -> RecordCopies:
        """The copies a driver read, (volume, record) each, checked as every record is
        input (schema/recordcheck.py): those that fail are refused, with why."""
        found: list[DiskRecord] = []
        refused: list[tuple[str, str]] = []
        for volume, rec in read:
            why = problem(rec, pool, volume)
            if why is None:
                found.append(rec)
            else:
                refused.append((volume, f"its record copy is refused: {why}"))
        return cls(tuple(found), tuple(without), tuple(refused))


@dataclass(frozen=True)
class QemuImage:
    """How qemu-img reaches one volume, as its driver says: `format` is the qemu-img format
    named with -f/-O/-F (never probed), `filename` what it opens (a `json:` filename that
    also names the protocol and, for an overlay, its backing as the record says), and
    `fds` the descriptors that filename refers to (passed to the child, nothing else)."""

    format: str
    filename: str
    fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class MigrationFacts:
    """What the planner needs to judge a migration in or out of a pool (observed)."""

    available: int | None  # free bytes (None: unknown; then no space check is made)
    allocated: Mapping[str, int] = field(default_factory=dict)  # volume -> bytes it occupies
    layouts: frozenset[str] = frozenset()  # `backend/format` it copies out of and into
    # 0: a copy into the pool occupies what its data needs (sparse); N: its whole size,
    # rounded up to N bytes, whatever its data (an LV holds all of its extents).
    thick_unit: int = 0


@dataclass(frozen=True)
class Inspected:
    """What a driver found checking a volume an operator adopts, as a declared format."""

    virtual_size: int
    backing: str | None  # the pool's own cache entry a qcow2 is backed by, if any
    header: str  # the format its first bytes announce (warnings only, never used)


class Access(enum.Enum):
    """How a pool's volumes' bytes are reached, which a destination's native copy looks at
    to choose its way (never the driver's class)."""

    FILE = "file"  # a regular file of this host (a kernel copy between two of them)
    DEVICE = "device"  # ranges of this host's block devices (an LV)
    REMOTE = "remote"  # over the network (an RBD image)


class RawSource(Protocol):
    """A volume's raw bytes, open for reading (a driver's reader())."""

    what: str  # pool/volume, for messages
    size: int  # bytes to copy
    fd: int | None  # a regular file of this host holding them at these offsets, or None

    def extents(self) -> Iterator[tuple[int, int]]:
        """(start, end) ranges that may hold data, in order; all else reads as zeros."""
        ...

    def read(self, at: int, n: int) -> bytes:
        """`n` bytes at `at` (fewer only past `size`)."""
        ...


class RawSink(Protocol):
    """A volume's raw bytes, open for writing (a driver's writer())."""

    what: str
    size: int  # bytes it holds
    fd: int | None  # a regular file of this host, or None
    zeroed: bool  # it reads as zeros until written (a new file or image): holes skipped

    def write(self, data: bytes, at: int) -> None: ...

    def finish(self) -> None:
        """After the last write: flush, or make durable, what the sink needs to."""
        ...


class Volumes(Protocol):
    """The core a backend implements for the shared flows (drivers/flows/)."""

    name: str
    access: Access

    def lock(self, name: str, *, shared: bool = False) -> AbstractContextManager[None]:
        """A lock shared by every reconciler using this pool (processes or hosts)."""
        ...

    def volume_exists(self, volume: str) -> bool: ...

    def create_empty(self, volume: str, size: int) -> None:
        """A new raw volume of at least `size` bytes (VolumeExists if the name is taken);
        its bytes are the writer's to set (an LV's are not zeroed)."""
        ...

    def raw_readable(self, rec: DiskRecord) -> bool:
        """Whether reader() gives disk `rec`'s bytes as the disk reads them (a raw volume,
        without a backing file, or one whose reader includes its parent's data); if not,
        qemu-img reads the disk, with its formats named (ManagingDriver.qemu_image)."""
        ...

    def reader(self, volume: str, size: int | None = None) -> AbstractContextManager[RawSource]:
        """The raw bytes of a volume raw_readable() says yes to: its first `size` (the
        recorded size; None: all the volume holds)."""
        ...

    def writer(self, volume: str) -> AbstractContextManager[RawSink]:
        """The raw bytes of a volume, to write a copy into."""
        ...

    def rename_volume(self, old: str, new: str, *, replace: bool) -> None:
        """Give `old` the name `new` at once (a migration within one pool, a volume filled
        under a temporary name); `replace` lets it take the place of an existing `new`,
        else VolumeExists is raised."""
        ...

    def delete_volume(self, volume: str) -> None: ...


class PoolDriver(Protocol):
    """A driver bound to one configured pool."""

    name: str

    def observe(self) -> ObservedPool:
        """List the pool's volumes (names only) and the domains that use them.

        Never raises for an unreachable pool: returns an ObservedPool with `error` set.
        """
        ...

    def check_headers(self, pool: ObservedPool, records: Sequence[DiskRecord]) -> ObservedPool:
        """Add warnings-only header formats of managed volumes to an observed pool."""
        ...

    def as_managing(self) -> ManagingDriver | None:
        """This driver as one that can change its pool, or None (a capability, so nothing
        above drivers/ asks which class a driver is)."""
        ...

    def record_store(self) -> RecordStore | None:
        """The store that keeps this pool's records, opened on first call (RecordError if
        it cannot be); None: the host's records database (reconciler/drivers/records.py)."""
        ...

    def close(self) -> None:
        """Release what the driver opened (connections, threads); called once, at the end."""
        ...


class Ownership(Protocol):
    """Which record store manages the pool (drivers/host/ownership.py)."""

    def check_owner(self) -> None:
        """Raise PoolError (ManagedElsewhere) if another record store manages the pool."""
        ...

    def claim(self) -> None:
        """Make this driver's record store the pool's manager before the first change;
        raises PoolError if another store manages the pool."""
        ...

    def owner(self) -> Owner | None:
        """The record store that manages the pool, if one has claimed it."""
        ...

    def take_over(self) -> None:
        """Make this driver's store the pool's manager, whoever managed it before."""
        ...


class KeepsRecordCopies(Protocol):
    """Each volume's copy of its record, beside it, for `records rebuild`."""

    def keep_record_copy(self, rec: DiskRecord) -> None:
        """Keep a copy of `rec` beside its volume, where the host (not a guest) can."""
        ...

    def record_copies(self) -> RecordCopies:
        """The trusted record copies the pool's volumes carry, each checked as input
        (schema/recordcheck.py), for `records rebuild`; the others, with why."""
        ...

    def renew_record_copies(self, records: Sequence[DiskRecord]) -> int:
        """Rewrite, as a trusted copy, the copy of each of `records` whose volume carries
        none (or an untrusted one), in a pool this driver's store manages; how many were
        written."""
        ...


class AttachError(ReconcileError):
    """A disk cannot be given to a domain (its pool's config lacks what that needs)."""


@dataclass(frozen=True)
class DiskSource:
    """Where a domain opens a volume: libvirt's `<disk type=>` and its `<source>`, as the
    pool's config says (never as libvirt or the volume would tell)."""

    type: str  # "file", "block" or "network"
    path: str  # file: its path; block: the device node; network: "POOL/IMAGE"
    protocol: str | None = None  # network: "rbd"
    hosts: tuple[tuple[str, int], ...] = ()  # network: the monitors
    auth: tuple[str, str] | None = None  # network: (cephx user, libvirt secret UUID)


class Attaches(Protocol):
    """What a domain needs to open the pool's volumes (reconcile disks)."""

    def disk_source(self, volume: str) -> DiskSource:
        """Where `volume` is opened; AttachError when the pool's config lacks it."""
        ...


class MakesDisks(Protocol):
    """Disks made the two ways of DESIGN (an image, a template), grown, removed."""

    def attachments(self) -> Attachments: ...

    def entry_for(self, spec: Mapping[str, Any]) -> str | None:
        """The cache entry a disk made to `spec` is made from, if any."""
        ...

    def backing_for(self, spec: Mapping[str, Any]) -> str | None:
        """The cache entry a disk made to `spec` depends on once made, if any."""
        ...

    def create_from_image(self, rec: DiskRecord, image_id: str) -> None: ...

    def create_from_template(self, rec: DiskRecord, template: TemplateSource) -> None: ...

    def resize(self, rec: DiskRecord, size: int) -> None: ...

    def sweep_temp(self) -> list[str]: ...


class Adopts(Protocol):
    """Taking a volume without a record under management (`reconcile adopt`)."""

    def inspect_unmanaged(self, volume: str, fmt: DiskFormat) -> Inspected:
        """Check a volume without a record as the format an operator declares (adopt):
        raise ReconcileError for what must not be managed (a backing file or data file
        outside the pool's own cache entries); never decide the format from its bytes."""
        ...


class ImportsNova(Protocol):
    """Taking a Nova instance's files into the pool (`reconcile import-nova`); a qcow2
    overlay's header is pointed at the pool's cache entry by the Overlays capability."""

    def take_file(self, path: str, volume: str, *, keep_source: bool) -> None:
        """Put a host file (a Nova instance's disk, or a `_base` file) into the pool as
        `volume`, bytes unchanged: moved (or, with `keep_source`, linked) where it can be,
        else copied and synced first. Raises VolumeExists if the name is taken."""
        ...

    def volume_at(self, path: str) -> str | None:
        """The name of this pool's volume at host path `path`, if it is one (a backing
        file's path in a header this pool's driver wrote); None otherwise."""
        ...


def implements(d: object, capability: type[Any]) -> bool:
    """`isinstance(d, capability)` for a runtime-checkable protocol of methods only (the
    opt-in capabilities below), answered from `d`'s class once it has them all: the
    protocol check walks the protocol's members on every call (10-20 us on Python 3.11),
    and `reconcile disks` asks it twice per instance (issue 27). A class that lacks them
    is asked as before, so an object that gains them otherwise is still seen."""
    key = (type(d), capability)
    has = _CLASS_IMPLEMENTS.get(key)
    if has is None:
        try:
            has = issubclass(type(d), capability)
        except TypeError:  # a protocol with data members: only isinstance can say
            has = False
        _CLASS_IMPLEMENTS[key] = has
    return has or isinstance(d, capability)


_CLASS_IMPLEMENTS: dict[tuple[type[Any], type[Any]], bool] = {}


@runtime_checkable
class Overlays(Protocol):
    """Opt-in: a pool whose disks can be qcow2 overlays on its own cache entries (a file
    pool). A driver without overlays (lvm) does not have this method; overlays_of() is how
    a caller asks for it."""

    def point_overlay_at(self, path: str, entry: str) -> None:
        """Rewrite the header of the qcow2 file at `path` (to be taken into the pool) so
        its backing is `entry` of this pool, named with backing format raw (the header
        only; no data is read or written)."""
        ...


def overlays_of(d: ManagingDriver) -> Overlays:
    """`d`'s Overlays capability; ReconcileError if its pool has none."""
    if isinstance(d, Overlays):
        return d
    raise ReconcileError(
        f"pool {d.name} has no qcow2 overlays (its disks are standalone volumes), so a "
        "qcow2 overlay cannot be taken into it"
    )


@runtime_checkable
class Encrypts(Protocol):
    """Opt-in: a pool whose driver makes encrypted disks (host/keys.py): the libvirt
    secrets of its daemon hold their keys. secrets_of() is how a caller asks for it."""

    def secrets(self) -> Secrets:
        """The key secrets of the pool's libvirt daemon."""
        ...

    def key_usage(self, volume: str) -> str:
        """What the secret of `volume`'s key names as its usage (libvirt keeps it unique)."""
        ...


def encrypts_of(d: ManagingDriver) -> Encrypts:
    """`d`'s Encrypts capability; ReconcileError if its backend makes no encrypted disks
    (the planner refuses such a disk first)."""
    if isinstance(d, Encrypts):
        return d
    raise ReconcileError(f"pool {d.name} makes no encrypted disks (its backend cannot yet)")


@runtime_checkable
class Snapshots(Protocol):
    """Opt-in: a pool whose driver snapshots disks; snapshots_of() asks for it (a pool
    whose driver lacks it: the planner says `snapshot-unsupported`).

    A snapshot is a record of kind `snapshot` (model/record.py: a SnapshotRecord is a
    DiskRecord with `snapshot` set), keyed VOLUME+snap-NAME in its disk's pool, written
    `creating` by the executor before any method here is called and `ready` (with the
    handle returned) after; the record, never the backend, says what a snapshot is. Every
    method is idempotent over a crash at any point: called again with the same record it
    finishes, or replaces what a killed call left (a partial copy holds no user data).
    The caller holds the disk volume's lock. A driver that keeps record copies beside its
    volumes keeps the snapshot's too (keep_record_copy is called with it).
    """

    def take_snapshots(self, snaps: Sequence[SnapshotRecord], consistency: str) -> dict[str, str]:
        """Take the snapshots of one instance's disks of this pool, all of one name, at one
        moment (rbd: image snapshots taken while the domains running them here are
        paused, drivers/rbd/snapshots.py; a file or lvm pool: one after another, while the
        guest is frozen or idle, else crash-consistent per disk); each record is durable
        `creating` already. `consistency` is a model.record.Consistency value.
        Returns each record's volume (its key in the pool) -> its backend handle."""
        ...

    def delete_snapshot(self, snap: SnapshotRecord) -> None:
        """Remove the snapshot (its record is durable `deleting`); one already gone is fine."""
        ...

    def snapshot_dependents(self, snap: SnapshotRecord) -> list[str]:
        """Volumes made from the snapshot that still depend on it (rbd clones); [] where
        copies are independent (a file or lvm pool)."""
        ...

    def restore_snapshot(self, snap: SnapshotRecord, rec: DiskRecord) -> None:
        """Make rec's volume (record durable `creating`) from the snapshot, grown to rec's
        size (rec's format and backend are the snapshot's; the planner checked)."""
        ...

    def snapshot_image(self, snap: SnapshotRecord) -> AbstractContextManager[QemuImage]:
        """Read-only access to the snapshot's bytes in its recorded format (export): a
        qcow2 overlay's over its recorded backing cache entry, never the header's."""
        ...


@runtime_checkable
class FreezesGuests(Protocol):
    """Opt-in, beside Snapshots: the pool's libvirt daemon can freeze the filesystems of
    the domains that run its disks (drivers/host/freeze.py), for a snapshot planned
    `frozen`. A driver without it takes such a snapshot crash-consistent (recorded so)."""

    def guests_frozen(
        self, domains: Sequence[str], planned: str
    ) -> AbstractContextManager[Consistency]:
        """Freeze `domains` while the body runs where `planned` is `frozen`; yields the
        consistency the snapshot then has (a freeze that fails: crash)."""
        ...


def snapshots_of(d: ManagingDriver) -> Snapshots:
    """`d`'s Snapshots capability; ReconcileError if its driver takes no snapshots (the
    planner refuses such a snapshot first, as `snapshot-unsupported`)."""
    if isinstance(d, Snapshots):
        return d
    raise ReconcileError(f"pool {d.name} takes no snapshots (its driver cannot yet)")


class Migrates(Protocol):
    """Migrations (apply/steps/migrate.py): the data path is qemu-img, or the
    driver's own through flows.copy. A driver that cannot migrate returns no layouts; the
    planner then says so as an error."""

    def migration_facts(self, volumes: Iterable[str]) -> MigrationFacts:
        """Free space, what each of `volumes` (the managed ones) occupies, and the layouts
        this driver can copy a disk out of and into."""
        ...

    def prepare_copy(
        self,
        volume: str,
        backend: Backend,
        fmt: DiskFormat,
        size: int,
        preallocation: Preallocation | None = None,
    ) -> None:
        """Make an empty volume of `size` bytes in `fmt` (no backing) for a copy to be
        written into, allocated as `preallocation` says (a file pool's; the others refuse
        any); raises VolumeExists if the name is taken. It reads as zeros."""
        ...

    def qemu_image(
        self, volume: str, fmt: DiskFormat, backing: str | None, *, write: bool
    ) -> AbstractContextManager[QemuImage]:
        """How qemu-img reads (or writes) `volume`, of the recorded `fmt`, over the recorded
        cache entry `backing` (or none: the header's backing is never followed)."""
        ...

    def native_copy(self, source: ManagingDriver, rec: DiskRecord, to: Migration) -> bool:
        """Copy `rec`'s data into the prepared volume `to.volume` of this pool by the
        backend's own means (an rbd import, a clone flattened), and return True; or return
        False to have qemu-img convert it through qemu_image()."""
        ...

    def finish_copy(self, volume: str) -> None:
        """Make what was written into `volume` durable (before it is compared and used)."""
        ...


class ManagingDriver(
    PoolDriver,
    Volumes,
    Ownership,
    KeepsRecordCopies,
    MakesDisks,
    Adopts,
    ImportsNova,
    Migrates,
    Attaches,
    Protocol,
):
    """A driver that can change its pool: what the executor, migrations, adopt, import,
    rebuild and `cache gc` use; each concern is one protocol above."""


def no_preallocation(pool: str, preallocation: Preallocation | None) -> None:
    """Refuse a preallocation in a pool that is not a file pool (its config cannot set one,
    and a record that names one is refused: this is only a last guard)."""
    if preallocation is not None:
        raise ReconcileError(
            f"pool {pool} is not a file pool: it makes no volume with preallocation "
            f"{preallocation.value}"
        )


def check_unused(d: ManagingDriver, volume: str, doing: str) -> None:
    """Raise unless no domain defined on the pool's libvirt connection uses `volume`
    (every domain, listed now, inactive ones included; DESIGN invariant 4).

    The one check every step that destroys a volume makes (a delete, its redo, the old
    disk of a replace, the old volume of a migration), under the volume's lock and right
    before it destroys: the plan's check is as old as the plan, and a domain may have been
    defined since (a saved plan, a loop's queue, a run that waited for the lock).
    """
    att = d.attachments()
    if not att.known:
        raise VolumeInUse(f"not {doing} {d.name}/{volume}: {att.why_unknown}")
    users = sorted({*att.defined.get(volume, ()), *att.running.get(volume, ())})
    if users:
        raise VolumeInUse(
            f"not {doing} {d.name}/{volume}: it is used by domain(s) {', '.join(users)}; "
            "nothing was destroyed (undefine the domain or change its disk, then run again)"
        )
