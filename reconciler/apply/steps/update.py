"""The `update` step: a record-only change (no change to the volume), under its lock:

  record written with the new spec, `ready` (durable) -> its copy kept beside the volume.

Crash windows: before the write, the record as it was (the plan updates it again);
after it, only the copy on the volume lags, and it is renewed from the store. Nothing is
created or removed, so nothing can be orphaned or lost.
"""

from __future__ import annotations

from reconciler.apply.steps.context import Held, StepContext, StepResult
from reconciler.model.record import RecordState


def run(ctx: StepContext, h: Held) -> StepResult:
    a, rec = h.action, h.rec
    assert rec is not None and a.spec is not None
    rec = ctx.records.change(rec, spec=dict(a.spec), state=RecordState.READY, pending_size=None)
    h.driver.keep_record_copy(rec)
    return "done", ""
