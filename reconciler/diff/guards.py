"""The guards: every reason the planner stops short of an action, or warns beside one.

Each guard returns True (having recorded its error) when what the caller was about to plan
must not be planned: a domain uses the volume (`attached`), the observed state lacks a fact
the decision needs (`incomplete`, never planned from a default), the cache entry a create
needs cannot be used (`entry_refused`), a volume without a record stands where the disk
goes (`unmanaged`). The plan-wide guards run once every disk is planned: pools that could
not be used (`blocked_pools`), volumes no record explains (`strangers`, never touched),
headers that disagree with their record (`header_warnings`, the record wins), unreadable
records, and the delete threshold, which takes destructive actions out of the plan when
there are too many of them (`delete_threshold`, unless --force; the plan keeps them apart,
as `held`, for the review to show).

Invariant (DESIGN 4, 7): a guard only ever removes or withholds an action, never adds one;
what apply would refuse is an error here, before anything is changed.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

from reconciler.diff.draft import Draft
from reconciler.model.desired import DesiredDisk
from reconciler.model.naming import TEMP_PREFIX
from reconciler.model.observed import ObservedPool

# Entries of a pool that are not volumes anyone made: an ext4 pool's lost+found.
NOT_VOLUMES = frozenset({"lost+found"})
# How many names a grouped report shows before "and N more".
SHOWN = 10


def incomplete(
    draft: Draft, pool: ObservedPool, facts: frozenset[str], needs: str, /, **where: Any
) -> bool:
    """True (with an error) when the observation lacks `facts` of `pool` (an exported
    state that does not carry them): what depends on them is not planned from a default."""
    lacks = sorted(f for f in facts if f in pool.unknown)
    if not lacks:
        return False
    why = "; ".join(dict.fromkeys(pool.unknown[f] for f in lacks))
    draft.error(
        "state-incomplete",
        f"{needs} cannot be judged from the observed state, which does not say "
        f"{', '.join(lacks)} of pool {pool.name}: {why}",
        **where,
    )
    return True


def attached(
    draft: Draft,
    pool: ObservedPool,
    volume: str,
    what: str,
    *,
    running_only: bool = False,
    **where: Any,
) -> bool:
    """True (with an error) when `volume` must not be touched because a domain uses it."""
    if not pool.attachments_known:
        if running_only:
            return False
        draft.error(
            "attachments-unknown",
            f"not {what}: {pool.attachments_why}",
            pool=pool.name,
            volume=volume,
            **where,
        )
        return True
    users = (pool.running if running_only else pool.attached).get(volume)
    if users:
        kind = "running domain(s)" if running_only else "domain(s)"
        draft.error(
            "volume-in-use",
            f"not {what}: the volume is used by {kind} {', '.join(users)}",
            pool=pool.name,
            volume=volume,
            **where,
        )
        return True
    return False


def unmanaged(draft: Draft, found: tuple[str, str], message: str, **where: Any) -> bool:
    """True (with an error): volume `found` (pool, volume) stands where a disk or its copy
    goes and has no record; it is left untouched and not listed again with the strangers."""
    draft.reported.add(found)
    draft.error("unmanaged-volume", message, **where)
    return True


def entry_refused(
    draft: Draft, d: DesiredDisk, pool: ObservedPool, where: Mapping[str, Any]
) -> bool:
    """True (with an error) when the cache entry a create needs cannot be used: apply
    would refuse it, so the plan says so instead of showing a clean create."""
    entry = d.entry
    if entry is None or pool.volumes is None or entry not in pool.volumes:
        return False
    if (pool.name, entry) in draft.bad:
        draft.error(
            "cache-entry-unreadable",
            f"the disk is made from cache entry {entry}, whose record is unreadable; "
            "nothing is made from it",
            pool=pool.name,
            volume=entry,
            **where,
        )
        return True
    if entry in draft.recorded.get(pool.name, ()):
        return False
    draft.reported.add((pool.name, entry))
    draft.error(
        "cache-entry-unmanaged",
        f"the disk is made from cache entry {entry}, but a volume of that name exists in "
        f"pool {pool.name} without a record; it is left untouched, and the disk cannot be "
        "made until it is removed by hand",
        pool=pool.name,
        volume=entry,
        **where,
    )
    return True


# -- once every disk is planned ---------------------------------------------------------


def unreadable_records(draft: Draft) -> None:
    """One error per unreadable record: work on its volume stops (DESIGN 1)."""
    for b in draft.observed.bad_records:
        draft.error(
            "record-unreadable",
            f"{b.error}; work on this volume stops",
            pool=b.pool,
            volume=b.volume,
        )


def blocked_pools(draft: Draft) -> None:
    """One error per pool that cannot be used: where a disk needs it, or, for a pool
    another record store manages, always (the operator must learn of it)."""
    pools = draft.observed.pools
    elsewhere = {n for n, p in pools.items() if p.managed_elsewhere}
    for name in sorted(draft.blocked.keys() | elsewhere):
        p = pools.get(name)
        why = p.error if p is not None and p.error else "not observed"
        disks = sorted(set(draft.blocked.get(name, ())))
        shown = ", ".join(disks[:5]) + (f" and {len(disks) - 5} more" if len(disks) > 5 else "")
        if name in elsewhere:
            tail = f"; nothing is done for {len(disks)} disk(s) in it ({shown})" if disks else ""
            draft.error("pool-managed-elsewhere", f"{why}{tail}", pool=name)
            continue
        draft.error(
            "pool-unreachable",
            f"pool {name} cannot be used: {why}; nothing is done for "
            f"{len(disks)} disk(s) in it ({shown})",
            pool=name,
        )


def strangers(draft: Draft) -> None:
    """One warning per pool for the volumes no record explains: never touched."""
    for name in sorted(draft.observed.pools):
        p = draft.observed.pools[name]
        if p.volumes is None:
            continue
        known = draft.recorded.get(name, set())
        found = [
            v
            for v in p.volumes - known - NOT_VOLUMES
            if not v.startswith(TEMP_PREFIX) and (name, v) not in draft.reported
        ]
        if not found:
            continue
        # The first SHOWN in order, not all of them sorted: a pool many hosts share holds
        # every other host's disks (8,700 at 30 hosts x 300), which sorting took 2x as long.
        shown = ", ".join(heapq.nsmallest(SHOWN, found))
        more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
        draft.warn(
            "unmanaged-volumes",
            f"pool {name} holds {len(found)} volume(s) the reconciler has no record of; "
            f"they are left untouched (adopt them explicitly or remove them by hand): "
            f"{shown}{more}",
            pool=name,
        )


def header_warnings(draft: Draft) -> None:
    """A warning where a volume's header announces another format than its record: the
    record is what is used (DESIGN 1); the header may be a guest's writing."""
    for rec in draft.observed.records:
        pool = draft.observed.pools.get(rec.pool)
        if pool is None:
            continue
        seen = pool.header_formats.get(rec.volume)
        if seen is not None and seen != rec.format.value:
            draft.warn(
                "format-mismatch",
                f"the volume's header announces {seen} but the record says "
                f"{rec.format.value}; a guest may have written that header. The record "
                "is used; nothing is read from or through the header",
                instance=rec.instance,
                disk=rec.disk,
                pool=rec.pool,
                volume=rec.volume,
            )


def delete_threshold(draft: Draft) -> None:
    """Where the plan would destroy more than max_delete_percent of the managed disks,
    every destructive action is taken out of it and one error names them (unless --force)."""
    doomed = [a for a in draft.actions if a.destructive]
    managed = draft.disk_records + draft.snapshot_records + len(draft.observed.bad_records)
    if not doomed or draft.options.force or managed == 0:
        return
    limit = draft.options.max_delete_percent
    if len(doomed) * 100 <= limit * managed:
        return
    lost = sorted(a.replaces or (a.pool, a.volume) for a in doomed)
    names = ", ".join(f"{p}/{v}" for p, v in lost[:10])
    more = f" and {len(doomed) - 10} more" if len(doomed) > 10 else ""
    draft.error(
        "delete-threshold",
        f"the plan would destroy {len(doomed)} of {managed} managed disks"
        + (" and snapshots" if draft.snapshot_records else "")
        + f", more than the "
        f"{limit}% limit; those actions are left out ({names}{more}). Re-run with --force "
        "if this is intended",
    )
    keep = set(map(id, doomed))
    draft.actions = [a for a in draft.actions if id(a) not in keep]
    draft.held = doomed  # not planned, but the review shows each (render.to_markdown)
