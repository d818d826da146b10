"""The planner: a pure function from desired and observed state to a Plan.

No libvirt, no clock, no randomness: the same inputs give the same Plan, and its JSON is
byte-identical. Everything that is not a safe action becomes an error or a warning.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonpatch

from reconciler.model.desired import Desired, DesiredDisk, DesiredInstance
from reconciler.model.naming import TEMP_PREFIX, migration_name
from reconciler.model.observed import Holder, Observed, ObservedPool
from reconciler.model.plan import (
    Action,
    ActionKind,
    Plan,
    Precondition,
    Problem,
    ProblemCode,
    Severity,
)
from reconciler.model.record import DiskRecord, MigrationPhase, RecordKind, RecordState
from reconciler.model.units import format_size
from reconciler.schema.common import NOT_RESIZABLE

# Entries of a pool that are not volumes anyone made: an ext4 pool's lost+found.
NOT_VOLUMES = frozenset({"lost+found"})
# How many names a grouped report shows before "and N more".
SHOWN = 10

# Fields whose change cannot be applied to an existing volume in place.
REPLACE_FIELDS = ("backend", "pool", "format", "source")
# Of those, the ones a migration carries out (a copy keeps the data; a new source does not).
MIGRATE_FIELDS = frozenset({"backend", "pool", "format"})
# What a migration is judged by, in the pool it copies out of and the one it copies into
# (ObservedPool's fields, by name, as an older exported state may lack them).
SOURCE_FACTS = frozenset({"layouts", "allocated"})
TARGET_FACTS = frozenset({"layouts", "available", "thick_unit"})


def layout(spec: Mapping[str, Any]) -> str:
    """A disk's layout as drivers name what they can migrate: `backend/format`."""
    return f"{spec['backend']}/{spec['format']}"


def migration_need(rec: DiskRecord, pool: ObservedPool, size: int, thick_unit: int = 0) -> int:
    """Bytes a copy of `rec` (in `pool`) may take in its target, made `size` bytes large: what
    the volume and the cache entry it is backed by occupy (a flattened copy holds both),
    never more than its size, plus room for a qcow2's tables. Where the source pool could
    not say, the whole size. A target whose copies are thick (`thick_unit`, see
    ObservedPool) takes the whole size, rounded up to its unit, whatever the data."""
    if thick_unit > 0:
        return -(-size // thick_unit) * thick_unit
    used = pool.allocated.get(rec.volume)
    if used is not None and rec.backing is not None:
        entry = pool.allocated.get(rec.backing)
        used = None if entry is None else used + entry
    data = size if used is None else min(used, size)
    return data + size // 4096 + (1 << 20)


@dataclass(frozen=True)
class PlanOptions:
    allow_replace: bool = False
    prune: bool = False
    # Hand over (not delete) this host's disks in pools many hosts share when no manifest
    # names their instance: only when every manifest has been read (--prune, or the loop).
    hand_over: bool = False
    force: bool = False
    max_delete_percent: int = 10


def _patch(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> tuple[dict[str, Any], ...]:
    ops = jsonpatch.make_patch(dict(before or {}), dict(after or {})).patch
    return tuple(ops)


def describe_source(source: Mapping[str, Any]) -> str:
    if "image" in source:
        return f"image {source['image']}"
    label = f" labelled {source['label']!r}" if source.get("label") else ""
    return f"template {source.get('template')}{label}"


class _Planner:
    def __init__(self, desired: Desired, observed: Observed, options: PlanOptions) -> None:
        self.desired = desired
        self.observed = observed
        self.options = options
        self.actions: list[Action] = []
        self.errors: list[Problem] = []
        self.warnings: list[Problem] = []
        self.bad = {(b.pool, b.volume): b for b in observed.bad_records}
        self.records: dict[str, list[DiskRecord]] = defaultdict(list)
        self.disk_records = 0
        self.blocked: dict[str, list[str]] = defaultdict(list)
        # Every volume a record (readable or not) explains, disks and cache entries alike.
        self.recorded: dict[str, set[str]] = defaultdict(set)
        for b in observed.bad_records:
            self.recorded[b.pool].add(b.volume)
        for name, p in observed.pools.items():
            self.recorded[name].update(p.held)  # another host's records explain these
        for r in observed.records:
            self.recorded[r.pool].add(r.volume)
            if r.migration is not None:  # the copy is the record's, not a stranger
                self.recorded[r.migration.pool].add(r.migration.volume)
            if r.kind is RecordKind.DISK:
                self.records[r.instance].append(r)
                self.disk_records += 1
        # Volumes without a record that an error already names (not listed again).
        self.reported: set[tuple[str, str]] = set()
        # Bytes the plan's migrations so far will write into each pool.
        self.claimed: dict[str, int] = defaultdict(int)

    # -- problems ---------------------------------------------------------------------

    # A code is a ProblemCode's value (a string not declared there fails here, and
    # tests/test_problem_codes.py finds it in this file before it runs).
    def error(self, code: str, message: str, **where: Any) -> None:
        self.errors.append(Problem(Severity.ERROR, ProblemCode(code), message, **where))

    def warn(self, code: str, message: str, **where: Any) -> None:
        self.warnings.append(Problem(Severity.WARNING, ProblemCode(code), message, **where))

    def pool(self, name: str, subject: str) -> ObservedPool | None:
        """The observed pool, or None when it cannot be used (reported once per pool)."""
        p = self.observed.pools.get(name)
        if p is None or p.volumes is None:
            self.blocked[name].append(subject)
            return None
        return p

    def incomplete(
        self, pool: ObservedPool, facts: frozenset[str], needs: str, /, **where: Any
    ) -> bool:
        """True (with an error) when the observation lacks `facts` of `pool` (an exported
        state that does not carry them): what depends on them is not planned from a default."""
        lacks = sorted(f for f in facts if f in pool.unknown)
        if not lacks:
            return False
        why = "; ".join(dict.fromkeys(pool.unknown[f] for f in lacks))
        self.error(
            "state-incomplete",
            f"{needs} cannot be judged from the observed state, which does not say "
            f"{', '.join(lacks)} of pool {pool.name}: {why}",
            **where,
        )
        return True

    def attached(
        self,
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
            self.error(
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
            self.error(
                "volume-in-use",
                f"not {what}: the volume is used by {kind} {', '.join(users)}",
                pool=pool.name,
                volume=volume,
                **where,
            )
            return True
        return False

    def blocked_pools(self) -> None:
        """One error per pool that cannot be used: where a disk needs it, or, for a pool
        another record store manages, always (the operator must learn of it)."""
        elsewhere = {n for n, p in self.observed.pools.items() if p.managed_elsewhere}
        for name in sorted(self.blocked.keys() | elsewhere):
            p = self.observed.pools.get(name)
            why = p.error if p is not None and p.error else "not observed"
            disks = sorted(set(self.blocked.get(name, ())))
            shown = ", ".join(disks[:5]) + (f" and {len(disks) - 5} more" if len(disks) > 5 else "")
            if name in elsewhere:
                tail = (
                    f"; nothing is done for {len(disks)} disk(s) in it ({shown})" if disks else ""
                )
                self.error("pool-managed-elsewhere", f"{why}{tail}", pool=name)
                continue
            self.error(
                "pool-unreachable",
                f"pool {name} cannot be used: {why}; nothing is done for "
                f"{len(disks)} disk(s) in it ({shown})",
                pool=name,
            )

    def strangers(self) -> None:
        """One warning per pool for the volumes no record explains: never touched."""
        for name in sorted(self.observed.pools):
            p = self.observed.pools[name]
            if p.volumes is None:
                continue
            known = self.recorded.get(name, set())
            found = sorted(
                v
                for v in p.volumes - known - NOT_VOLUMES
                if not v.startswith(TEMP_PREFIX) and (name, v) not in self.reported
            )
            if not found:
                continue
            shown = ", ".join(found[:SHOWN])
            more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
            self.warn(
                "unmanaged-volumes",
                f"pool {name} holds {len(found)} volume(s) the reconciler has no record of; "
                f"they are left untouched (adopt them explicitly or remove them by hand): "
                f"{shown}{more}",
                pool=name,
            )

    def entry_refused(self, d: DesiredDisk, pool: ObservedPool, where: Mapping[str, Any]) -> bool:
        """True (with an error) when the cache entry a create needs cannot be used: apply
        would refuse it, so the plan says so instead of showing a clean create."""
        entry = d.entry
        if entry is None or pool.volumes is None or entry not in pool.volumes:
            return False
        if (pool.name, entry) in self.bad:
            self.error(
                "cache-entry-unreadable",
                f"the disk is made from cache entry {entry}, whose record is unreadable; "
                "nothing is made from it",
                pool=pool.name,
                volume=entry,
                **where,
            )
            return True
        if entry in self.recorded.get(pool.name, ()):
            return False
        self.reported.add((pool.name, entry))
        self.error(
            "cache-entry-unmanaged",
            f"the disk is made from cache entry {entry}, but a volume of that name exists in "
            f"pool {pool.name} without a record; it is left untouched, and the disk cannot be "
            "made until it is removed by hand",
            pool=pool.name,
            volume=entry,
            **where,
        )
        return True

    # -- the plan ---------------------------------------------------------------------

    def run(self) -> Plan:
        by_instance: dict[str, list[DesiredInstance]] = defaultdict(list)
        for inst in self.desired.instances:
            by_instance[inst.instance].append(inst)
        failed_instances: set[str] = set()
        unknown_failed = 0
        for f in self.desired.failed:
            self.error("manifest-invalid", f.message, file=f.file, line=f.line, instance=f.instance)
            if f.instance is None:
                unknown_failed += 1
            else:
                failed_instances.add(f.instance)

        for uuid, insts in by_instance.items():
            if len(insts) > 1:
                files = ", ".join(sorted(i.file for i in insts))
                for i in insts:
                    self.error(
                        "conflict",
                        f"instance {uuid} is claimed by several manifests ({files}); "
                        "none of them is applied until one remains",
                        instance=uuid,
                        file=i.file,
                    )
                continue
            if uuid in failed_instances:
                # Another manifest for this instance failed to load: it may be the real one.
                self.error(
                    "conflict",
                    f"instance {uuid} also has a manifest that failed to load; "
                    "nothing is done for it until that is fixed",
                    instance=uuid,
                    file=insts[0].file,
                )
                continue
            self.instance(insts[0])

        for uuid in sorted(self.records.keys() - by_instance.keys() - failed_instances):
            for rec in sorted(self.records[uuid], key=lambda r: (r.disk, r.pool)):
                self.orphan(rec, unknown_failed)

        for b in self.observed.bad_records:
            self.error(
                "record-unreadable",
                f"{b.error}; work on this volume stops",
                pool=b.pool,
                volume=b.volume,
            )
        self.blocked_pools()
        self.strangers()
        self.header_warnings()
        self.delete_threshold()

        self.actions.sort(key=lambda a: (a.instance, a.disk, a.pool, a.action.value))
        return Plan(
            tuple(self.actions),
            tuple(sorted(self.errors, key=Problem.sort_key)),
            tuple(sorted(self.warnings, key=Problem.sort_key)),
        )

    def instance(self, inst: DesiredInstance) -> None:
        records = self.records.get(inst.instance, [])
        if inst.deleted:
            for rec in sorted(records, key=lambda r: (r.disk, r.pool)):
                self.remove(rec, f"instance deleted (tombstone in {inst.file})")
            return
        by_disk: dict[str, list[DiskRecord]] = defaultdict(list)
        for r in records:
            by_disk[r.disk].append(r)
        for d in inst.disks:
            recs = _moving(by_disk.pop(d.spec.name, []))
            if len(recs) > 1:
                where = ", ".join(sorted(f"{r.pool}/{r.volume}" for r in recs))
                self.error(
                    "record-conflict",
                    f"disk has several records ({where}); resolve by hand",
                    instance=d.instance,
                    disk=d.spec.name,
                    file=d.file,
                    line=d.line,
                )
                continue
            self.disk(d, recs[0] if recs else None)
        for name in sorted(by_disk):
            for rec in by_disk[name]:
                self.remove(rec, f"disk {name} is no longer in the manifest {inst.file}")

    def disk(self, d: DesiredDisk, rec: DiskRecord | None) -> None:
        spec = d.spec.spec_dict()
        where: dict[str, Any] = {
            "instance": d.instance,
            "disk": d.spec.name,
            "file": d.file,
            "line": d.line,
        }
        subject = f"{d.instance}/{d.spec.name}"
        pool = self.pool(d.spec.pool, subject)
        if pool is None:
            return
        assert pool.volumes is not None
        bad = self.bad.get((d.spec.pool, d.volume))
        if bad is not None:
            return  # reported once with the other unreadable records
        held = pool.held.get(d.volume)
        if rec is None and held is not None:
            self.held(d, pool, held, where)
            return
        if rec is None and d.volume not in pool.volumes:
            needs = "whether another host holds this disk's record"
            if self.incomplete(pool, frozenset({"shared", "held"}), needs, pool=pool.name, **where):
                return
        if rec is None:
            if d.volume in pool.volumes:
                self.reported.add((d.spec.pool, d.volume))
                self.error(
                    "unmanaged-volume",
                    f"volume {d.volume} exists in pool {d.spec.pool} but the reconciler has "
                    "no record of making it; it is left untouched (adopt it explicitly or "
                    "remove it by hand)",
                    pool=d.spec.pool,
                    volume=d.volume,
                    **where,
                )
                return
            self.add(
                ActionKind.CREATE,
                d,
                spec,
                None,
                f"new disk: {d.spec.format} {format_size(d.spec.size)} from "
                f"{describe_source(spec['source'])}",
                Precondition(None, False),
            )
            return

        rpool = self.pool(rec.pool, subject) if rec.pool != d.spec.pool else pool
        if rpool is None:
            return
        assert rpool.volumes is not None
        exists = rec.volume in rpool.volumes
        pre = Precondition(rec.generation, exists)
        moved = (rec.pool, rec.volume) != (d.spec.pool, d.volume)
        if rec.migration is not None:  # its copy is where the disk goes: ours
            self.resume_migration(d, spec, rec, rpool, pre, where)
            return
        # Where the disk goes is the old record's to replace, never another owner's volume.
        if moved and d.volume in pool.volumes:
            self.reported.add((d.spec.pool, d.volume))
            self.error(
                "unmanaged-volume",
                f"the disk moves to pool {d.spec.pool}, where volume {d.volume} exists but "
                "the reconciler has no record of making it; it is left untouched",
                pool=d.spec.pool,
                volume=d.volume,
                **where,
            )
            return
        # The precondition describes the old location, so a moved action names it.
        old = (rec.pool, rec.volume) if moved or exists else None
        if rec.state is RecordState.CREATING:
            self.add(
                ActionKind.CREATE,
                d,
                spec,
                rec,
                "an interrupted create is redone (the partial volume holds no user data)",
                pre,
                replaces=old,
            )
            return
        if rec.state is RecordState.DELETING:
            if exists and self.attached(rpool, rec.volume, "made again", **where):
                return
            self.warn(
                "interrupted-delete",
                f"volume {rec.volume} was being deleted when a run stopped; it is made "
                "again from its source",
                pool=rec.pool,
                volume=rec.volume,
                **where,
            )
            self.add(
                ActionKind.CREATE,
                d,
                spec,
                rec,
                "an interrupted delete left the disk unusable; it is made again",
                pre,
                destructive=exists,
                replaces=old,
            )
            return

        changed = [f for f in REPLACE_FIELDS if rec.spec.get(f) != spec.get(f)]
        if changed:
            what = "; ".join(
                f"{f} {self._show(f, rec.spec.get(f))} -> {self._show(f, spec.get(f))}"
                for f in changed
            )
            migratable = set(changed) <= MIGRATE_FIELDS and rec.state is RecordState.READY
            if migratable and self.migrate(d, spec, rec, pool, rpool, what, pre, where):
                return
            if not self.options.allow_replace:
                self.error(
                    "replace-required",
                    f"{what}: this needs the disk deleted and made again, which destroys "
                    "its data; re-run with --allow-replace to do that",
                    pool=rec.pool,
                    volume=rec.volume,
                    **where,
                )
                return
            if exists and self.attached(rpool, rec.volume, "replaced", **where):
                return
            self.add(
                ActionKind.REPLACE,
                d,
                spec,
                rec,
                f"{what}: the disk is deleted and made again",
                pre,
                destructive=exists,
                replaces=(rec.pool, rec.volume),
            )
            return
        if not exists:
            self.warn(
                "drift",
                f"volume {rec.volume} is missing from pool {rec.pool}: it was "
                "removed outside the reconciler",
                pool=rec.pool,
                volume=rec.volume,
                **where,
            )
            self.add(
                ActionKind.CREATE,
                d,
                spec,
                rec,
                "the volume is missing from the pool (drift); it is made again",
                pre,
            )
            return
        target = d.spec.size
        current = rec.virtual_size
        interrupted = rec.state is RecordState.RESIZING
        if interrupted and rec.pending_size is not None:
            # The volume may already have grown before the run stopped.
            current = max(current, rec.pending_size)
        if target < current:
            self.error(
                "shrink-refused",
                f"size {format_size(target)} is smaller than the disk's {format_size(current)}; "
                "shrinking would cut off data and is refused",
                pool=rec.pool,
                volume=rec.volume,
                **where,
            )
            return
        if target > current and rec.format in NOT_RESIZABLE:
            self.error(
                "resize-unsupported",
                f"size {format_size(current)} -> {format_size(target)}: "
                f"{NOT_RESIZABLE[rec.format]}; make a new disk of the new size (a new disk "
                f"name) and copy the data into it, or keep the size at {format_size(current)}",
                pool=rec.pool,
                volume=rec.volume,
                **where,
            )
            return
        if target > current or interrupted:
            if self.attached(pool, rec.volume, "resized", running_only=True, **where):
                return
            note = " (completing an interrupted resize)" if interrupted else ""
            self.add(
                ActionKind.RESIZE,
                d,
                spec,
                rec,
                f"grow {format_size(rec.virtual_size)} -> {format_size(target)}{note}",
                pre,
            )
            return
        if rec.spec != spec:
            self.add(
                ActionKind.UPDATE, d, spec, rec, "record-only change (no change to the volume)", pre
            )

    # -- migrations -------------------------------------------------------------------

    def migrate(
        self,
        d: DesiredDisk,
        spec: dict[str, Any],
        rec: DiskRecord,
        pool: ObservedPool,
        rpool: ObservedPool,
        what: str,
        pre: Precondition,
        where: dict[str, Any],
    ) -> bool:
        """A disk whose pool, backend or format changed: copied, verified, switched. Every
        reason apply would refuse it is an error here, before anything is copied. False
        where no driver can copy it and --allow-replace asks for a replace instead."""
        assert pool.volumes is not None and rpool.volumes is not None
        at = {"pool": rec.pool, "volume": rec.volume, **where}
        if rec.volume not in rpool.volumes:
            self.warn(
                "drift",
                f"volume {rec.volume} is missing from pool {rec.pool}: it was removed outside "
                "the reconciler; there is nothing to migrate, so the disk is made anew",
                **at,
            )
            moved = (rec.pool, rec.volume) != (d.spec.pool, d.volume)
            self.add(
                ActionKind.CREATE,
                d,
                spec,
                rec,
                f"{what}: the volume is missing (drift); it is made again in the new layout",
                pre,
                replaces=(rec.pool, rec.volume) if moved else None,
            )
            return True
        # A running domain first, in those words; then any domain that names the volume
        # (its definition would point at a volume that is gone or changed format).
        if self.attached(rpool, rec.volume, "migrated", running_only=True, **where):
            return True
        if self.attached(rpool, rec.volume, "migrated", **where):
            return True
        if d.spec.size < rec.virtual_size:
            self.error(
                "shrink-refused",
                f"size {format_size(d.spec.size)} is smaller than the disk's "
                f"{format_size(rec.virtual_size)}; shrinking would cut off data and is refused",
                **at,
            )
            return True
        needs = "whether and how the disk's data can be kept"
        for p, facts in ((rpool, SOURCE_FACTS), (pool, TARGET_FACTS)):
            if self.incomplete(p, facts, needs, **at):
                return True
        src, dst = layout(rec.spec), layout(spec)
        for p, lay, way in ((rpool, src, "out of"), (pool, dst, "into")):
            if lay not in p.layouts:
                if self.options.allow_replace:
                    return False
                can = ", ".join(sorted(p.layouts)) or "none"
                self.error(
                    "migrate-unsupported",
                    f"{what}: pool {p.name}'s driver cannot copy a {lay} disk {way} it "
                    f"(it migrates {can}), so the data cannot be kept; the disk is left as "
                    "it is (--allow-replace deletes it and makes it anew, destroying its data)",
                    **at,
                )
                return True
        same_pool = rec.pool == d.spec.pool
        if same_pool and migration_name(d.volume) in pool.volumes:
            self.reported.add((pool.name, migration_name(d.volume)))
            self.error(
                "unmanaged-volume",
                f"the disk would be copied to {migration_name(d.volume)} in pool {pool.name}, "
                "which exists without a record; it is left untouched",
                **at,
            )
            return True
        need = migration_need(rec, rpool, d.spec.size, pool.thick_unit)
        if pool.available is not None and self.claimed[pool.name] + need > pool.available:
            others = self.claimed[pool.name]
            also = f" beside {format_size(others)} for other migrations" if others else ""
            self.error(
                "migrate-no-space",
                f"{what}: the copy needs up to {format_size(need)} in pool {pool.name}{also}, "
                f"which has {format_size(pool.available)} free; nothing is copied",
                **at,
            )
            return True
        self.claimed[pool.name] += need
        kept = spec["deletionPolicy"] == "Retain"
        fate = (
            "kept and no longer managed (deletionPolicy Retain)"
            if kept
            else "removed once the copy is the disk"
        )
        self.add(
            ActionKind.MIGRATE,
            d,
            spec,
            rec,
            f"{what}: the data is copied into the new layout, compared with the original, "
            f"and the record switched to the copy; the old volume is {fate}",
            pre,
            replaces=(rec.pool, rec.volume),
        )
        return True

    def resume_migration(
        self,
        d: DesiredDisk,
        spec: dict[str, Any],
        rec: DiskRecord,
        rpool: ObservedPool,
        pre: Precondition,
        where: dict[str, Any],
    ) -> None:
        """A record that holds a migration a run left unfinished: finish it (switched: the
        copy is the disk) or carry on (copying: the partial copy is made again), or roll
        it back where the manifest now asks for the old layout."""
        mig = rec.migration
        assert mig is not None
        at = {"pool": rec.pool, "volume": rec.volume, **where}
        target = self.pool(mig.pool, f"{d.instance}/{d.spec.name}")
        if target is None:
            return
        if mig.phase is MigrationPhase.SWITCHED:
            reason = (
                "an interrupted migration is finished: the verified copy is the disk, and the "
                "old volume is "
                + ("kept (deletionPolicy Retain)" if _retain(mig.spec) else "removed")
            )
            self._migrate_action(d, mig.spec, rec, mig.target(), reason, pre)
            return
        if self.attached(rpool, rec.volume, "migrated", **where):
            return
        if spec == rec.spec:
            reason = (
                "an interrupted migration is rolled back (the manifest asks for the old layout "
                "again): its partial copy is removed"
            )
            self._migrate_action(d, spec, rec, rec.key(), reason, pre)
            return
        if spec != mig.spec:
            self.error(
                "migration-changed",
                f"the disk was being migrated to {layout(mig.spec)} in pool {mig.pool} when a "
                "run stopped, and the manifest now asks for another layout; set it back to "
                f"{layout(mig.spec)} in pool {mig.pool} (the migration is finished) or to the "
                "old one (it is rolled back) first",
                **at,
            )
            return
        self._migrate_action(
            d,
            spec,
            rec,
            mig.target(),
            "an interrupted migration is carried on: its partial copy is made again",
            pre,
        )

    def _migrate_action(
        self,
        d: DesiredDisk,
        spec: Mapping[str, Any],
        rec: DiskRecord,
        to: tuple[str, str],
        reason: str,
        pre: Precondition,
    ) -> None:
        self.actions.append(
            Action(
                action=ActionKind.MIGRATE,
                instance=d.instance,
                disk=d.spec.name,
                pool=to[0],
                volume=to[1],
                reason=reason,
                patch=_patch(rec.spec, spec),
                destructive=False,
                precondition=pre,
                spec=dict(spec),
                recorded=rec.spec,
                replaces=rec.key(),
            )
        )

    @staticmethod
    def _show(field: str, value: Any) -> str:
        if field == "source" and isinstance(value, Mapping):
            return describe_source(value)
        return str(value)

    def add(
        self,
        kind: ActionKind,
        d: DesiredDisk,
        spec: dict[str, Any],
        rec: DiskRecord | None,
        reason: str,
        pre: Precondition,
        *,
        destructive: bool = False,
        replaces: tuple[str, str] | None = None,
    ) -> None:
        if kind in (ActionKind.CREATE, ActionKind.REPLACE):
            pool = self.observed.pools[d.spec.pool]
            where = {"instance": d.instance, "disk": d.spec.name, "file": d.file, "line": d.line}
            if self.entry_refused(d, pool, where):
                return
        self.actions.append(
            Action(
                action=kind,
                instance=d.instance,
                disk=d.spec.name,
                pool=d.spec.pool,
                volume=d.volume,
                reason=reason,
                patch=_patch(rec.spec if rec else None, spec),
                destructive=destructive,
                precondition=pre,
                spec=spec,
                recorded=rec.spec if rec else None,
                replaces=replaces,
            )
        )

    def remove(self, rec: DiskRecord, why: str) -> None:
        """Plan the removal of a recorded disk that is no longer wanted."""
        pool = self.pool(rec.pool, f"{rec.instance}/{rec.disk}")
        if pool is None or (rec.pool, rec.volume) in self.bad:
            return
        assert pool.volumes is not None
        exists = rec.volume in pool.volumes
        pre = Precondition(rec.generation, exists)
        common: dict[str, Any] = {
            "instance": rec.instance,
            "disk": rec.disk,
            "pool": rec.pool,
            "volume": rec.volume,
            "precondition": pre,
            "recorded": rec.spec,
        }
        unfinished = rec.state in (RecordState.CREATING, RecordState.DELETING)
        if rec.spec.get("deletionPolicy") == "Retain" and not unfinished:
            self.actions.append(
                Action(
                    action=ActionKind.RELEASE,
                    reason=f"{why}; deletionPolicy Retain keeps the "
                    "volume and the reconciler forgets it",
                    patch=_patch(rec.spec, None),
                    destructive=False,
                    **common,
                )
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
        if destructive and self.attached(
            pool, rec.volume, "deleted", instance=rec.instance, disk=rec.disk
        ):
            return
        self.actions.append(
            Action(
                action=ActionKind.DELETE,
                reason=reason,
                patch=_patch(rec.spec, None),
                destructive=destructive,
                **common,
            )
        )

    def held(
        self, d: DesiredDisk, pool: ObservedPool, held: Holder, where: Mapping[str, Any]
    ) -> None:
        """A disk another host holds (its record, or its instance's claim): taken over
        when it is free, else a warning, for a live owner is the normal state while an
        instance moves (so a one-shot run here still exits 0); either way nothing else is
        done to it in this pass."""
        if not held.free:
            self.warn(
                "owned-elsewhere",
                f"the disk is owned by {held.why}; this host changes nothing until that "
                "host releases it (its manifest is gone there) or its heartbeat expires",
                pool=pool.name,
                volume=d.volume,
                **where,
            )
            return
        self.actions.append(
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

    def hand_over(self, rec: DiskRecord) -> None:
        pool = self.observed.pools.get(rec.pool)
        self.actions.append(
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

    def orphan(self, rec: DiskRecord, unknown_failed: int) -> None:
        where: dict[str, Any] = {
            "instance": rec.instance,
            "disk": rec.disk,
            "pool": rec.pool,
            "volume": rec.volume,
        }
        if rec.state in (RecordState.CREATING, RecordState.DELETING):
            self.remove(rec, "no manifest names this instance")
            return
        p = self.observed.pools.get(rec.pool)
        shared = p is not None and p.shared
        if p is not None and (self.options.prune or self.options.hand_over):
            needs = "whether the disk is handed over or deleted"
            if self.incomplete(p, frozenset({"shared"}), needs, **where):
                return
        if shared and (self.options.prune or self.options.hand_over) and unknown_failed == 0:
            self.hand_over(rec)
            return
        if self.options.prune and unknown_failed == 0 and not shared:
            self.remove(rec, "orphaned: no manifest names this instance (--prune)")
            return
        if self.options.prune:
            self.error(
                "prune-refused",
                f"not pruned: {unknown_failed} manifest(s) failed to load and may name "
                "this instance",
                **where,
            )
            return
        self.warn(
            "orphaned-record",
            "no manifest names this instance; the disk is kept and stays this host's (use "
            "--prune to hand it over to the host whose manifest names it)"
            if shared
            else "no manifest names this instance; the disk is kept (use --prune to delete "
            "orphaned disks)",
            **where,
        )

    def header_warnings(self) -> None:
        for rec in self.observed.records:
            pool = self.observed.pools.get(rec.pool)
            if pool is None:
                continue
            seen = pool.header_formats.get(rec.volume)
            if seen is not None and seen != rec.format.value:
                self.warn(
                    "format-mismatch",
                    f"the volume's header announces {seen} but the record says "
                    f"{rec.format.value}; a guest may have written that header. The record "
                    "is used; nothing is read from or through the header",
                    instance=rec.instance,
                    disk=rec.disk,
                    pool=rec.pool,
                    volume=rec.volume,
                )

    def delete_threshold(self) -> None:
        doomed = [a for a in self.actions if a.destructive]
        managed = self.disk_records + len(self.observed.bad_records)
        if not doomed or self.options.force or managed == 0:
            return
        limit = self.options.max_delete_percent
        if len(doomed) * 100 <= limit * managed:
            return
        lost = sorted(a.replaces or (a.pool, a.volume) for a in doomed)
        names = ", ".join(f"{p}/{v}" for p, v in lost[:10])
        more = f" and {len(doomed) - 10} more" if len(doomed) > 10 else ""
        self.error(
            "delete-threshold",
            f"the plan would destroy {len(doomed)} of {managed} managed disks, more than the "
            f"{limit}% limit; those actions are left out ({names}{more}). Re-run with --force "
            "if this is intended",
        )
        keep = set(map(id, doomed))
        self.actions = [a for a in self.actions if id(a) not in keep]


def _retain(spec: Mapping[str, Any]) -> bool:
    return spec.get("deletionPolicy") == "Retain"


def _moving(recs: list[DiskRecord]) -> list[DiskRecord]:
    """A disk's records, where a migration that switched to a new pool has written the
    record at the new location and not yet removed the old one: that pair is one disk,
    held by the old record (whose migration names the new one), until it is finished."""
    if len(recs) == 2:
        for old, new in (recs, recs[::-1]):
            mig = old.migration
            if (
                mig is not None
                and mig.phase is MigrationPhase.SWITCHED
                and mig.target() == new.key()
            ):
                return [old]
    return recs


def plan(desired: Desired, observed: Observed, options: PlanOptions | None = None) -> Plan:
    """Compare desired with observed state and return the ordered actions to converge."""
    return _Planner(desired, observed, options or PlanOptions()).run()
