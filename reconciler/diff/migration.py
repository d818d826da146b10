"""A migration: a disk whose pool, backend or format changed, copied and kept.

Apply copies the disk into its new layout, compares the copy with the original, switches
the record to the copy, then removes (or, with deletionPolicy Retain, releases) the old
volume. The planner decides whether that can be done at all: every reason apply would
refuse it (a domain uses the disk, a shrink, a layout either driver cannot copy, a volume
without a record where the copy goes, too little room in the target pool, facts the
observed state lacks) is an error here, before anything is copied. Where no driver can
copy the disk, --allow-replace makes it a replace (changed.py) instead, except for a disk
whose encryption changes or an encrypted one (`keyed`, model/keying.py): never replaced.

A run that stopped in the middle leaves the record holding its migration (`resume`):
switched, the copy is the disk and the migration is finished; copying, the partial copy
is made again, or removed where the manifest now asks for the old layout. After a switch
into another pool and before the old record is removed, a disk has two records: `moving`
reads that pair as the one disk it is.

Invariant: the room a migration may take is claimed in the draft (`Draft.claimed`), so
migrations into one pool together never plan more than it has free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from reconciler.diff import guards, new
from reconciler.diff.draft import Draft, Recorded, patch, retained
from reconciler.model import keying
from reconciler.model.keying import Keying
from reconciler.model.naming import migration_name
from reconciler.model.observed import ObservedPool
from reconciler.model.plan import Action, ActionKind
from reconciler.model.record import DiskRecord, MigrationPhase
from reconciler.model.units import format_size
from reconciler.schema.common import Preallocation

# The fields of a disk whose change a migration carries out (a copy keeps the data; a
# new source does not).
MIGRATE_FIELDS = frozenset({"backend", "pool", "format"})
# What a migration is judged by, in the pool it copies out of and the one it copies into
# (ObservedPool's fields, by name, as an older exported state may lack them).
SOURCE_FACTS = frozenset({"layouts", "allocated"})
TARGET_FACTS = frozenset({"layouts", "available", "thick_unit"})


def layout(spec: Mapping[str, Any]) -> str:
    """A disk's layout as drivers name what they can migrate: `backend/format`."""
    return f"{spec['backend']}/{spec['format']}"


# Preallocations that allocate a copy's whole size, whatever its data.
THICK = frozenset({Preallocation.FALLOC, Preallocation.FULL})


def migration_need(
    rec: DiskRecord,
    pool: ObservedPool,
    size: int,
    thick_unit: int = 0,
    preallocation: Preallocation | None = None,
) -> int:
    """Bytes a copy of `rec` (in `pool`) may take in its target, made `size` bytes large: what
    the volume and the cache entry it is backed by occupy (a flattened copy holds both),
    never more than its size, plus room for a qcow2's tables. Where the source pool could
    not say, the whole size. A target whose copies are thick (`thick_unit`, see
    ObservedPool) takes the whole size, rounded up to its unit, whatever the data; so
    does a copy preallocated in full (falloc, full), with its tables."""
    if thick_unit > 0:
        return -(-size // thick_unit) * thick_unit
    used = size if preallocation in THICK else pool.allocated.get(rec.volume)
    if used is not None and rec.backing is not None:
        entry = pool.allocated.get(rec.backing)
        used = None if entry is None else used + entry
    data = size if used is None else min(used, size)
    return data + size // 4096 + (1 << 20)


def moving(recs: list[DiskRecord]) -> list[DiskRecord]:
    """A disk's records, where a migration that switched to a new pool has written the
    record at the new location and not yet removed the old one: that pair is one disk,
    held by the old record (whose migration names the new one), until it is finished."""
    if len(recs) == 2:
        for old, new_ in (recs, recs[::-1]):
            mig = old.migration
            if (
                mig is not None
                and mig.phase is MigrationPhase.SWITCHED
                and mig.target() == new_.key()
            ):
                return [old]
    return recs


def migrate(draft: Draft, r: Recorded, what: str, keyed: Keying | None = None) -> bool:
    """A disk whose pool, backend, format or encryption changed (`what`, for people), in
    `r.rpool` now and going to `r.pool`: copied, verified, switched. False where no driver
    can copy it and --allow-replace asks for a replace instead, which an encrypted disk
    (or one to be: `keyed`, model/keying.py) never is."""
    d, rec, pool = r.d, r.rec, r.pool
    assert pool.volumes is not None
    if not r.exists:
        new.drifted(
            draft,
            r,
            then="; there is nothing to migrate, so the disk is made anew",
            reason=f"{what}: the volume is missing (drift); it is made again in the new layout",
            replaces=(rec.pool, rec.volume) if r.moved else None,
        )
        return True
    if _refused(draft, r):
        return True
    copyable = _copyable(draft, r, what, replaceable=keyed is None)
    if copyable is not None:
        return copyable
    copy = migration_name(d.volume)
    if rec.pool == d.spec.pool and copy in pool.volumes:
        return guards.unmanaged(
            draft,
            (pool.name, copy),
            f"the disk would be copied to {copy} in pool {pool.name}, "
            "which exists without a record; it is left untouched",
            **r.at,
        )
    if new.preallocation_refused(draft, d):
        return True
    if not _room(draft, r, what, encrypted=r.spec.get("encryption") is not None):
        return True
    fate = (
        "kept and no longer managed (deletionPolicy Retain)"
        if retained(r.spec)
        else "removed once the copy is the disk"
    )
    reason = (
        f"{what}: the data is copied into the new layout, compared with the original, "
        f"and the record switched to the copy; the old volume is {fate}"
    )
    if keyed is not None:
        reason += f"; key ({keyed.value}): {keying.describe(keyed)}"
    move = r.action(ActionKind.MIGRATE, reason, replaces=(rec.pool, rec.volume))
    # The copy is a disk made in the new pool: allocated as that pool makes its disks.
    draft.actions.append(dataclasses.replace(move, preallocation=d.preallocation))
    return True


def _refused(draft: Draft, r: Recorded) -> bool:
    """True (with an error) where the disk must not be copied as it stands: a domain uses
    it, or the new size is smaller."""
    rec = r.rec
    # A running domain first, in those words; then any domain that names the volume
    # (its definition would point at a volume that is gone or changed format).
    if guards.attached(draft, r.rpool, rec.volume, "migrated", running_only=True, **r.where):
        return True
    if guards.attached(draft, r.rpool, rec.volume, "migrated", **r.where):
        return True
    if r.d.spec.size < rec.virtual_size:
        draft.error(
            "shrink-refused",
            f"size {format_size(r.d.spec.size)} is smaller than the disk's "
            f"{format_size(rec.virtual_size)}; shrinking would cut off data and is refused",
            **r.at,
        )
        return True
    return False


def _copyable(draft: Draft, r: Recorded, what: str, *, replaceable: bool = True) -> bool | None:
    """None where both drivers can copy the disk (out of `r.rpool`, into `r.pool`); else
    what `migrate` returns: True (with an error) or False (--allow-replace replaces it,
    where the disk is `replaceable`)."""
    needs = "whether and how the disk's data can be kept"
    for p, facts in ((r.rpool, SOURCE_FACTS), (r.pool, TARGET_FACTS)):
        if guards.incomplete(draft, p, facts, needs, **r.at):
            return True
    ways = ((r.rpool, layout(r.rec.spec), "out of"), (r.pool, layout(r.spec), "into"))
    for p, lay, way in ways:
        if lay in p.layouts:
            continue
        if draft.options.allow_replace and replaceable:
            return False
        can = ", ".join(sorted(p.layouts)) or "none"
        then = (
            "(--allow-replace deletes it and makes it anew, destroying its data)"
            if replaceable
            else "(a change of encryption is never a replace)"
        )
        draft.error(
            "migrate-unsupported",
            f"{what}: pool {p.name}'s driver cannot copy a {lay} disk {way} it "
            f"(it migrates {can}), so the data cannot be kept; the disk is left as "
            f"it is {then}",
            **r.at,
        )
        return True
    return None


def _room(draft: Draft, r: Recorded, what: str, *, encrypted: bool = False) -> bool:
    """True, claiming the room, where the copy fits in its target pool beside the copies
    planned before it (an `encrypted` copy: its LUKS header too); else False with an error."""
    pool = r.pool
    need = migration_need(r.rec, r.rpool, r.d.spec.size, pool.thick_unit, r.d.preallocation)
    if encrypted:
        need += keying.HEADER_ROOM
    others = draft.claimed[pool.name]
    if pool.available is not None and others + need > pool.available:
        also = f" beside {format_size(others)} for other migrations" if others else ""
        draft.error(
            "migrate-no-space",
            f"{what}: the copy needs up to {format_size(need)} in pool {pool.name}{also}, "
            f"which has {format_size(pool.available)} free; nothing is copied",
            **r.at,
        )
        return False
    draft.claimed[pool.name] += need
    return True


def resume(draft: Draft, r: Recorded) -> None:
    """A record that holds a migration a run left unfinished: finish it (switched: the
    copy is the disk) or carry on (copying: the partial copy is made again), or roll
    it back where the manifest now asks for the old layout."""
    d, rec, spec = r.d, r.rec, r.spec
    mig = rec.migration
    assert mig is not None
    if draft.pool(mig.pool, f"{d.instance}/{d.spec.name}") is None:
        return
    if mig.phase is MigrationPhase.SWITCHED:
        kept = "kept (deletionPolicy Retain)" if retained(mig.spec) else "removed"
        reason = (
            "an interrupted migration is finished: the verified copy is the disk, and the "
            f"old volume is {kept}"
        )
        _resumed(draft, r, mig.spec, mig.target(), reason, mig.preallocation)
        return
    if guards.attached(draft, r.rpool, rec.volume, "migrated", **r.where):
        return
    if spec == rec.spec:
        reason = (
            "an interrupted migration is rolled back (the manifest asks for the old layout "
            "again): its partial copy is removed"
        )
        _resumed(draft, r, spec, rec.key(), reason)
        return
    if spec != mig.spec:
        draft.error(
            "migration-changed",
            f"the disk was being migrated to {layout(mig.spec)} in pool {mig.pool} when a "
            "run stopped, and the manifest now asks for another layout; set it back to "
            f"{layout(mig.spec)} in pool {mig.pool} (the migration is finished) or to the "
            "old one (it is rolled back) first",
            **r.at,
        )
        return
    reason = "an interrupted migration is carried on: its partial copy is made again"
    _resumed(draft, r, spec, mig.target(), reason, mig.preallocation)


def _resumed(
    draft: Draft,
    r: Recorded,
    spec: Mapping[str, Any],
    to: tuple[str, str],
    reason: str,
    preallocation: Preallocation | None = None,
) -> None:
    """The migrate action that finishes, carries on or rolls back a migration, at `to`
    (a copy made, or made again, as the migration's record says: `preallocation`)."""
    draft.actions.append(
        Action(
            action=ActionKind.MIGRATE,
            instance=r.d.instance,
            disk=r.d.spec.name,
            pool=to[0],
            volume=to[1],
            reason=reason,
            patch=patch(r.rec.spec, spec),
            destructive=False,
            precondition=r.pre,
            spec=dict(spec),
            recorded=r.rec.spec,
            replaces=r.rec.key(),
            preallocation=preallocation,
        )
    )
