"""What a step is handed: the record writer, the drivers, the locks, and what the
scheduler read under the action's lock. Steps get this, never the Executor.

Invariant: every record change a step makes goes through `RecordWriter`, one
compare-and-set write on the generation the step read (a change always writes
generation + 1), so two runs that raced past their checks cannot both write. Intents
(`creating`, `resizing`, `deleting`, a migration begun or switched, a record moved) are
written durably before the volume changes; completions (`ready`, a record removed after
its volume) lazily, made durable by the executor's sync at the end of the run
(drivers/host/store.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from reconciler.drivers.api import ManagingDriver
from reconciler.drivers.records import Records
from reconciler.model.errors import ReconcileError
from reconciler.model.plan import Action, ActionKind
from reconciler.model.record import DiskRecord, RecordKind

# A step's outcome: ("done" | "skipped", a message for the report).
StepResult = tuple[str, str]

Key = tuple[str, str]  # (pool, volume)


class RecordWriter:
    """The records a step reads and writes, each write checked against a generation."""

    def __init__(self, records: Records) -> None:
        self._records = records

    def get(self, pool: str, volume: str) -> DiskRecord | None:
        return self._records.get(pool, volume)

    def snapshots(self, instance: str, disk: str) -> list[DiskRecord]:
        """The snapshot records of an instance's disk (read now)."""
        return [
            r
            for r in self._records.for_instance(instance)
            if r.kind is RecordKind.SNAPSHOT and r.disk == disk
        ]

    def change(self, rec: DiskRecord, *, durable: bool = True, **changes: Any) -> DiskRecord:
        """Write `rec` with `changes` over its own generation; returns the record written."""
        new = rec.model_copy(update={**changes, "generation": rec.generation + 1})
        self._records.put(new, rec.generation, durable=durable)
        return new

    def add(self, new: DiskRecord, expect: int | None, *, durable: bool = True) -> None:
        """Write a record made whole (`expect`: the generation it replaces, None if none)."""
        self._records.put(new, expect, durable=durable)

    def remove(self, rec: DiskRecord, *, durable: bool = True) -> None:
        self._records.delete(rec.pool, rec.volume, rec.generation, durable=durable)

    def take(self, rec: DiskRecord, holder: str) -> None:
        """Make this host the owner of a shared pool's record that `holder` held."""
        self._records.take(rec.pool, rec.volume, rec.generation, holder)

    def release(self, rec: DiskRecord) -> None:
        """Leave a shared pool's record to whichever host's manifest names it."""
        self._records.release(rec.pool, rec.volume, rec.generation)

    def released_snapshots(self, pool: str, instance: str, disk: str) -> list[DiskRecord]:
        """The snapshot records of a shared pool's disk that no host holds (read now)."""
        return [
            r
            for r in self._records.released_for_instance(pool, instance)
            if r.kind is RecordKind.SNAPSHOT and r.disk == disk
        ]


@dataclass(frozen=True)
class StepContext:
    """Everything a step may use: records, drivers by pool, and their locks."""

    records: RecordWriter
    drivers: Mapping[str, ManagingDriver]

    def driver(self, pool: str) -> ManagingDriver:
        d = self.drivers.get(pool)
        if d is None:
            raise ReconcileError(f"pool {pool} has no driver that can change it")
        return d

    def lock(self, key: Key) -> AbstractContextManager[None]:
        """The lock of another volume than the action's own (a move's old location)."""
        return self.driver(key[0]).lock(key[1])


def volume_exists(d: ManagingDriver, a: Action, rec: DiskRecord | None) -> bool:
    """Whether `a.volume` exists, asked under its lock; not asked of a new disk (no record,
    planned where no volume was) in a pool whose create itself refuses a taken name, at
    once and changing nothing (VolumeExists: `lvcreate` in a VG): its `creating` record is
    then removed again, and the volume, someone else's, left untouched, as when asked
    first. In an lvm pool that is one LVM command fewer per disk (3 instead of 4)."""
    if (
        a.action is ActionKind.CREATE
        and rec is None
        and not a.precondition.volume_exists
        and getattr(d, "creates_exclusively", False)
    ):
        return False
    return d.volume_exists(a.volume)


def moved(a: Action) -> bool:
    """Whether `a` carries a disk from another location (`a.replaces`) to its own."""
    return a.replaces is not None and a.replaces != (a.pool, a.volume)


@dataclass(frozen=True)
class Held:
    """What the executor read under the action's lock, its precondition checked."""

    action: Action
    driver: ManagingDriver  # the driver of the action's pool; the action's volume is locked
    rec: DiskRecord | None  # the record at the action's own location
    rec_old: DiskRecord | None  # the record at `action.replaces` when the action moves a disk
