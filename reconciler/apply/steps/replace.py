"""What goes before a disk is made where another stood: the first half of a `replace`,
and of a `create` that redoes an interrupted create or delete or moves a disk made again
(create.py makes the new disk after this).

At another location (the action moves the disk, `Action.replaces`), under that volume's
lock as well: the old disk is deleted exactly as the `delete` step does (delete.py:
check_unused -> record `deleting` -> volume removed -> record removed), and only then is
the new one made. A crash between leaves the old location `deleting` (finished next
time) or gone, and the new one not begun: the next plan makes the disk again.

In place (a volume already at the disk's name, with a record):

  check_unused (unless the record is `creating`) -> record `deleting` (durable) -> volume
  removed -> its key's secret undefined, if encrypted -> [create.py: record `creating`
  over it -> ...]

Crash windows: before `deleting`, the record and volume as they were (the plan is made
again); after it, a `deleting` record, with or without its volume, which the next run
makes again (or finishes deleting, when the manifest no longer names the disk). The
record is never absent while the volume is there. Only the partial volume of an
interrupted create (record `creating`) holds no one's data, so it alone is removed
without asking libvirt whether a domain uses it: an interrupted delete's volume is asked
about as "making again", a replaced disk as "replacing".
"""

from __future__ import annotations

from reconciler.apply.steps import delete
from reconciler.apply.steps.context import Held, StepContext, moved
from reconciler.apply.steps.keyed import erase_key
from reconciler.drivers.api import ManagingDriver, check_unused
from reconciler.model.record import DiskRecord, RecordState
from reconciler.util import faults


def clear_old_location(ctx: StepContext, h: Held) -> None:
    """Delete the disk at the action's old location, if it moves and one is recorded."""
    a = h.action
    if a.replaces and moved(a) and h.rec_old is not None:
        with ctx.lock(a.replaces):
            delete.remove(ctx, ctx.driver(a.replaces[0]), h.rec_old)


def clear_in_place(ctx: StepContext, d: ManagingDriver, volume: str, rec: DiskRecord) -> DiskRecord:
    """Remove `volume` (`rec` is its record), recording the intent first; returns the
    record written (`deleting`), whose generation the new disk's record is written over."""
    if rec.state is RecordState.DELETING:
        check_unused(d, volume, "making again")
    elif rec.state is not RecordState.CREATING:
        check_unused(d, volume, "replacing")
    rec = ctx.records.change(rec, state=RecordState.DELETING)
    faults.point("record.deleting")
    d.delete_volume(volume)
    erase_key(d, rec)  # crypto-erase: the key goes with its volume
    return rec
