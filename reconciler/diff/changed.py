"""A recorded disk the manifest still names: resized, replaced, migrated, updated, or redone.

`disk` compares a disk's record with its manifest entry. A record a run left unfinished
comes first: an interrupted create is redone (the partial volume holds no user data), an
interrupted delete is made again from its source. Then a change of backend, pool, format
or source, which cannot be made in place: a migration where a driver can copy the data
(migration.py), else a replace, which destroys the data and needs --allow-replace. Then a
volume gone from its pool (drift: made again). Then the size: grown (a resize, also one a
run left unfinished), never shrunk, and refused for formats that cannot grow. Any other
difference is a record-only update.

Invariants (DESIGN 4, 7): a disk is only changed in place while no running domain uses
it, and only replaced while no domain names it; shrinking is refused; where a disk moves,
the volume at its new location must be the old record's to replace, never a volume
without a record.
"""

from __future__ import annotations

from typing import Any

from reconciler.diff import guards, migration, new
from reconciler.diff.draft import Draft
from reconciler.diff.render import show_value
from reconciler.model.desired import DesiredDisk
from reconciler.model.observed import ObservedPool
from reconciler.model.plan import ActionKind, Precondition
from reconciler.model.record import DiskRecord, RecordState
from reconciler.model.units import format_size
from reconciler.schema.common import NOT_RESIZABLE

# Fields whose change cannot be applied to an existing volume in place.
REPLACE_FIELDS = ("backend", "pool", "format", "source")


def disk(
    draft: Draft,
    d: DesiredDisk,
    spec: dict[str, Any],
    rec: DiskRecord,
    pool: ObservedPool,
    rpool: ObservedPool,
    pre: Precondition,
    where: dict[str, Any],
) -> None:
    """A disk recorded in `rpool` (its record's pool) that the manifest wants in `pool`."""
    assert pool.volumes is not None
    moved = (rec.pool, rec.volume) != (d.spec.pool, d.volume)
    # Where the disk goes is the old record's to replace, never another owner's volume.
    if moved and d.volume in pool.volumes:
        guards.unmanaged(
            draft,
            (d.spec.pool, d.volume),
            f"the disk moves to pool {d.spec.pool}, where volume {d.volume} exists but "
            "the reconciler has no record of making it; it is left untouched",
            pool=d.spec.pool,
            volume=d.volume,
            **where,
        )
        return
    if rec.state in (RecordState.CREATING, RecordState.DELETING):
        _redo(draft, d, spec, rec, rpool, pre, where)
        return
    fields = [f for f in REPLACE_FIELDS if rec.spec.get(f) != spec.get(f)]
    if fields:
        _relayout(draft, d, spec, rec, pool, rpool, pre, where, fields)
        return
    if not pre.volume_exists:
        reason = "the volume is missing from the pool (drift); it is made again"
        new.drifted(draft, d, spec, rec, pre, where, reason=reason)
        return
    _resize(draft, d, spec, rec, pool, pre, where)


def _redo(
    draft: Draft,
    d: DesiredDisk,
    spec: dict[str, Any],
    rec: DiskRecord,
    rpool: ObservedPool,
    pre: Precondition,
    where: dict[str, Any],
) -> None:
    """A create or a delete a run left unfinished: the disk is made (again)."""
    exists = pre.volume_exists
    moved = (rec.pool, rec.volume) != (d.spec.pool, d.volume)
    # The precondition describes the old location, so a moved action names it.
    old = (rec.pool, rec.volume) if moved or exists else None
    if rec.state is RecordState.CREATING:
        reason = "an interrupted create is redone (the partial volume holds no user data)"
        new.make(draft, ActionKind.CREATE, d, spec, rec, reason, pre, replaces=old)
        return
    if exists and guards.attached(draft, rpool, rec.volume, "made again", **where):
        return
    draft.warn(
        "interrupted-delete",
        f"volume {rec.volume} was being deleted when a run stopped; it is made "
        "again from its source",
        pool=rec.pool,
        volume=rec.volume,
        **where,
    )
    reason = "an interrupted delete left the disk unusable; it is made again"
    new.make(draft, ActionKind.CREATE, d, spec, rec, reason, pre, destructive=exists, replaces=old)


def _relayout(
    draft: Draft,
    d: DesiredDisk,
    spec: dict[str, Any],
    rec: DiskRecord,
    pool: ObservedPool,
    rpool: ObservedPool,
    pre: Precondition,
    where: dict[str, Any],
    fields: list[str],
) -> None:
    """A change of `fields` (of REPLACE_FIELDS): migrated where that keeps the data, else
    replaced where --allow-replace says so."""
    what = "; ".join(
        f"{f} {show_value(f, rec.spec.get(f))} -> {show_value(f, spec.get(f))}" for f in fields
    )
    migratable = set(fields) <= migration.MIGRATE_FIELDS and rec.state is RecordState.READY
    if migratable and migration.migrate(draft, d, spec, rec, pool, rpool, what, pre, where):
        return
    if not draft.options.allow_replace:
        draft.error(
            "replace-required",
            f"{what}: this needs the disk deleted and made again, which destroys "
            "its data; re-run with --allow-replace to do that",
            pool=rec.pool,
            volume=rec.volume,
            **where,
        )
        return
    exists = pre.volume_exists
    if exists and guards.attached(draft, rpool, rec.volume, "replaced", **where):
        return
    new.make(
        draft,
        ActionKind.REPLACE,
        d,
        spec,
        rec,
        f"{what}: the disk is deleted and made again",
        pre,
        destructive=exists,
        replaces=(rec.pool, rec.volume),
    )


def _resize(
    draft: Draft,
    d: DesiredDisk,
    spec: dict[str, Any],
    rec: DiskRecord,
    pool: ObservedPool,
    pre: Precondition,
    where: dict[str, Any],
) -> None:
    """Same layout, volume present: grown, refused, or a record-only update."""
    target = d.spec.size
    current = rec.virtual_size
    interrupted = rec.state is RecordState.RESIZING
    if interrupted and rec.pending_size is not None:
        # The volume may already have grown before the run stopped.
        current = max(current, rec.pending_size)
    at = {"pool": rec.pool, "volume": rec.volume, **where}
    if target < current:
        draft.error(
            "shrink-refused",
            f"size {format_size(target)} is smaller than the disk's {format_size(current)}; "
            "shrinking would cut off data and is refused",
            **at,
        )
        return
    if target > current and rec.format in NOT_RESIZABLE:
        draft.error(
            "resize-unsupported",
            f"size {format_size(current)} -> {format_size(target)}: "
            f"{NOT_RESIZABLE[rec.format]}; make a new disk of the new size (a new disk "
            f"name) and copy the data into it, or keep the size at {format_size(current)}",
            **at,
        )
        return
    if target > current or interrupted:
        if guards.attached(draft, pool, rec.volume, "resized", running_only=True, **where):
            return
        note = " (completing an interrupted resize)" if interrupted else ""
        reason = f"grow {format_size(rec.virtual_size)} -> {format_size(target)}{note}"
        draft.disk_action(ActionKind.RESIZE, d, spec, rec, reason, pre)
        return
    if rec.spec != spec:
        reason = "record-only change (no change to the volume)"
        draft.disk_action(ActionKind.UPDATE, d, spec, rec, reason, pre)
