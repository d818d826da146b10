"""Snapshots: taken, deleted, and restored from, after every disk is planned.

A disk's manifest lists its snapshots by name (`snapshots: [NAME]`); each is a record of
kind `snapshot` keyed VOLUME+snap-NAME in the disk's pool (model/record.py). This pass
runs once the disks are planned (it reads their actions) and plans:

- `snapshot` (`+@`): one action per instance, pool and name, so an instance's disks of
  one pool are taken at one moment; a name is taken once, of a disk that is ready, in its
  pool, with nothing else planned for it (a disk being made is taken by the next run),
  and again if a run left its record `creating`. Its consistency: `idle` where no running
  domain uses the disks, `frozen` where every running domain's guest agent answered
  (Observed.agents, asked only when a snapshot is to be taken), else `crash` with a
  `crash-consistent` warning;
- `delete-snapshot` (`-@`), destructive (counted by the delete guard) where a ready
  snapshot goes: a name dropped from the list, a disk that goes (deleted, released or
  dropped; it takes its snapshots with it), a disk without a record; a record a run left
  `deleting` is finished;
- restores: a disk whose source is `{snapshot: INSTANCE/DISK@NAME}` is made (create or
  replace, planned by new.py) only from a ready snapshot record of its pool, backend and
  format, no larger than the disk, of a pool whose driver snapshots, unencrypted.

Errors (apply refuses each too): `snapshot-in-use` (a snapshot a planned restore
depends on is to be deleted, or a disk with snapshots would be replaced or moved: the
replace or migration is taken out of the plan), `snapshot-missing`, `snapshot-unsupported`
(another pool or layout, a smaller disk, an encrypted disk, a pool whose driver takes
none). Warnings: `crash-consistent`, `drift` (a ready snapshot's volume is gone).

Pure, as the planner is: the same inputs give the same actions, in a stable order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from reconciler.diff import guards
from reconciler.diff.draft import Draft, where_of
from reconciler.model.desired import Desired, DesiredDisk
from reconciler.model.naming import snapshot_name, volume_name
from reconciler.model.plan import (
    Action,
    ActionKind,
    Precondition,
    SnapshotMember,
    SnapshotOp,
)
from reconciler.model.record import Consistency, DiskRecord, RecordKind, RecordState
from reconciler.schema.common import NOT_RESIZABLE, Backend
from reconciler.schema.manifest import SnapshotSource

# Disk actions after which the disk is not the one its snapshots were taken of.
# A disk handed over keeps its snapshots: the hand-over releases their records with the
# disk's (apply/steps/ownership.py), and the host that takes the disk takes them.
_GOES = (ActionKind.DELETE, ActionKind.RELEASE)
_REMADE = (ActionKind.REPLACE, ActionKind.MIGRATE)


def snapshot_records(records: Iterable[DiskRecord]) -> dict[tuple[str, str], list[DiskRecord]]:
    """Snapshot records by (instance, disk), each list by name."""
    out: dict[tuple[str, str], list[DiskRecord]] = defaultdict(list)
    for r in records:
        if r.kind is RecordKind.SNAPSHOT and r.snapshot is not None:
            out[(r.instance, r.disk)].append(r)
    for v in out.values():
        v.sort(key=lambda r: (r.snapshot.name if r.snapshot else "", r.pool))
    return out


def plan(draft: Draft, desired: Desired, settled: set[str], unsettled: set[str]) -> None:
    """Add the snapshot actions and problems to `draft` (see the module docstring).
    `settled`: the instances whose manifests the planner read (one manifest, loaded);
    `unsettled`: those a manifest may name that did not load (or several claim). The
    snapshots of others are left as they are, except under a disk that goes, and those
    of an instance no manifest names without a disk record, which --prune deletes."""
    snaps = snapshot_records(draft.observed.records)
    disks: dict[tuple[str, str], DesiredDisk] = {}
    for inst in desired.instances:
        if inst.instance in settled and not inst.deleted:
            for dd in inst.disks:
                disks[(dd.instance, dd.spec.name)] = dd
    by_disk: dict[tuple[str, str], list[Action]] = defaultdict(list)
    for a in draft.actions:
        if a.snapshot is None:
            by_disk[(a.instance, a.disk)].append(a)
    records = {
        (r.instance, r.disk): r for recs in draft.records.values() for r in recs
    }  # one per disk: several are the planner's record-conflict error
    restores = _restores(draft, disks, by_disk, snaps)
    _remade_refused(draft, by_disk, snaps, disks)
    takes: dict[tuple[str, str, str], list[tuple[DesiredDisk, DiskRecord, DiskRecord | None]]]
    takes = defaultdict(list)
    kept: set[tuple[str, str]] = set()  # disks that go, kept while a snapshot is in use
    # A disk with no snapshot records and none in its list has nothing here: most disks.
    for key in sorted(set(snaps) | {k for k, d in disks.items() if d.spec.snapshots}):
        d = disks.get(key)
        have = {r.snapshot.name: r for r in snaps.get(key, ()) if r.snapshot}
        wanted = list(d.spec.snapshots or ()) if d is not None else []
        acts = by_disk.get(key, [])
        rec = records.get(key)
        orphaned = key[0] not in unsettled and (key[0] in settled or draft.options.prune)
        goes = any(a.action in _GOES for a in acts) or (rec is None and d is None and orphaned)
        if d is None and not goes:
            continue  # its disk stays (or its manifest was not read): left as it is
        for name, old in have.items():
            if old.state is RecordState.DELETING or goes or name not in wanted:
                why = (
                    "an interrupted delete is finished"
                    if old.state is RecordState.DELETING
                    else "its disk goes, and takes its snapshots with it"
                    if goes or d is None
                    else f"snapshot {name} is no longer in the manifest's list"
                )
                if not _delete(draft, old, why, restores, d) and goes:
                    kept.add(key)
        if d is None or goes or rec is None:
            continue
        for name in wanted:
            s = have.get(name)
            if s is not None and s.state is RecordState.READY:
                pool = draft.observed.pools.get(s.pool)
                if pool is not None and pool.volumes is not None and s.volume not in pool.volumes:
                    draft.warn(
                        "drift",
                        f"snapshot {name}'s volume {s.volume} is missing from pool {s.pool}: "
                        "it was removed outside the reconciler; drop the name from the list "
                        "to forget it",
                        pool=s.pool,
                        volume=s.volume,
                        **where_of(d),
                    )
                continue
            if acts or rec.state is not RecordState.READY or rec.pool != d.spec.pool:
                continue  # taken once the disk is made, grown or moved (the next run)
            if not _can_take(draft, d, rec):
                continue
            takes[(d.instance, rec.pool, name)].append((d, rec, s))
    for (instance, pool_name, name), members in sorted(takes.items()):
        _take(draft, instance, pool_name, name, members)
    # A disk whose snapshot cannot be deleted yet (the error above says why) is not
    # deleted either: a backend that keeps snapshots inside the disk's volume (rbd)
    # would refuse, and elsewhere the snapshot would outlive the disk it was taken of.
    if kept:
        draft.actions = [
            a
            for a in draft.actions
            if not (a.action is ActionKind.DELETE and (a.instance, a.disk) in kept)
        ]


def _can_take(draft: Draft, d: DesiredDisk, rec: DiskRecord) -> bool:
    """True unless the disk cannot be snapshotted (with a `snapshot-unsupported` error)."""
    pool = draft.observed.pools.get(rec.pool)
    why = None
    if rec.encryption is not None or d.spec.encryption is not None:
        why = (
            "an encrypted disk is not snapshotted: a copy of its ciphertext would need "
            "its key to outlive the disk, which crypto-erase undefines (docs/snapshots.md)"
        )
    elif pool is None or pool.volumes is None:
        return False  # reported with the disk
    elif guards.incomplete(
        draft, pool, frozenset({"snapshots"}), "whether its driver takes snapshots",
        pool=rec.pool, **where_of(d),
    ):  # fmt: skip
        return False
    elif not pool.snapshots:
        why = f"pool {rec.pool}'s driver takes no snapshots"
    if why is None:
        return True
    draft.error("snapshot-unsupported", why, pool=rec.pool, volume=rec.volume, **where_of(d))
    return False


def _take(
    draft: Draft,
    instance: str,
    pool_name: str,
    name: str,
    members: Sequence[tuple[DesiredDisk, DiskRecord, DiskRecord | None]],
) -> None:
    pool = draft.observed.pools[pool_name]
    domains = sorted({dom for _, rec, _ in members for dom in pool.running.get(rec.volume, ())})
    if not domains:
        consistency = Consistency.IDLE
    elif all(draft.observed.agents.get(dom, False) for dom in domains):
        consistency = Consistency.FROZEN
    else:
        consistency = Consistency.CRASH
        silent = [dom for dom in domains if not draft.observed.agents.get(dom, False)]
        d0 = members[0][0]
        draft.warn(
            "crash-consistent",
            f"snapshot {name} is taken while domain(s) {', '.join(domains)} run, and the "
            f"guest agent of {', '.join(silent)} did not answer: it is crash-consistent "
            "(as after a power cut), its disks taken at one moment",
            pool=pool_name,
            **where_of(d0),
        )
    ms = tuple(
        SnapshotMember(rec.disk, rec.volume, snapshot_name(rec.volume, name), rec.generation)
        for _, rec, _ in sorted(members, key=lambda m: m[1].disk)
    )
    first = ms[0]
    redo = next((s for _, rec, s in members if rec.disk == first.disk), None)
    pre = Precondition(
        redo.generation if redo else None,
        bool(redo) and first.key in (pool.volumes or ()),
    )
    disks = ", ".join(m.disk for m in ms)
    again = " (again: a run left it unfinished)" if any(s for _, _, s in members) else ""
    # rbd takes image snapshots one by one: with more than one disk, the domains running
    # them are paused for that window (drivers/rbd/pool.py take_snapshots), which the plan
    # says rather than a reviewer learning it from the guests.
    if domains and len(ms) > 1 and all(rec.backend is Backend.RBD for _, rec, _ in members):
        again += f"; domain(s) {', '.join(domains)} paused while its image snapshots are taken"
    draft.actions.append(
        Action(
            action=ActionKind.SNAPSHOT,
            instance=instance,
            disk=first.disk,
            pool=pool_name,
            volume=first.key,
            reason=f"snapshot {name} of disk(s) {disks}, {consistency.value}{again}",
            patch=(),
            destructive=False,
            precondition=pre,
            snapshot=SnapshotOp(name, ms, consistency.value, tuple(domains)),
        )
    )


def _delete(
    draft: Draft,
    s: DiskRecord,
    why: str,
    restores: dict[tuple[str, str, str], list[str]],
    d: DesiredDisk | None,
) -> bool:
    assert s.snapshot is not None
    name = s.snapshot.name
    where: dict[str, Any] = {"instance": s.instance, "disk": s.disk, "pool": s.pool}
    if d is not None:
        where |= where_of(d)
    users = restores.get((s.instance, s.disk, name))
    if users and s.state is RecordState.READY:
        draft.error(
            "snapshot-in-use",
            f"snapshot {name} is not deleted: the planned restore(s) of {', '.join(users)} "
            "are made from it; it goes once they are made",
            volume=s.volume,
            **where,
        )
        return False
    pool = draft.observed.pools.get(s.pool)
    if pool is None or pool.volumes is None:
        return True
    clones = pool.snapshot_users.get(s.volume)
    if clones:
        draft.error(
            "snapshot-in-use",
            f"snapshot {name} is not deleted: {', '.join(clones)} depend on it (made from "
            "it, by this host or another); delete them first",
            volume=s.volume,
            **where,
        )
        return False
    exists = s.volume in pool.volumes
    destructive = s.state is RecordState.READY and exists
    gone = "" if exists or s.state is not RecordState.READY else "; its volume is gone already"
    draft.actions.append(
        Action(
            action=ActionKind.DELETE_SNAPSHOT,
            instance=s.instance,
            disk=s.disk,
            pool=s.pool,
            volume=s.volume,
            reason=f"{why}: snapshot {name} is deleted{gone}",
            patch=(),
            destructive=destructive,
            precondition=Precondition(s.generation, exists),
            snapshot=SnapshotOp(
                name,
                (
                    SnapshotMember(
                        s.disk,
                        volume_name(s.instance, s.disk),
                        s.volume,
                        s.snapshot.disk_generation,
                    ),
                ),
            ),
        )
    )
    return True


def _restores(
    draft: Draft,
    disks: dict[tuple[str, str], DesiredDisk],
    by_disk: dict[tuple[str, str], list[Action]],
    snaps: dict[tuple[str, str], list[DiskRecord]],
) -> dict[tuple[str, str, str], list[str]]:
    """The planned restores (creates and replaces of disks made from a snapshot), each
    checked against its snapshot's record: one that cannot be made is taken out of the
    plan with its error. Returns (instance, disk, name) -> the disks restored from it."""
    out: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for key, d in sorted(disks.items()):
        src = d.spec.source
        if not isinstance(src, SnapshotSource):
            continue
        makes = [
            a for a in by_disk.get(key, ()) if a.action in (ActionKind.CREATE, ActionKind.REPLACE)
        ]
        if not makes:
            continue
        inst, disk, name = src.parts()
        pool = draft.observed.pools.get(d.spec.pool)
        if pool is not None and guards.incomplete(
            draft, pool, frozenset({"snapshots"}), "a restore from a snapshot",
            pool=d.spec.pool, volume=d.volume, **where_of(d),
        ):  # fmt: skip
            drop = set(map(id, makes))
            draft.actions = [a for a in draft.actions if id(a) not in drop]
            continue
        snap = next(
            (s for s in snaps.get((inst, disk), ()) if s.snapshot and s.snapshot.name == name),
            None,
        )
        why, missing = _restore_problem(draft, d, snap, src.snapshot)
        if why is None:
            out[(inst, disk, name)].append(f"{d.instance}/{d.spec.name}")
            continue
        if missing:
            draft.error("snapshot-missing", why, pool=d.spec.pool, volume=d.volume, **where_of(d))
        else:
            draft.error(
                "snapshot-unsupported", why, pool=d.spec.pool, volume=d.volume, **where_of(d)
            )
        drop = set(map(id, makes))
        draft.actions = [a for a in draft.actions if id(a) not in drop]
    return out


def _restore_problem(
    draft: Draft, d: DesiredDisk, snap: DiskRecord | None, ref: str
) -> tuple[str | None, bool]:
    """Why `d` cannot be restored from `snap` (None: it can), and whether it is missing."""
    if snap is None or snap.state is not RecordState.READY:
        return (
            f"the disk is to be made from snapshot {ref}, which has no ready record "
            "(not taken, or deleted); the disk is not made",
            True,
        )
    pool = draft.observed.pools.get(d.spec.pool)
    if d.spec.encryption is not None:
        why = "an encrypted disk is never made from a snapshot (snapshots are unencrypted)"
    elif snap.pool != d.spec.pool:
        why = f"the snapshot is in pool {snap.pool}, the disk in {d.spec.pool} (same pool only)"
    elif (snap.backend.value, snap.format.value) != (d.spec.backend.value, d.spec.format.value):
        why = (
            f"the snapshot is {snap.backend.value}/{snap.format.value}, the disk "
            f"{d.spec.backend.value}/{d.spec.format.value} (same layout only)"
        )
    elif snap.virtual_size > d.spec.size:
        why = f"the snapshot is {snap.virtual_size} bytes, larger than the disk ({d.spec.size})"
    elif snap.virtual_size < d.spec.size and d.spec.format in NOT_RESIZABLE:
        why = f"the disk is larger than the snapshot, and {NOT_RESIZABLE[d.spec.format]}"
    elif pool is None or not pool.snapshots:
        why = f"pool {d.spec.pool}'s driver takes no snapshots, so restores none"
    else:
        return None, False
    return f"the disk cannot be made from snapshot {ref}: {why}; it is not made", False


def _remade_refused(
    draft: Draft,
    by_disk: dict[tuple[str, str], list[Action]],
    snaps: dict[tuple[str, str], list[DiskRecord]],
    disks: dict[tuple[str, str], DesiredDisk],
) -> None:
    """A disk with snapshots is never replaced or moved (its snapshots are of the disk
    as it is, in its pool): the replace or migration is taken out with an error."""
    drop: set[int] = set()
    for key, acts in sorted(by_disk.items()):
        have = [s for s in snaps.get(key, ()) if s.state is not RecordState.DELETING]
        for a in acts:
            if a.action not in _REMADE or not have:
                continue
            names = ", ".join(s.snapshot.name for s in have if s.snapshot)
            d = disks.get(key)
            draft.error(
                "snapshot-in-use",
                f"the disk would be {'replaced' if a.action is ActionKind.REPLACE else 'moved'}"
                f", but it has snapshot(s) {names}, which are of the disk as it is: delete "
                "them first (drop them from its `snapshots` list)",
                pool=a.pool,
                volume=a.volume,
                **(where_of(d) if d else {"instance": a.instance, "disk": a.disk}),
            )
            drop.add(id(a))
    if drop:
        draft.actions = [a for a in draft.actions if id(a) not in drop]
        for key in by_disk:
            by_disk[key] = [a for a in by_disk[key] if id(a) not in drop]
