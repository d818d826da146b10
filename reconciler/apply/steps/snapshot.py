"""The `snapshot` and `delete-snapshot` steps, and a disk restored from a snapshot.

snapshot, under the first snapshot key's lock (the executor's) and each disk's lock:
  each disk's record checked (ready, of the planned generation, unencrypted) -> each
  snapshot's record `creating` (durable; it names the disk's backing cache entry, so
  `cache gc` keeps it) -> `snapshot.creating` -> the guests frozen where planned ->
  the driver's take_snapshots (all of the instance's disks of the pool at one moment) ->
  thawed -> each record `ready` with its handle and the consistency it has ->
  `snapshot.ready` -> each record's copy kept beside its snapshot.
delete-snapshot, under the snapshot key's lock:
  the driver's dependents checked (none may remain) -> record `deleting` (durable) ->
  `snapshot.deleting` -> the driver's delete_snapshot -> `snapshot.deleted` -> record
  removed.
restore (create.py, for a disk whose source is a snapshot), under the disk's and the
snapshot's lock: the snapshot's record checked ready and of the disk's layout -> the
disk's record `creating` naming the snapshot's backing -> the driver's restore_snapshot
-> record `ready`.

Crash windows: a `creating` snapshot record, with or without a partial snapshot: the next
plan takes it again (the driver replaces what a killed take left) or, when the name left
the manifest, deletes it; a `deleting` one is deleted again (a snapshot already gone is
fine). A restore is a create: its `creating` disk record is made again or deleted. So
nothing is orphaned (every snapshot the backend holds has a record first) and nothing
lost (a snapshot's data goes only after its durable `deleting`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from reconciler.apply.steps.context import Held, StepContext, StepResult
from reconciler.drivers.api import FreezesGuests, ManagingDriver, snapshots_of
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import snapshot_name, volume_name
from reconciler.model.plan import SnapshotMember
from reconciler.model.record import (
    Consistency,
    DiskRecord,
    RecordKind,
    RecordState,
    Snapshot,
)
from reconciler.schema.manifest import SnapshotSource
from reconciler.util import faults
from reconciler.util.logs import get_logger

log = get_logger(__name__)


class SnapshotInUse(ReconcileError):
    """A snapshot something depends on, or a disk with snapshots, would be destroyed."""


def take(ctx: StepContext, h: Held) -> StepResult:
    a, d = h.action, h.driver
    op = a.snapshot
    assert op is not None
    snaps = snapshots_of(d)
    with contextlib.ExitStack() as locks:
        for m in sorted(op.members, key=lambda m: m.volume):
            locks.enter_context(d.lock(m.volume))
        for m in op.members[1:]:
            locks.enter_context(d.lock(m.key))
        made: list[DiskRecord] = []
        for m in op.members:
            disk = ctx.records.get(a.pool, m.volume)
            if disk is None or disk.kind is not RecordKind.DISK:
                raise ReconcileError(f"not taking snapshot {op.name}: disk {m.disk} has no record")
            if disk.state is not RecordState.READY or disk.generation != m.generation:
                raise ReconcileError(
                    f"not taking snapshot {op.name}: disk {m.disk} changed since the plan "
                    f"(record generation {m.generation} -> {disk.generation}, "
                    f"{disk.state.value}); run again to re-plan"
                )
            if disk.encryption is not None:
                raise ReconcileError(
                    f"not taking snapshot {op.name}: disk {m.disk} is encrypted "
                    "(docs/snapshots.md says why that is never snapshotted)"
                )
            old = ctx.records.get(a.pool, m.key)
            if old is not None and old.state is not RecordState.CREATING:
                raise ReconcileError(
                    f"not taking snapshot {op.name} of {m.disk}: it is {old.state.value} already"
                )
            new = DiskRecord(
                kind=RecordKind.SNAPSHOT,
                backend=disk.backend,
                pool=disk.pool,
                volume=m.key,
                instance=disk.instance,
                disk=disk.disk,
                format=disk.format,
                virtual_size=disk.virtual_size,
                spec=disk.spec,
                source=disk.source,
                backing=disk.backing,
                state=RecordState.CREATING,
                generation=(old.generation if old else 0) + 1,
                snapshot=Snapshot(
                    name=op.name,
                    disk_generation=disk.generation,
                    consistency=Consistency(op.consistency or Consistency.CRASH.value),
                ),
            )
            ctx.records.add(new, old.generation if old else None)
            made.append(new)
        faults.point("snapshot.creating")
        planned = _as_now(d, op.members, op.domains, op.consistency)
        try:
            with _frozen(d, op.domains, planned) as consistency:
                handles = snaps.take_snapshots(made, consistency.value)
        except BaseException as e:
            _roll_back(ctx, d, made, e)
            raise
        for rec in made:
            assert rec.snapshot is not None
            info = rec.snapshot.model_copy(
                update={"handle": handles.get(rec.volume), "consistency": consistency}
            )
            ready = ctx.records.change(rec, durable=False, state=RecordState.READY, snapshot=info)
            faults.point("snapshot.ready")
            d.keep_record_copy(ready)
    return "done", f"{consistency.value}"


def _as_now(
    d: ManagingDriver, members: Sequence[SnapshotMember], domains: Sequence[str], planned: str
) -> str:
    """The consistency planned, unless a domain the plan did not see runs the disks now
    (or the domains cannot be listed): then crash, which the record says (never a claim
    of `idle` or `frozen` the snapshot does not have)."""
    att = d.attachments()
    if not att.known:
        return Consistency.CRASH.value
    running = {dom for m in members for dom in att.running.get(m.volume, ())}
    if running - set(domains):
        return Consistency.CRASH.value
    return planned


@contextlib.contextmanager
def _frozen(d: ManagingDriver, domains: tuple[str, ...], planned: str) -> Iterator[Consistency]:
    if isinstance(d, FreezesGuests):
        with d.guests_frozen(domains, planned) as got:
            yield got
        return
    yield Consistency.CRASH if domains else Consistency(planned or Consistency.IDLE.value)


def _roll_back(
    ctx: StepContext, d: ManagingDriver, made: list[DiskRecord], err: BaseException
) -> None:
    """Remove what a failed take left, then the records; never mask the first error."""
    if isinstance(err, KeyboardInterrupt):
        return  # the records stay `creating`; the next run takes them again
    for rec in made:
        try:
            snapshots_of(d).delete_snapshot(rec)
            ctx.records.remove(rec)
        except Exception as e:
            log.warning("snapshot.rollback_failed", volume=rec.volume, error=str(e))


def delete(ctx: StepContext, h: Held) -> StepResult:
    a, d, s = h.action, h.driver, h.rec
    if s is None:
        return "skipped", "already gone (another run deleted it)"
    if s.kind is not RecordKind.SNAPSHOT:
        raise ReconcileError(f"not deleting {a.pool}/{a.volume}: its record is no snapshot's")
    snaps = snapshots_of(d)
    users = snaps.snapshot_dependents(s)
    if users:
        raise SnapshotInUse(
            f"not deleting snapshot {a.pool}/{a.volume}: {', '.join(sorted(users))} still "
            "depend on it"
        )
    if s.state is not RecordState.DELETING:
        s = ctx.records.change(s, state=RecordState.DELETING)
    faults.point("snapshot.deleting")
    snaps.delete_snapshot(s)
    faults.point("snapshot.deleted")
    ctx.records.remove(s)
    return "done", ""


def _restore_of(spec: Mapping[str, Any]) -> tuple[SnapshotSource, str] | None:
    source = spec.get("source")
    if not isinstance(source, dict) or "snapshot" not in source:
        return None
    src = SnapshotSource.model_validate(source)
    inst, disk, name = src.parts()
    return src, snapshot_name(volume_name(inst, disk), name)


def restore_key(spec: Mapping[str, Any]) -> str | None:
    """The key (VOLUME+snap-NAME: its record's volume, its lock's name) of the snapshot
    the disk `spec` describes is restored from; None: its source is no snapshot."""
    got = _restore_of(spec)
    return None if got is None else got[1]


def restore_source(
    ctx: StepContext, pool: str, volume: str, spec: Mapping[str, Any]
) -> DiskRecord | None:
    """The ready snapshot record the disk `spec` describes is restored from (None: its
    source is no snapshot); ReconcileError where it cannot be (apply refuses what the
    plan refuses: snapshot-missing, snapshot-unsupported)."""
    got = _restore_of(spec)
    if got is None:
        return None
    src, key = got
    snap = ctx.records.get(pool, key)
    where = f"{pool}/{volume}"
    if snap is None or snap.kind is not RecordKind.SNAPSHOT or snap.state is not RecordState.READY:
        raise ReconcileError(
            f"not making {where} from snapshot {src.snapshot}: it has no ready "
            "record in the disk's pool [snapshot-missing]"
        )
    layout = (snap.backend.value, snap.format.value)
    if layout != (spec.get("backend"), spec.get("format")) or spec.get("encryption"):
        raise ReconcileError(
            f"not making {where} from snapshot {src.snapshot}: the snapshot "
            f"is {snap.backend.value}/{snap.format.value} [snapshot-unsupported]"
        )
    if snap.virtual_size > int(spec.get("size", 0)):
        raise ReconcileError(
            f"not making {where} from snapshot {src.snapshot}: the snapshot "
            f"is larger than the disk [snapshot-unsupported]"
        )
    return snap


def refuse_if_snapshotted(ctx: StepContext, rec: DiskRecord, doing: str) -> None:
    """Raise SnapshotInUse where `rec`'s disk has snapshots (a replace or a move would
    leave them of a disk that no longer is; the planner says snapshot-in-use first)."""
    have = [
        s.snapshot.name
        for s in ctx.records.snapshots(rec.instance, rec.disk)
        if s.snapshot and s.state is not RecordState.DELETING
    ]
    if have:
        raise SnapshotInUse(
            f"not {doing} {rec.pool}/{rec.volume}: it has snapshot(s) {', '.join(sorted(have))}"
        )
