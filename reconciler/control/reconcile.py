"""What the loop does to an instance, and to everything at a resync: plan, wait, apply,
write the status, settle. The loop (reconciler/control/loop.py) decides only *when*.

A reconcile plans one instance against its own records and volumes with the one planner
and executor that `--dry-run` and apply use, applies what can be done beside what is
refused (as one-shot runs do), and maps the outcome, in one place
(reconciler/control/outcome.py), to its status, its queue action and its metric label. A
resync observes every pool and plans everything once, as a dry run does, queues the
instances with something to do and marks the others Ready.

Invariants: destructive actions of an instance a manifest still names wait until its
files have settled (index.Settling), Ready False with reason Settling meanwhile, and are
queued again when the time is up; deletions within one resync interval beyond
`safety.maxDeletePercent` of the managed disks (and more than `safety.deleteGuardFloor`)
wait, Degraded with reason DeleteGuard (`DeleteGuard`); a terminal error waits for its
manifest to change (a resync does not queue it again); an instance with neither manifest
nor disk has no status; a stopping loop leaves the rest of a plan to the restart (its
status stays Progressing until then). The status is Progressing while the steps run,
then the reconcile's end is written and settled.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from reconciler.apply.executor import ApplyResult, Executor
from reconciler.control.index import ManifestIndex, Settling
from reconciler.control.metrics import Metrics
from reconciler.control.outcome import (
    Outcome,
    QueueAction,
    applied,
    apply_failed,
    decide,
    located,
)
from reconciler.control.session import Session
from reconciler.control.status import InstanceStatus, StatusStore, now_iso, status_of
from reconciler.control.workqueue import WorkQueue
from reconciler.diff import PlanOptions, plan
from reconciler.diff.desired import build_desired
from reconciler.model import (
    Desired,
    DesiredInstance,
    FailedInput,
    Observed,
    Plan,
    Problem,
    ProblemCode,
)
from reconciler.model.record import RecordKind
from reconciler.util.logs import get_logger

log = get_logger(__name__)


class DeleteGuard:
    """Destructive actions beyond the share allowed in one resync interval wait (Degraded,
    DeleteGuard) until the limit allows them: at most `safety.maxDeletePercent` of the
    disks managed now, and always up to `safety.deleteGuardFloor`."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._deletes: deque[tuple[float, int]] = deque()  # (when, disks destroyed)
        self._lock = threading.Lock()

    def check(self, session: Session, p: Plan) -> Outcome | None:
        """None, counting the plan's deletions, if they may go; else why they wait."""
        doomed = sum(1 for a in p.actions if a.destructive)
        if not doomed:
            return None
        # The disks managed now, not as the last resync counted them: the limit (and its
        # message) follow creates and deletes made since.
        managed = sum(1 for r in session.store.load().records if r.kind is RecordKind.DISK)
        safety = session.config.safety
        now = time.monotonic()
        with self._lock:
            while self._deletes and self._deletes[0][0] < now - self.interval:
                self._deletes.popleft()
            recent = sum(n for _, n in self._deletes)
            limit = max(safety.delete_guard_floor, safety.max_delete_percent * managed / 100)
            if recent + doomed > limit:
                msg = (
                    f"{doomed} disk(s) to destroy, after {recent} in the last "
                    f"{self.interval:g} s: more than the limit of {limit:g} "
                    f"(safety.maxDeletePercent {safety.max_delete_percent}% of {managed} "
                    f"managed disks, at least safety.deleteGuardFloor "
                    f"{safety.delete_guard_floor}). Run 'reconcile --force' once, or raise the "
                    "limit and send SIGHUP"
                )
                return Outcome.failed("DeleteGuard", msg, terminal=False)
            self._deletes.append((now, doomed))
        return None


@dataclass
class Reconciler:
    """One reconcile of an instance, and a resync of everything, against the session
    the loop runs with (a new one after each reload); `enqueue` queues an instance
    (after a delay)."""

    index: ManifestIndex
    settling: Settling
    queue: WorkQueue[str]
    metrics: Metrics
    status: StatusStore
    enqueue: Callable[..., None]
    stop: threading.Event
    guard: DeleteGuard
    prune: bool
    jobs: int
    opts: PlanOptions = field(init=False)

    def __post_init__(self) -> None:
        # The loop has read every manifest: a disk of a pool many hosts share whose
        # manifest is gone is handed over (never deleted without --prune and a tombstone).
        self.opts = PlanOptions(prune=self.prune, hand_over=True, force=True)

    # -- one reconcile ----------------------------------------------------------------

    def reconcile(self, session: Session, instance: str) -> None:
        loaded, failed, _ = self.index.desired_for(instance)
        desired = session._with_entries(build_desired(loaded, failed, session.config.pools))
        # Unreadable files that name no instance may be this one's: they block --prune.
        unknown = build_desired([], self.index.unknown_failures()).failed
        wanted: tuple[DesiredInstance, ...] = desired.instances
        bad: tuple[FailedInput, ...] = desired.failed + unknown
        p = session.plan_instance(instance, wanted, bad, self.opts)
        errors = [located(e, [*failed, *self.index.unknown_failures()]) for e in p.errors]
        if p.actions:  # what can be done is done, beside what is refused (as one-shot runs)
            if self._settling(session, instance, wanted, p):
                return
            guard = self.guard.check(session, p)
            if guard is not None:
                self._write_status(session, instance, guard)
                self.settle(instance, guard)
                return
            self._write_status(session, instance, Outcome.progressing(len(p.actions)))
            result = self._apply(session, p, wanted, bad)
            if result.failed:
                first = result.failed[0]
                errors.append(apply_failed(instance, first.action.disk, first.message))
            if self.stop.is_set() and len(result.outcomes) < len(p.actions):
                return  # stopping: the rest is done after the restart
        outcome = self._outcome(instance, p, errors, list(p.warnings))
        self._write_status(session, instance, outcome)
        self.settle(instance, outcome)

    def _settling(
        self, session: Session, instance: str, wanted: tuple[DesiredInstance, ...], p: Plan
    ) -> bool:
        """Whether the plan's destructive steps wait for the manifest to settle; then the
        instance says so and is queued again once the time is up."""
        wait, held = self.settling.unsettled(instance, wanted, p)
        if wait <= 0:
            return False
        doomed = sorted({a.disk for a in p.actions if a.destructive})
        why = (
            f"a process holds {', '.join(held)} open for writing"
            if held
            else f"until the manifest has been closed and unchanged for {self.settling.settle:g} s"
        )
        msg = f"{len(doomed)} disk(s) to destroy ({', '.join(doomed)}): waiting {why}"
        # Waiting, not settled: the instance is queued again once the time is up.
        self._write_status(session, instance, Outcome.settling(msg))
        log.info("settling", instance=instance, disks=doomed, seconds=round(wait, 3))
        self.enqueue(instance, delay=wait)
        return True

    def _apply(
        self,
        session: Session,
        p: Plan,
        wanted: tuple[DesiredInstance, ...],
        bad: tuple[FailedInput, ...],
    ) -> ApplyResult:
        """Apply the plan's steps, each counted and logged (nothing goes to a terminal)."""
        with open(os.devnull, "w") as quiet:
            result = Executor(
                session.store,
                session.managing_drivers(),
                replan=lambda a: session.plan_instance(a.instance, wanted, bad, self.opts),
                out=quiet,
                jobs=self.jobs,
                stop=self.stop,
            ).apply(p.actions)
        for o in result.outcomes:
            self.metrics.actions.labels(o.action.action.value, o.status).inc()
            log.info(
                "action",
                instance=o.action.instance,
                disk=o.action.disk,
                pool=o.action.pool,
                volume=o.action.volume,
                action=o.action.action.value,
                seconds=round(o.seconds, 3),
                outcome=o.status,
                message=o.message,
            )
        return result

    def settle(self, instance: str, o: Outcome) -> None:
        """Do what the outcome's settlement says: its queue action and its metrics."""
        s = o.settled
        match s.queue:
            case QueueAction.BACKOFF:
                self.metrics.retries.inc()
                self.queue.add_rate_limited(instance)
            case QueueAction.FORGET:
                self.queue.forget(instance)
        self.metrics.reconciled(s.label)

    def _outcome(
        self, instance: str, p: Plan | None, errors: list[Problem], warnings: list[Problem]
    ) -> Outcome:
        """A reconcile's outcome (outcome.decide) from its errors and warnings: an
        instance no manifest names waits for one, one another host owns for that host."""
        orphaned = [w for w in warnings if w.code is ProblemCode.ORPHANED_RECORD]
        elsewhere = [w for w in warnings if w.code is ProblemCode.OWNED_ELSEWHERE]
        return decide(
            errors,
            done=applied(len(p.actions) if p else 0),
            elsewhere=(
                f"{len(elsewhere)} disk(s) owned by another host: {elsewhere[0].message}"
                if elsewhere
                else None
            ),
            orphaned=len(orphaned) if orphaned and not self.index.desired_for(instance)[2] else 0,
        )

    # -- the status -------------------------------------------------------------------

    def _write_status(self, session: Session, instance: str, o: Outcome) -> None:
        if (
            o.settled.label == "success"
            and not o.applying
            and not self.index.desired_for(instance)[2]
            and session.store.for_instance_by_pool(instance) == ([], {})
        ):
            # Neither a manifest nor a disk: the instance is gone, and so is its status.
            self.status.delete(instance)
            self.metrics.gone(instance)
            return
        self._save([self._status(instance, o, self.status.get(instance))])

    def _save(self, statuses: list[InstanceStatus]) -> None:
        if not statuses:
            return
        self.status.put_many(statuses)
        self.metrics.readiness((st.instance, st.is_ready()) for st in statuses)

    def _status(self, instance: str, o: Outcome, old: InstanceStatus | None) -> InstanceStatus:
        """The status `o` gives an instance whose last status was `old`: the generation
        grows when the manifest's content changed, a backoff says when it is retried."""
        loaded, _, sha = self.index.desired_for(instance)
        generation = old.generation if old else 0
        if sha and (old is None or old.manifest_sha256 != sha):
            generation += 1
        disks = sum(len(lm.manifest.disks) for lm in loaded)
        next_retry = ""
        settled = o.settled
        if settled.queue is QueueAction.BACKOFF:
            when = time.time() + self.queue.backoff(instance)
            next_retry = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(when))
        return status_of(
            old,
            instance,
            o,
            generation,
            sha,
            disks,
            now=now_iso(),
            next_retry=next_retry,
            terminal=settled.terminal,
        )

    # -- a resync ---------------------------------------------------------------------

    def resync(self, session: Session, *, first: bool = False) -> None:
        """Observe every pool and plan everything once, as a dry run does; queue the
        instances with something to do, mark the others Ready."""
        start = time.monotonic()
        calls = session.conns.calls
        loaded, failed = self.index.everything()
        desired = session._with_entries(build_desired(loaded, failed, session.config.pools))
        observed = session.observe(desired)
        full = plan(desired, observed, self.opts)
        drift = [w for w in full.warnings if w.code is ProblemCode.DRIFT]
        if drift and not first:
            self.metrics.drift.inc(len(drift))
            for w in drift:
                log.warning("drift", instance=w.instance, disk=w.disk, volume=w.volume)
        everyone = {i.instance for i in desired.instances}
        everyone |= {r.instance for r in observed.records if r.kind is RecordKind.DISK}
        everyone |= {f.instance for f in desired.failed if f.instance}  # invalid: a status too
        queued = self._queue_or_mark_ready(
            sorted(everyone), full, _troubled(full, observed, desired)
        )
        session.renew_record_copies(observed)  # an untrusted copy of an intact record is replaced
        self.metrics.resyncs.inc()
        log.info(
            "resync",
            seconds=round(time.monotonic() - start, 3),
            instances=len(everyone),
            queued=queued,
            drift=len(drift),
            libvirt_calls=session.conns.calls - calls,
        )

    def _queue_or_mark_ready(self, instances: list[str], full: Plan, troubled: set[str]) -> int:
        """Queue each instance the full plan acts on or finds in trouble (but one whose
        terminal error waits for its manifest to change); write Ready for the others
        whose status is not Ready for their manifest yet. How many were queued."""
        per = {a.instance for a in full.actions}
        queued = 0
        known = {st.instance: st for st in self.status.all()}
        converged: list[InstanceStatus] = []
        for inst in instances:
            old = known.get(inst)
            _, _, sha = self.index.desired_for(inst)
            if inst in per or inst in troubled:
                if (
                    inst not in per
                    and old is not None
                    and old.terminal
                    and old.manifest_sha256 == sha
                ):
                    continue  # a terminal error waits for its manifest to change
                self.enqueue(inst)
                queued += 1
            elif old is None or old.manifest_sha256 != sha or not old.is_ready():
                warnings = [w for w in full.warnings if w.instance == inst]
                outcome = self._outcome(inst, None, [], warnings)
                converged.append(self._status(inst, outcome, old))
        self._save(converged)
        return queued


def _troubled(full: Plan, observed: Observed, desired: Desired) -> set[str]:
    """The instances with an error in the full plan, or a disk in a pool that could not
    be observed (recorded there, or desired there)."""
    troubled = {p.instance for p in full.errors if p.instance}
    unusable = {n for n, p in observed.pools.items() if p.volumes is None}
    troubled |= {r.instance for r in observed.records if r.pool in unusable}
    troubled |= {
        di.instance for di in desired.instances if any(d.spec.pool in unusable for d in di.disks)
    }
    return troubled
