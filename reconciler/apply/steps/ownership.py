"""The ownership steps of a pool whose records hosts share (Ceph): `take-over` and
`hand-over`, under the volume's lock. Each is one compare-and-swap of the record's holder
in the pool's shared store, guarded by the generation and holder the plan saw, and
touches no volume:

  take-over: the holder changed from `Action.holder` (released, or a host whose heartbeat
  expired) to this host.
  hand-over: the holder changed from this host to released; the disk is kept, and a host
  whose manifest names it may take it.

An encrypted disk handed over loses its secret on this host's daemon before the release
when the pool has a key source (which keeps the key for the next owner), never without
one (the secret is then the key's only home). A disk taken over gets its secret on this
host's daemon from the pool's key source before the take-over's write
(drivers/host/keys.py: restore); a crash between leaves a secret whose record another
host still holds, which the next take-over defines again.

Crash windows: before the write, nothing changed (the plan does it again); after it, the
step is done. The store's own order of writes within that one call, and what a crash
between them leaves, is drivers/rbd/records.py's (`_move`). A record that changed since
the plan fails the guard, so two hosts never both own a disk.
"""

from __future__ import annotations

from reconciler.apply.steps.context import Held, StepContext, StepResult
from reconciler.drivers.api import encrypts_of
from reconciler.drivers.host import keys
from reconciler.drivers.host.store import RELEASED
from reconciler.util import faults


def take_over(ctx: StepContext, h: Held) -> StepResult:
    a, rec = h.action, h.rec
    assert rec is not None and a.holder is not None
    if rec.encryption is not None:
        # Its key from the pool's key source into this daemon's secret, before the record
        # is ours: a take-over that cannot have the key changes nothing (the plan refuses
        # one without a source).
        e = encrypts_of(h.driver)
        keys.restore(e.secrets(), rec, e.key_usage(rec.volume))
    ctx.records.take(rec, a.holder)
    faults.point("record.taken")
    # Its snapshots come with it: their records were released by the hand-over before
    # the disk's (RELEASED holds them); one taken from a host that was gone stays its
    # until that host's records are taken one by one, as disks' are.
    for snap in ctx.records.released_snapshots(rec.pool, rec.instance, rec.disk):
        ctx.records.take(snap, RELEASED)
        faults.point("record.snapshot.taken")
    return "done", f"this host now owns it (from {a.holder})"


def hand_over(ctx: StepContext, h: Held) -> StepResult:
    rec = h.rec
    assert rec is not None
    if rec.encryption is not None:
        secrets = encrypts_of(h.driver).secrets()
        if secrets.source is not None:
            # The key stays in the pool's key source for the next owner; this host's copy
            # goes first (a crash before the release leaves this host the owner of a disk
            # whose key the source still holds, handed over again next run). Without a
            # source the secret stays: it is the key's only home.
            secrets.undefine(rec.encryption.secret, rec.volume)
    # The disk's snapshots go with it, released before the disk: a crash between leaves
    # the disk this host's, handed over again by the next run, never a snapshot record
    # this host holds of a disk it no longer has (which its next plan would delete).
    for snap in ctx.records.snapshots(rec.instance, rec.disk):
        if snap.pool == rec.pool:
            ctx.records.release(snap)
            faults.point("record.snapshot.handed-over")
    ctx.records.release(rec)
    faults.point("record.handed-over")
    return "done", "the disk is kept; a host whose manifest names it may take it"
