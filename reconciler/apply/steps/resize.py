"""The `resize` step (grow only), under the volume's lock:

  refuse a shrink; refuse a volume a running domain uses -> record `resizing` with the
  target size (`pending_size`; durable) -> its copy kept beside the volume (a rebuilt
  store finishes the resize from it) -> volume grown by the driver -> record `ready` with
  the new size and spec (lazily) -> its copy kept.

Crash windows (what the next run finds):
  - before `resizing`: the record as it was; the plan grows the disk again.
  - `resizing` written, the volume grown or not: the plan completes the interrupted resize
    (it takes the larger of the recorded and the pending size as the current one, so a
    disk that did grow is never "shrunk" back), and a grow to the size the volume already
    has changes nothing.
  - `ready` written, its copy not kept: the store is the record; the copy is renewed.
Growing never removes data: the old bytes stay, the new tail reads as zeros.
"""

from __future__ import annotations

from reconciler.apply.steps.context import Held, StepContext, StepResult
from reconciler.model.errors import ReconcileError
from reconciler.model.record import RecordState
from reconciler.model.units import format_size
from reconciler.util import faults


def run(ctx: StepContext, h: Held) -> StepResult:
    a, d, rec = h.action, h.driver, h.rec
    assert rec is not None and a.spec is not None
    size = int(a.spec["size"])
    if size < rec.virtual_size:
        raise ReconcileError(
            f"refusing to shrink {a.volume} from {format_size(rec.virtual_size)} to "
            f"{format_size(size)}"
        )
    users = d.attachments().running.get(rec.volume)
    if users:
        raise ReconcileError(
            f"not resizing {a.volume}: it is in use by running domain(s) {', '.join(users)}"
        )
    rec = ctx.records.change(rec, state=RecordState.RESIZING, pending_size=size)
    faults.point("record.resizing")
    d.keep_record_copy(rec)  # a rebuild from it finishes the resize
    d.resize(rec, size)
    rec = ctx.records.change(
        rec,
        durable=False,
        state=RecordState.READY,
        pending_size=None,
        virtual_size=size,
        spec=dict(a.spec),
    )
    faults.point("record.ready")
    d.keep_record_copy(rec)
    return "done", ""
