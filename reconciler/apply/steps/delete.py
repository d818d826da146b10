"""The `delete` step (and its redo after an interrupted delete) and the `release` step.

Delete, under the volume's lock:

  check_unused (the volume exists and its record is not `creating`) -> record `deleting`
  (durable; skipped when the record already says so: the redo of an interrupted delete)
  -> a migrating disk's partial copy removed (migrate.drop_partial_copy) -> volume removed
  -> an encrypted disk's key secret undefined (`secret.undefined`: crypto-erase, whatever
  of its bytes a file system or LVM still holds no longer decrypts) -> record removed
  (lazily; the run's final sync makes it durable).

Crash windows (what the next run finds, and what its plan does):
  - before `deleting` is written: the record as it was and its volume; deleted again.
  - `deleting` written, volume not yet removed: a `deleting` record and its volume, whose
    data was given up when the delete began; the delete is finished (or, when the
    manifest names the disk again, it is made again: replace.py removes the volume first).
  - volume removed, record not yet removed (or not yet durable at a power cut): a
    `deleting` record without a volume; its secret is undefined (again: one already gone
    is fine) and the record removed. A secret is never undefined before its volume is
    removed, and never left after its record is.
A volume is only ever removed after a durable record says it is being deleted, and a
volume some defined domain uses is never removed (drivers/api.py: check_unused, asked
now under the lock: the plan's own check is as old as the plan). A `creating` record's
volume is partial, ours alone: it is removed without asking.

Release (deletionPolicy Retain): the record removed (lazily), the volume kept. A crash
before the removal leaves the record, and the next plan releases it again.
"""

from __future__ import annotations

from reconciler.apply.steps.context import Held, StepContext, StepResult
from reconciler.apply.steps.keyed import erase_key
from reconciler.apply.steps.migrate import drop_partial_copy
from reconciler.drivers.api import ManagingDriver, check_unused
from reconciler.model.record import DiskRecord, RecordState
from reconciler.util import faults


def run(ctx: StepContext, h: Held) -> StepResult:
    assert h.rec is not None
    remove(ctx, h.driver, h.rec)
    return "done", ""


def remove(ctx: StepContext, d: ManagingDriver, rec: DiskRecord) -> None:
    """Delete `rec`'s volume and then the record; the caller holds the volume's lock."""
    if d.volume_exists(rec.volume) and rec.state is not RecordState.CREATING:
        check_unused(d, rec.volume, "deleting")
    if rec.state is not RecordState.DELETING:
        rec = ctx.records.change(rec, state=RecordState.DELETING)
        faults.point("record.deleting")
    if rec.migration is not None:
        drop_partial_copy(ctx, rec)
    d.delete_volume(rec.volume)
    erase_key(d, rec)
    ctx.records.remove(rec, durable=False)
    faults.point("record.deleted")


def release(ctx: StepContext, h: Held) -> StepResult:
    """Forget the disk; its volume stays, no longer managed."""
    assert h.rec is not None
    ctx.records.remove(h.rec, durable=False)
    faults.point("record.released")
    return "done", "the volume is kept and no longer managed"
