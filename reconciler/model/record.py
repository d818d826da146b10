"""The durable record the reconciler keeps for every disk (and cache entry) it made.

DESIGN invariant 2: the record is written before the volume is created and updated after
each step. It is the only source of a disk's format, size and backing; nothing is ever
read back from the volume or from libvirt's XML. Records are versioned so they can grow.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from reconciler.schema.common import Backend, DiskFormat, Preallocation

RECORD_SCHEMA_VERSION: Literal[1] = 1
# Version 2 is a record that carries a migration (below). A record without one is still
# written as version 1, so a reconciler that predates migrations reads every record it
# can act on; a migrating record is refused by it (an unreadable record stops work on
# that disk, never guessed around), since it would not know the copy is ours.
MIGRATING_SCHEMA_VERSION: Literal[2] = 2


class RecordState(StrEnum):
    CREATING = "creating"  # intent written, volume may be partial: holds no user data
    READY = "ready"
    RESIZING = "resizing"  # target size recorded in `pending_size`
    DELETING = "deleting"  # the volume is being removed


class RecordKind(StrEnum):
    DISK = "disk"
    CACHE = "cache"
    SNAPSHOT = "snapshot"  # a disk's snapshot: `Snapshot` says which (SnapshotRecord)


class Consistency(StrEnum):
    """How consistent a snapshot's disks are with one another and with the guest."""

    FROZEN = "frozen"  # the guest agent froze the filesystems (fsFreeze) while it was taken
    IDLE = "idle"  # no domain ran the disks: nothing was writing
    CRASH = "crash"  # a running guest was not frozen: as after a power cut (all disks at once)


class MigrationPhase(StrEnum):
    COPYING = "copying"  # the copy at `Migration.volume` is partial: the old disk is the disk
    SWITCHED = "switched"  # the copy is verified and is the disk; the old one is removed next


class Migration(BaseModel):
    """Where a disk is being moved to, held by the old disk's record while it moves.

    Both locations are in one record, so no crash leaves a copy nobody owns or two records
    claiming the disk: `copying` means the old volume is the disk (an interrupted copy is
    removed and made again), `switched` means the copy is (the old volume is removed, or
    released under deletionPolicy Retain, and the record moves to the new location).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pool: str
    volume: str  # where the copy is written (a staging name when the pool is the same)
    final_volume: str  # the name the disk has once moved
    backend: Backend
    format: DiskFormat
    virtual_size: int = Field(gt=0)
    spec: dict[str, Any]  # the desired spec the copy is made to
    phase: MigrationPhase
    # Same pool, deletionPolicy Retain: the name the old volume is kept under.
    retained_as: str | None = None
    # How the copy is allocated (its pool's preallocation; a file pool's); None: sparse.
    preallocation: Preallocation | None = None

    @model_serializer(mode="wrap")
    def _without_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _drop_off(self.preallocation, handler(self))

    def target(self) -> tuple[str, str]:
        return (self.pool, self.final_volume)


class Encryption(BaseModel):
    """How a disk is encrypted: the format and the libvirt secret that holds its key.

    Never the key: a record, its copies and an exported state are read by others. The
    secret's UUID is chosen and written here (with the record, `creating`) before the
    secret is defined or the volume made (invariant 2), so no crash leaves a key without a
    record naming it; the secret is undefined only after the volume is gone (crypto-erase).
    `header`: the bytes before the encrypted payload (qemu's `luks` header on a raw
    volume), as made; the payload runs to the volume's end, so a disk grows by growing
    the volume to header + size, without its key. None: not yet made, or a qcow2 (whose
    encryption is inside the image)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["luks"]
    secret: str = Field(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
    header: int | None = Field(None, gt=0)

    @model_serializer(mode="wrap")
    def _without_header(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.header is None:
            data.pop("header", None)
        return data


class Snapshot(BaseModel):
    """What a snapshot record (kind `snapshot`) adds to the fields it shares with its disk's.

    A snapshot record is a DiskRecord keyed `VOLUME+snap-NAME` (naming.snapshot_name) in
    its disk's pool, naming its disk's instance and disk, holding the disk's backend,
    format, virtual size, spec and (a qcow2 overlay's) backing cache entry as they were
    when it was taken: so every record store, copy and check serves it unchanged, and a
    reconciler that predates snapshots refuses it (an unknown kind and field), never
    guesses. Written `creating` before the backend makes it, `ready` after (invariant 2).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # the manifest's snapshot name (NAME of VOLUME+snap-NAME)
    disk_generation: int = Field(ge=1)  # the disk record's generation it was taken of
    consistency: Consistency
    # The backend's own name for it, once made (rbd: its group snapshot; a file, an LV:
    # the snapshot volume itself); None while `creating`.
    handle: str | None = None


class DiskRecord(BaseModel):
    """What the reconciler knows about one volume it made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1, 2] = RECORD_SCHEMA_VERSION
    kind: RecordKind = RecordKind.DISK
    backend: Backend
    pool: str
    volume: str
    instance: str
    disk: str
    format: DiskFormat
    virtual_size: int = Field(gt=0)
    # The desired spec this volume was made to (as in the manifest, sizes in bytes).
    spec: dict[str, Any]
    source: dict[str, Any]
    # Name of the cache entry volume this disk is backed by, if any (same pool).
    backing: str | None = None
    state: RecordState
    pending_size: int | None = None
    generation: int = Field(ge=1)
    # Cache entries: when a disk was last made from it (ISO 8601, UTC), for `cache gc`.
    last_used: str | None = None
    # Set while the disk moves to another pool, backend or format (schema version 2).
    migration: Migration | None = None
    # How the disk was allocated when made (its file pool's `preallocation` then), and so
    # how it grows; None: sparse (off). Written only when set, so a record of a sparse disk
    # is byte for byte what it was before the field existed (a reconciler that predates
    # it refuses a record that has it, as it would any unknown field: never guessed).
    preallocation: Preallocation | None = None
    # How the disk is encrypted at rest (its spec's `encryption`); None: not encrypted.
    # Written only when set, as `preallocation` is.
    encryption: Encryption | None = None
    # A snapshot record's own facts (kind `snapshot` only). Written only when set, so
    # disk and cache records are byte for byte what they were before snapshots existed.
    snapshot: Snapshot | None = None

    @model_serializer(mode="wrap")
    def _without_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = _drop_off(self.preallocation, handler(self))
        if self.encryption is None:
            data.pop("encryption", None)
        if self.snapshot is None:
            data.pop("snapshot", None)
        return data

    def key(self) -> tuple[str, str]:
        return (self.pool, self.volume)

    def unused_for(self, now: datetime.datetime) -> float:
        """Seconds since a disk was last made from this cache entry (inf: never noted)."""
        if not self.last_used:
            return float("inf")
        return (now - datetime.datetime.fromisoformat(self.last_used)).total_seconds()


# A snapshot's record is a DiskRecord of kind `snapshot` with `snapshot` set (above): one
# type, so the stores, copies and checks that read records read snapshots unchanged.
SnapshotRecord = DiskRecord


def snapshot_of(rec: DiskRecord) -> Snapshot:
    """`rec`'s snapshot facts; ValueError if it is not a snapshot record (checked ones are)."""
    if rec.kind is not RecordKind.SNAPSHOT or rec.snapshot is None:
        raise ValueError(f"record {rec.pool}/{rec.volume} is no snapshot's")
    return rec.snapshot


def _drop_off(mode: Preallocation | None, data: dict[str, Any]) -> dict[str, Any]:
    """A record (or migration) as stored: `preallocation` only where it is not off."""
    if mode is None:
        data.pop("preallocation", None)
    return data


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record that exists but cannot be read: work on its disk stops."""

    pool: str
    volume: str
    error: str
