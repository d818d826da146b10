"""Ownership in pools many hosts share: take-over, hand-over, owned elsewhere.

In a shared pool (Ceph) a disk's record is held by one host at a time. A disk this host's
manifest names but another host holds is taken over when that hold is free (released, or
its heartbeat expired), else reported as owned elsewhere: a warning, for a live owner is
the normal state while an instance moves. A disk this host holds but no manifest here
names is handed over (its record released, the disk kept) for the host whose manifest
names it.

Invariant: neither action touches the disk's data (both are record-only, never
destructive), and each carries the record generation it saw, so apply takes or releases
a record by compare-and-swap and a hold that changed since the plan is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reconciler.diff.draft import Draft
from reconciler.model.desired import DesiredDisk
from reconciler.model.observed import Holder, ObservedPool
from reconciler.model.plan import Action, ActionKind, Precondition
from reconciler.model.record import DiskRecord


def held(
    draft: Draft, d: DesiredDisk, pool: ObservedPool, held: Holder, where: Mapping[str, Any]
) -> None:
    """A disk another host holds (its record, or its instance's claim): taken over
    when it is free, else a warning, for a live owner is the normal state while an
    instance moves (so a one-shot run here still exits 0); either way nothing else is
    done to it in this pass."""
    if not held.free:
        draft.warn(
            "owned-elsewhere",
            f"the disk is owned by {held.why}; this host changes nothing until that "
            "host releases it (its manifest is gone there) or its heartbeat expires",
            pool=pool.name,
            volume=d.volume,
            **where,
        )
        return
    if d.spec.encryption is not None and not d.key_source:
        draft.error(
            "encryption-unsupported",
            f"{held.why}: taking over an encrypted disk needs its key, which only the other "
            f"host's private libvirt secret holds; give pool {pool.name} a key source "
            "(config `keys`) shared by the hosts, so this host can take it",
            pool=pool.name,
            volume=d.volume,
            **where,
        )
        return
    draft.actions.append(
        Action(
            action=ActionKind.TAKE_OVER,
            instance=d.instance,
            disk=d.spec.name,
            pool=pool.name,
            volume=d.volume,
            reason=f"{held.why}; this host takes the record over (the disk is not "
            "touched), then reconciles it on its next pass",
            patch=(),
            destructive=False,
            precondition=Precondition(held.generation, d.volume in (pool.volumes or ())),
            holder=held.host,
        )
    )


def hand_over(draft: Draft, rec: DiskRecord) -> None:
    """Release the record of a disk no manifest here names, in a shared pool."""
    pool = draft.observed.pools.get(rec.pool)
    draft.actions.append(
        Action(
            action=ActionKind.HAND_OVER,
            instance=rec.instance,
            disk=rec.disk,
            pool=rec.pool,
            volume=rec.volume,
            reason="no manifest here names this instance; pool "
            f"{rec.pool} is shared by many hosts, so the record is released for the "
            "host whose manifest names it, and the disk is kept",
            patch=(),
            destructive=False,
            precondition=Precondition(
                rec.generation, pool is not None and rec.volume in (pool.volumes or ())
            ),
        )
    )
