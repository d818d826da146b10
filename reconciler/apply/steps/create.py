"""The `create` step, which also carries out `replace` (the same code: what stood in the
new disk's place goes first, replace.py), under the volume's lock:

  [replace.py: the old location deleted, or the volume at this name removed after a
  durable `deleting`] -> record `creating` (durable; it names the cache entry the disk is
  made from, so `cache gc` cannot take it meanwhile, and an encrypted disk's new libvirt
  secret UUID) -> [encrypted: a new key defined as that secret, `secret.defined`,
  host/keys.py] -> volume made by the driver
  (create_from_image: cache entry filled, then a clone or copy; create_from_template) ->
  record `ready` (lazily; its backing now only what the disk depends on) -> the record's
  copy kept beside the volume.

Crash windows (what the next run finds):
  - `creating` written, the volume not made, partial, or whole: the record and perhaps a
    volume that holds no one's data; the next plan makes the disk again (removing the
    volume first, replace.py) or, when the manifest no longer names it, deletes it.
  - `ready` written, its copy not kept on the volume: the store is the record; the copy
    is renewed from it (drivers: renew_record_copies).
  - an encrypted disk's secret defined, the volume not (wholly) made: a `creating` record
    naming the secret; making it again (or deleting it) removes the volume, then the
    secret, then writes a new secret UUID. So no secret outlives the record naming it.
A create that fails (not a crash) is rolled back at once: the volume it made removed,
then its record; never a volume it did not make (VolumeExists). Ctrl-C leaves the
`creating` record for the next run, as a crash would.

Checks under the lock: a volume at the name without a record is someone else's and is
left untouched (the create fails); replace.py asks whether a domain uses what it removes.
"""

from __future__ import annotations

from typing import Any

from reconciler.apply.steps import replace, snapshot
from reconciler.apply.steps.context import Held, StepContext, StepResult, volume_exists
from reconciler.apply.steps.keyed import erase_key, keyed
from reconciler.drivers.api import ManagingDriver, VolumeExists, snapshots_of
from reconciler.drivers.host import keys
from reconciler.model.errors import ReconcileError
from reconciler.model.plan import Action, ActionKind
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.manifest import TemplateSource
from reconciler.util import faults
from reconciler.util.logs import get_logger

log = get_logger(__name__)


def run(ctx: StepContext, h: Held) -> StepResult:
    """A `create` or a `replace`: the old location first, when the disk moves."""
    if h.action.action is ActionKind.REPLACE:  # never a disk with snapshots (the plan's too)
        for old in (h.rec, h.rec_old):
            if old is not None and old.state is RecordState.READY:
                snapshot.refuse_if_snapshotted(ctx, old, "replacing")
    replace.clear_old_location(ctx, h)
    make(ctx, h.action, h.driver, h.rec)
    return "done", ""


def make(ctx: StepContext, a: Action, d: ManagingDriver, rec: DiskRecord | None) -> None:
    """Make `a`'s disk at its own location, where `rec` is the record found there."""
    assert a.spec is not None
    spec = dict(a.spec)
    # A restore: its snapshot locked while the disk is made from it, and checked under
    # that lock before anything changes (apply refuses what the plan refuses). The lock's
    # name is the snapshot's key, which the source names: its record is read once, under
    # the lock (a read before it as well cost a round trip per restore in a Ceph pool).
    key = snapshot.restore_key(spec)
    if key is not None:
        with d.lock(key):
            snap = snapshot.restore_source(ctx, a.pool, a.volume, spec)
            assert snap is not None
            _make(ctx, a, d, rec, spec, snap)
        return
    _make(ctx, a, d, rec, spec, None)


def _make(
    ctx: StepContext,
    a: Action,
    d: ManagingDriver,
    rec: DiskRecord | None,
    spec: dict[str, Any],
    snap: DiskRecord | None,
) -> None:
    exists = volume_exists(d, a, rec)
    if rec is None and exists:
        raise ReconcileError(
            f"volume {a.pool}/{a.volume} exists but the reconciler has no record of making "
            "it; it is left untouched"
        )
    if rec is not None and exists:
        # A partial volume from an interrupted create, or the old disk of a replace (or
        # of an interrupted delete): record the intent to remove it first, so a crash
        # here is finished next time.
        rec = replace.clear_in_place(ctx, d, a.volume, rec)
    elif rec is not None:
        # A create or delete stopped with no volume left: the secret its record names
        # (if it was defined) goes before a new record names another.
        erase_key(d, rec)
    gen = rec.generation if rec else None
    new = DiskRecord(
        kind=RecordKind.DISK,
        backend=Backend(spec["backend"]),
        pool=a.pool,
        volume=a.volume,
        instance=a.instance,
        disk=a.disk,
        format=DiskFormat(spec["format"]),
        virtual_size=int(spec["size"]),
        spec=spec,
        source=dict(spec["source"]),
        # While it is made, a disk references the cache entry it is made from, so the
        # entry cannot be collected under it; once ready, only what it depends on.
        backing=snap.backing if snap is not None else d.entry_for(spec),
        state=RecordState.CREATING,
        generation=(gen or 0) + 1,
        # As planned (the pool's); the driver makes the disk as its record says.
        preallocation=a.preallocation,
        # A new secret UUID (never a key), recorded before the secret or volume exists.
        encryption=keys.new_encryption(spec),
    )
    ctx.records.add(new, gen)
    faults.point("record.creating")
    try:
        with keyed(d, new):
            if snap is not None:
                snapshots_of(d).restore_snapshot(snap, new)
            elif "image" in new.source:
                d.create_from_image(new, new.source["image"])
            else:
                d.create_from_template(new, TemplateSource.model_validate(new.source))
    except BaseException as e:
        _roll_back(ctx, d, new, e)
        raise
    backing = snap.backing if snap is not None else d.backing_for(spec)
    ready = ctx.records.change(new, durable=False, state=RecordState.READY, backing=backing)
    faults.point("record.ready")
    d.keep_record_copy(ready)


def _roll_back(ctx: StepContext, d: ManagingDriver, rec: DiskRecord, err: BaseException) -> None:
    """Remove what a failed create left, then its record; never mask the first error."""
    if isinstance(err, KeyboardInterrupt):
        return  # the record stays `creating`; the next run removes the partial volume
    try:
        if not isinstance(err, VolumeExists):  # never remove a volume we did not make
            d.delete_volume(rec.volume)
        erase_key(d, rec)
        ctx.records.remove(rec)
    except Exception as e:
        log.warning("apply.rollback_failed", volume=rec.volume, error=str(e))
