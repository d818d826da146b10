"""A disk that is no longer wanted: deleted, released, handed over, or kept.

Three ways a recorded disk stops being wanted: its instance's manifest is a tombstone
(`deleted: true`), its disk left a manifest that is still there, or no manifest names its
instance any more (an orphan). The first two remove it (`remove`): deleted, or released
(the volume kept, the record forgotten) where its deletionPolicy is Retain. An orphan is
only removed with --prune, and only when every manifest loaded (a manifest that failed to
load may name it); in a pool many hosts share it is handed over instead, never deleted;
otherwise it is kept with a warning.

Invariants (DESIGN 4, 7): a delete is destructive exactly when a volume with data goes
(an interrupted create holds none), and no destructive delete is planned while a domain
uses the volume (or while the domains cannot be listed); a half-made or half-deleted disk
is finished or rolled back whatever its deletionPolicy.
"""

from __future__ import annotations

from typing import Any

from reconciler.diff import guards, ownership
from reconciler.diff.draft import Draft, patch, retained
from reconciler.model.desired import DesiredInstance
from reconciler.model.plan import Action, ActionKind, Precondition
from reconciler.model.record import DiskRecord, RecordState

UNFINISHED = (RecordState.CREATING, RecordState.DELETING)


def tombstone(draft: Draft, inst: DesiredInstance, records: list[DiskRecord]) -> None:
    """An instance whose manifest says it is deleted: each of its disks goes."""
    for rec in sorted(records, key=lambda r: (r.disk, r.pool)):
        remove(draft, rec, f"instance deleted (tombstone in {inst.file})")


def remove(draft: Draft, rec: DiskRecord, why: str) -> None:
    """Plan the removal of a recorded disk that is no longer wanted."""
    pool = draft.pool(rec.pool, f"{rec.instance}/{rec.disk}")
    if pool is None or (rec.pool, rec.volume) in draft.bad:
        return
    assert pool.volumes is not None
    exists = rec.volume in pool.volumes
    common: dict[str, Any] = {
        "instance": rec.instance,
        "disk": rec.disk,
        "pool": rec.pool,
        "volume": rec.volume,
        "precondition": Precondition(rec.generation, exists),
        "recorded": rec.spec,
        "patch": patch(rec.spec, None),
    }
    if retained(rec.spec) and rec.state not in UNFINISHED:
        reason = f"{why}; deletionPolicy Retain keeps the volume and the reconciler forgets it"
        draft.actions.append(
            Action(action=ActionKind.RELEASE, reason=reason, destructive=False, **common)
        )
        return
    destructive = exists and rec.state is not RecordState.CREATING
    if rec.state is RecordState.CREATING:
        reason = f"{why}; an interrupted create is rolled back (it holds no user data)"
    elif rec.state is RecordState.DELETING:
        reason = f"{why}; an interrupted delete is finished"
    elif exists:
        reason = f"{why}; the volume and its data are deleted"
    else:
        reason = f"{why}; the volume is already gone, the record is removed"
    if destructive and guards.attached(
        draft, pool, rec.volume, "deleted", instance=rec.instance, disk=rec.disk
    ):
        return
    draft.actions.append(
        Action(action=ActionKind.DELETE, reason=reason, destructive=destructive, **common)
    )


def orphan(draft: Draft, rec: DiskRecord, unknown_failed: int) -> None:
    """A recorded disk whose instance no manifest names (`unknown_failed`: manifests that
    failed to load before naming their instance, any of which may name it)."""
    where: dict[str, Any] = {
        "instance": rec.instance,
        "disk": rec.disk,
        "pool": rec.pool,
        "volume": rec.volume,
    }
    if rec.state in UNFINISHED:
        remove(draft, rec, "no manifest names this instance")
        return
    opts = draft.options
    p = draft.observed.pools.get(rec.pool)
    shared = p is not None and p.shared
    if p is not None and (opts.prune or opts.hand_over):
        needs = "whether the disk is handed over or deleted"
        if guards.incomplete(draft, p, frozenset({"shared"}), needs, **where):
            return
    if shared and (opts.prune or opts.hand_over) and unknown_failed == 0:
        ownership.hand_over(draft, rec)
        return
    if opts.prune and unknown_failed == 0 and not shared:
        remove(draft, rec, "orphaned: no manifest names this instance (--prune)")
        return
    if opts.prune:
        draft.error(
            "prune-refused",
            f"not pruned: {unknown_failed} manifest(s) failed to load and may name this instance",
            **where,
        )
        return
    draft.warn(
        "orphaned-record",
        "no manifest names this instance; the disk is kept and stays this host's (use "
        "--prune to hand it over to the host whose manifest names it)"
        if shared
        else "no manifest names this instance; the disk is kept (use --prune to delete "
        "orphaned disks)",
        **where,
    )
