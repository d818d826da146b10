"""The ownership steps of a pool whose records hosts share (Ceph): `take-over` and
`hand-over`, under the volume's lock. Each is one compare-and-swap of the record's holder
in the pool's shared store, guarded by the generation and holder the plan saw, and
touches no volume:

  take-over: the holder changed from `Action.holder` (released, or a host whose heartbeat
  expired) to this host.
  hand-over: the holder changed from this host to released; the disk is kept, and a host
  whose manifest names it may take it.

Crash windows: before the write, nothing changed (the plan does it again); after it, the
step is done. The store's own order of writes within that one call, and what a crash
between them leaves, is drivers/rbd/records.py's (`_move`). A record that changed since
the plan fails the guard, so two hosts never both own a disk.
"""

from __future__ import annotations

from reconciler.apply.steps.context import Held, StepContext, StepResult
from reconciler.util import faults


def take_over(ctx: StepContext, h: Held) -> StepResult:
    a, rec = h.action, h.rec
    assert rec is not None and a.holder is not None
    ctx.records.take(rec, a.holder)
    faults.point("record.taken")
    return "done", f"this host now owns it (from {a.holder})"


def hand_over(ctx: StepContext, h: Held) -> StepResult:
    assert h.rec is not None
    ctx.records.release(h.rec)
    faults.point("record.handed-over")
    return "done", "the disk is kept; a host whose manifest names it may take it"
