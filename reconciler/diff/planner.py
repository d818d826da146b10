"""The planner: a pure function from desired and observed state to a Plan.

No libvirt, no clock, no randomness: the same inputs give the same Plan, and its JSON is
byte-identical. Everything that is not a safe action becomes an error or a warning.

This module is the dispatch: it reads each manifest once (a manifest that failed to load,
or an instance several manifests claim, stops work on that instance), sends each disk to
the one module that answers its question, and runs the plan-wide guards last:

- ownership.py: a disk another host holds in a shared pool (take over, or wait);
- new.py: a disk without a record (create);
- migration.py: a record holding a migration a run left unfinished (finish, carry on,
  roll back), and, from changed.py, a change of layout that a copy can carry out;
- changed.py: a recorded disk the manifest still names (resize, replace, update, redo);
- removed.py: a disk no longer wanted (tombstone, a disk gone from its manifest, orphan);
- guards.py: what stops an action (attachments, unmanaged volumes, facts the observed state
  lacks, the delete threshold) and the plan-wide reports.

The state they share is one `Draft` (draft.py), passed to each: nothing else is kept.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from reconciler.diff import changed, guards, migration, new, ownership, removed, snapshots
from reconciler.diff.draft import Draft, PlanOptions, Recorded, where_of
from reconciler.model.desired import Desired, DesiredDisk, DesiredInstance
from reconciler.model.observed import Observed
from reconciler.model.plan import Plan
from reconciler.model.record import DiskRecord


def plan(desired: Desired, observed: Observed, options: PlanOptions | None = None) -> Plan:
    """Compare desired with observed state and return the ordered actions to converge."""
    draft = Draft.start(observed, options or PlanOptions())
    by_instance: dict[str, list[DesiredInstance]] = defaultdict(list)
    for inst in desired.instances:
        by_instance[inst.instance].append(inst)
    failed, unknown_failed = _failed_manifests(draft, desired)
    settled: set[str] = set()
    for uuid, insts in by_instance.items():
        if _claimed_twice(draft, uuid, insts, failed):
            continue
        draft.manifests[uuid] = insts[0].file
        settled.add(uuid)
        _instance(draft, insts[0])
    for uuid in sorted(draft.records.keys() - by_instance.keys() - failed):
        for rec in sorted(draft.records[uuid], key=lambda r: (r.disk, r.pool)):
            removed.orphan(draft, rec, unknown_failed)
    unsettled = (set(by_instance) - settled) | failed
    if unknown_failed:  # a manifest that named no instance may name any
        unsettled |= {r.instance for r in draft.observed.records}
    snapshots.plan(draft, desired, settled, unsettled)
    guards.unreadable_records(draft)
    guards.blocked_pools(draft)
    guards.strangers(draft)
    guards.header_warnings(draft)
    guards.delete_threshold(draft)
    return draft.finish()


def _failed_manifests(draft: Draft, desired: Desired) -> tuple[set[str], int]:
    """One error per manifest that failed to load; the instances they name, and how many
    named none (any of those may name any instance)."""
    failed: set[str] = set()
    unknown = 0
    for f in desired.failed:
        draft.error("manifest-invalid", f.message, file=f.file, line=f.line, instance=f.instance)
        if f.instance is None:
            unknown += 1
        else:
            failed.add(f.instance)
    return failed, unknown


def _claimed_twice(draft: Draft, uuid: str, insts: list[DesiredInstance], failed: set[str]) -> bool:
    """True (with errors) where more than one manifest may name the instance."""
    if len(insts) > 1:
        files = ", ".join(sorted(i.file for i in insts))
        for i in insts:
            draft.error(
                "conflict",
                f"instance {uuid} is claimed by several manifests ({files}); "
                "none of them is applied until one remains",
                instance=uuid,
                file=i.file,
            )
        return True
    if uuid in failed:
        # Another manifest for this instance failed to load: it may be the real one.
        draft.error(
            "conflict",
            f"instance {uuid} also has a manifest that failed to load; "
            "nothing is done for it until that is fixed",
            instance=uuid,
            file=insts[0].file,
        )
        return True
    return False


def _instance(draft: Draft, inst: DesiredInstance) -> None:
    records = draft.records.get(inst.instance, [])
    if inst.deleted:
        removed.tombstone(draft, inst, records)
        return
    by_disk: dict[str, list[DiskRecord]] = defaultdict(list)
    for r in records:
        by_disk[r.disk].append(r)
    for d in inst.disks:
        recs = migration.moving(by_disk.pop(d.spec.name, []))
        if len(recs) > 1:
            found = ", ".join(sorted(f"{r.pool}/{r.volume}" for r in recs))
            draft.error(
                "record-conflict",
                f"disk has several records ({found}); resolve by hand",
                **where_of(d),
            )
            continue
        _disk(draft, d, recs[0] if recs else None)
    for name in sorted(by_disk):
        for rec in by_disk[name]:
            removed.remove(draft, rec, f"disk {name} is no longer in the manifest {inst.file}")


def _disk(draft: Draft, d: DesiredDisk, rec: DiskRecord | None) -> None:
    """Send one manifest disk (and its record, if any) to the module for its question."""
    spec = d.spec.spec_dict()
    where: dict[str, Any] = where_of(d)
    subject = f"{d.instance}/{d.spec.name}"
    pool = draft.pool(d.spec.pool, subject)
    if pool is None:
        return
    assert pool.volumes is not None
    if (d.spec.pool, d.volume) in draft.bad:
        return  # reported once with the other unreadable records
    if rec is None:
        held = pool.held.get(d.volume)
        if held is not None:
            ownership.held(draft, d, pool, held, where)
        else:
            new.disk(draft, d, spec, pool, where)
        return
    rpool = draft.pool(rec.pool, subject) if rec.pool != d.spec.pool else pool
    if rpool is None:
        return
    assert rpool.volumes is not None
    r = Recorded(d, spec, rec, pool, rpool, where)
    if rec.migration is not None:  # its copy is where the disk goes: ours
        migration.resume(draft, r)
    else:
        changed.disk(draft, r)
