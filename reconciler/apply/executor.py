"""The executor: schedules a Plan's actions, one recorded step at a time.

It decides only the order and what runs together: each action's step (apply/steps/) is
run under the action's volume lock, after its precondition is checked there again
(preconditions.py: a saved plan is checked whole before the first change and refused if
one action is stale; a live run re-plans a stale action's instance). Steps are handed a
StepContext (the record writer, the drivers, their locks) and what was read under the
lock, never the executor.

Each step records its intent before it changes a volume (DESIGN invariant 2; each step
module opens with its order and crash windows):
  create  record `creating` -> volume made -> record `ready`
  resize  record `resizing` (target size) -> volume grown -> record `ready`
  delete  record `deleting` -> volume removed -> record removed
so a crash at any point leaves a record the next plan finishes or rolls back. Every step
that destroys a volume first asks libvirt, under the volume's lock, whether a defined
domain uses it (drivers/api.py: check_unused): a plan's own check is as old as the plan.

A fault of the records database itself (StoreError: locked, read-only, disk full, damaged)
stops the whole apply: no step can go on without its record. The steps under way finish,
none is started, and the error is raised for the CLI to render once. Each step wrote (or
failed to write) its intent before touching a volume, so what is left is what a crash
would leave. Completions are written lazily; the run ends with one sync of every store.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TextIO

from reconciler.apply import preconditions
from reconciler.apply.preconditions import Replanner, touches
from reconciler.apply.report import Reporter
from reconciler.apply.steps import create, delete, migrate, ownership, resize, snapshot, update
from reconciler.apply.steps.context import Held, Key, RecordWriter, StepContext, StepResult
from reconciler.drivers.api import ManagingDriver
from reconciler.drivers.host.store import StoreError
from reconciler.drivers.records import Records
from reconciler.model.errors import ReconcileError
from reconciler.model.plan import Action, ActionKind
from reconciler.util import progress


@dataclass
class Outcome:
    action: Action
    status: str  # "done", "skipped", "failed"
    message: str = ""
    seconds: float = 0.0


@dataclass
class ApplyResult:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]


# Which step carries out each kind of action (every kind has one).
_STEPS: dict[ActionKind, Callable[[StepContext, Held], StepResult]] = {
    ActionKind.CREATE: create.run,
    ActionKind.REPLACE: create.run,  # a create whose old disk goes first (replace.py)
    ActionKind.RESIZE: resize.run,
    ActionKind.UPDATE: update.run,
    ActionKind.DELETE: delete.run,
    ActionKind.MIGRATE: migrate.run,
    ActionKind.RELEASE: delete.release,
    ActionKind.TAKE_OVER: ownership.take_over,
    ActionKind.HAND_OVER: ownership.hand_over,
    ActionKind.SNAPSHOT: snapshot.take,
    ActionKind.DELETE_SNAPSHOT: snapshot.delete,
}


class _Slots:
    """Which of a plan's actions run now: at most `jobs`, and none that shares a volume
    with an earlier action of the plan not yet done (plan order wherever it matters)."""

    def __init__(
        self, actions: list[Action], jobs: int, submit: Callable[[Action], Future[Outcome]]
    ) -> None:
        self.actions = actions
        self.jobs = jobs
        self._submit = submit
        self.keys = [touches(a) for a in actions]
        self.queue = collections.deque(range(len(actions)))  # not started, in plan order
        self.deferred: list[int] = []  # passed over: they share a volume with earlier work
        self.busy: set[Key] = set()
        self.running: dict[Future[Outcome], int] = {}
        self.done = 0

    def pending(self) -> bool:
        return bool(self.queue or self.deferred or self.running)

    def drain(self) -> None:
        """Start nothing more (stopping, or a store fault)."""
        self.queue.clear()
        self.deferred = []

    def fill(self) -> None:
        blocked = set(self.busy)

        def consider(i: int) -> bool:
            free = len(self.running) < self.jobs and not self.keys[i] & blocked
            if free:
                self.running[self._submit(self.actions[i])] = i
                self.busy.update(self.keys[i])
            blocked.update(self.keys[i])
            return free

        self.deferred = [i for i in self.deferred if not consider(i)]
        while self.queue and len(self.running) < self.jobs:
            i = self.queue.popleft()
            if not consider(i):
                self.deferred.append(i)

    def collect(self, futures: set[Future[Outcome]], outcomes: list[Outcome | None]) -> None:
        for f in futures:
            i = self.running.pop(f)
            self.busy.difference_update(self.keys[i])
            outcomes[i] = f.result()
            self.done += 1


class Executor:
    """Applies actions, up to `jobs` at a time on threads of this process.

    Actions on different volumes are independent (each takes its volume's lock and checks
    its own precondition), so they may run together; an action waits for every earlier
    action of the plan that touches one of its volumes, so the plan's order holds wherever
    it matters. Making a disk is mostly waiting for libvirt and qemu-img, which run outside
    this process, so threads are enough. `jobs=1` applies in plan order on the calling
    thread.
    """

    def __init__(
        self,
        store: Records,
        drivers: dict[str, ManagingDriver],
        *,
        replan: Replanner | None,
        out: TextIO | None = None,
        jobs: int = 1,
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        # Once set, no new action starts; those under way finish (the loop's SIGTERM).
        self.stop = stop or threading.Event()
        self.drivers = drivers
        self.replan = replan  # None: a saved plan, applied exactly or refused
        self.jobs = max(1, jobs)
        self.report = Reporter(out, self.jobs)
        self._ctx = StepContext(RecordWriter(store), drivers)
        self._refused: dict[str, str] = {}  # pool -> why this store may not change it
        self._halted: StoreError | None = None  # the first store fault: start nothing more

    def apply(self, actions: list[Action] | tuple[Action, ...]) -> ApplyResult:
        """Apply `actions`; raises StoreError (after the steps under way end) if the
        records database fails."""
        actions = list(actions)
        self._refused = {}
        self._halted = None
        pools = dict.fromkeys(p for a in actions for p, _ in touches(a))
        # A locked or read-only store stops the run here, before anything changes.
        self.store.check_writable(pools)
        self.store.beat()  # hosts sharing a pool: this one is alive (Records.beat)
        if self.replan is None:
            preconditions.refuse_if_stale(self._ctx, actions)
        for pool in pools:
            self._prepare(pool)
        outcomes: list[Outcome | None] = [None] * len(actions)
        try:
            if self.jobs == 1:
                self._run_in_order(actions, outcomes)
            else:
                self._run_parallel(actions, outcomes)
        except BaseException:
            with contextlib.suppress(StoreError):  # never mask the first error
                self.store.sync()
            raise
        if self._halted:
            with contextlib.suppress(StoreError):
                self.store.sync()
            raise self._halted
        self.store.sync()
        return ApplyResult([o for o in outcomes if o is not None])

    def _stopping(self) -> bool:
        return self.stop.is_set() or self._halted is not None

    def _run_in_order(self, actions: list[Action], outcomes: list[Outcome | None]) -> None:
        for i, a in enumerate(actions):
            if self._stopping():
                break
            outcomes[i] = self._run(a)

    def _run_parallel(self, actions: list[Action], outcomes: list[Outcome | None]) -> None:
        pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="apply")
        slots = _Slots(actions, self.jobs, lambda a: pool.submit(self._run, a))
        try:
            while slots.pending():
                if self._stopping():
                    slots.drain()
                else:
                    slots.fill()
                self.report.progress = (slots.done, len(slots.running), len(actions))
                finished, _ = wait(slots.running, return_when=FIRST_COMPLETED)
                slots.collect(finished, outcomes)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            started = [f for f in slots.running if not f.cancelled()]
            self.report.interrupted(len(started))
            try:
                wait(started)
            except KeyboardInterrupt:
                # Every step records its intent before it changes a volume (as after a
                # SIGKILL, which the crash tests cover), so stopping here loses nothing.
                os._exit(130)
            slots.collect(set(started), outcomes)  # all done: wait() returned
            raise
        finally:
            pool.shutdown(wait=True)

    def _run(self, a: Action) -> Outcome:
        start = time.monotonic()
        self.report.starting(a)
        try:
            with progress.acting(a.action.value, a.instance, a.disk):
                status, msg = self._one(a)
        except StoreError as e:
            if self._halted is None:
                self._halted = e
            status, msg = "failed", "the records database failed; the run stops (see below)"
        except ReconcileError as e:
            status, msg = "failed", str(e)
        except OSError as e:
            status, msg = "failed", f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")
        took = time.monotonic() - start
        self.report.step(a, status, msg, took)
        return Outcome(a, status, msg, took)

    def _prepare(self, pool: str) -> None:
        """Before the first change in a pool: make sure this store manages it (claiming it
        if nobody does), then remove temporary files an interrupted run left."""
        driver = self.drivers.get(pool)
        if driver is None:
            return
        try:
            driver.claim()
        except ReconcileError as e:
            self._refused[pool] = str(e)
            return
        for name in driver.sweep_temp():
            self.report.swept(pool, name)

    def _one(self, a: Action) -> StepResult:
        """One action: its precondition checked again under its volume's lock, then its
        step, still under the lock."""
        for pool, _ in touches(a):
            if pool in self._refused:
                raise ReconcileError(self._refused[pool])
        d = self._ctx.driver(a.pool)
        with d.lock(a.volume):
            held = preconditions.under_lock(self._ctx, a, d, self.replan)
            if isinstance(held, str):
                return "skipped", held
            step = _STEPS.get(held.action.action)
            if step is None:
                raise AssertionError(held.action.action)
            return step(self._ctx, held)
