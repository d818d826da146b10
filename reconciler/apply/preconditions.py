"""Whether the state an action was planned from still holds, checked twice.

A saved plan is applied exactly or not at all: the actions given to the executor are
those of a fresh plan that equals the saved one (schema/saved plan; never the file's
own), every precondition is checked before the first change (`refuse_if_stale`) and one
stale action refuses the whole plan. Each is checked again under its volume's lock when it
runs (`under_lock`), for a change in between. A live run re-plans a stale action's
instance instead, which is how a second reconciler started at the same time finds the
work already done and converges without touching anything.

A precondition is (record generation, volume exists) at the action's own location, or
at its old one for an action that moves a disk (`checked_at`).
"""

from __future__ import annotations

from collections.abc import Callable

from reconciler.apply.steps.context import Held, Key, StepContext, moved, volume_exists
from reconciler.drivers.api import ManagingDriver
from reconciler.drivers.host.store import StoreError
from reconciler.model.errors import ReconcileError
from reconciler.model.plan import Action, Plan
from reconciler.util.logs import get_logger

log = get_logger(__name__)


class StalePlan(ReconcileError):
    """The state an action was planned from has changed."""


# Re-plan one action's instance against fresh state.
Replanner = Callable[[Action], Plan]


def touches(a: Action) -> frozenset[Key]:
    """The volumes an action touches: actions sharing one never run at the same time."""
    keys = {(a.pool, a.volume)}
    if a.replaces:
        keys.add(a.replaces)
    if a.snapshot is not None:  # its disks, and each disk's snapshot
        keys.update((a.pool, v) for m in a.snapshot.members for v in (m.volume, m.key))
    return frozenset(keys)


def checked_at(a: Action) -> Key:
    """Where an action's precondition was observed: a move's old location."""
    if a.replaces and a.replaces != (a.pool, a.volume):
        return a.replaces
    return (a.pool, a.volume)


def _changes(want: tuple[int | None, bool], seen: tuple[int | None, bool]) -> str:
    """What differs from what the plan saw (record generation, volume exists), in words."""
    parts = []
    if want[0] != seen[0]:
        if want[0] is None:
            parts.append(f"a record now exists (generation {seen[0]})")
        elif seen[0] is None:
            parts.append(f"its record (generation {want[0]}) is gone")
        else:
            parts.append(f"its record changed (generation {want[0]} -> {seen[0]})")
    if want[1] != seen[1]:
        parts.append("the volume now exists" if seen[1] else "the volume is gone")
    return "; ".join(parts)


def refuse_if_stale(ctx: StepContext, actions: list[Action]) -> None:
    """Raise StalePlan naming every action of a saved plan whose precondition no longer
    holds, before any change: a plan is applied exactly, or not at all."""
    stale: list[str] = []
    earlier: set[Key] = set()
    for a in actions:
        keys = touches(a)
        if keys & earlier:
            continue  # follows an earlier action on its volume: checked when it runs
        earlier |= keys
        pool, volume = checked_at(a)
        subject = f"{a.action.value} {a.instance}/{a.disk} ({a.pool}/{a.volume})"
        if (pool, volume) != (a.pool, a.volume):
            subject += f", moving from {pool}/{volume}"
        want = (a.precondition.record_generation, a.precondition.volume_exists)
        try:
            rec = ctx.records.get(pool, volume)
            seen = (rec.generation if rec else None, ctx.driver(pool).volume_exists(volume))
        except StoreError:
            raise
        except ReconcileError as e:
            stale.append(f"{subject}: cannot be checked: {e}")
            continue
        if seen != want:
            stale.append(f"{subject}: {_changes(want, seen)}")
    if stale:
        raise StalePlan(
            f"the state changed since the plan was made, so none of its {len(actions)} "
            "action(s) were applied; make a new plan (reconcile --dry-run --plan-out "
            f"FILE PATH...) and apply that. {len(stale)} action(s) are stale:\n"
            + "\n".join(f"  {line}" for line in stale)
        )


def under_lock(
    ctx: StepContext, a: Action, d: ManagingDriver, replan: Replanner | None
) -> Held | str:
    """With `a.volume` locked: what the step is to work on, or why there is nothing to do
    (another run did it). A changed state raises StalePlan for a saved plan (`replan`
    None); a live run re-plans the instance and goes on only with the same action."""
    rec = ctx.records.get(a.pool, a.volume)
    exists = volume_exists(d, a, rec)
    if a.replaces and moved(a):
        # The old location is what the precondition describes.
        old = ctx.driver(a.replaces[0])
        rec_old = ctx.records.get(*a.replaces)
        seen = (rec_old.generation if rec_old else None, old.volume_exists(a.replaces[1]))
    else:
        rec_old = None
        seen = (rec.generation if rec else None, exists)
    want = (a.precondition.record_generation, a.precondition.volume_exists)
    if seen == want:
        return Held(a, d, rec, rec_old)
    if replan is None:
        raise StalePlan(
            f"the state changed since the plan was made ({_changes(want, seen)}); make a new plan"
        )
    return _replanned(ctx, a, d, replan(a))


def _replanned(ctx: StepContext, a: Action, d: ManagingDriver, again: Plan) -> Held | str:
    fresh = [x for x in again.actions if x.disk == a.disk]
    if not fresh:
        # Nothing to do now: done by another run, or refused (a volume that appeared
        # without a record is not "already in the desired state").
        refused = [e for e in again.errors if e.disk == a.disk]
        if refused:
            raise ReconcileError(
                "the state changed since planning: "
                + "; ".join(f"{e.message} [{e.code}]" for e in refused)
            )
        return "already in the desired state (another run did it)"
    if len(fresh) == 1 and fresh[0].action == a.action and not fresh[0].destructive:
        now = fresh[0]
        log.info("apply.replanned", volume=a.volume)
        is_move = now.replaces is not None and now.replaces != (a.pool, a.volume)
        old_rec = ctx.records.get(*now.replaces) if is_move and now.replaces else None
        return Held(now, d, ctx.records.get(a.pool, a.volume), old_rec)
    raise StalePlan("the state changed since planning; run again to re-plan")
