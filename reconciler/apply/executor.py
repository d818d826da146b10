"""The executor: applies a Plan through the drivers, one recorded step at a time.

Every action re-checks, under the volume's lock, that the state it was planned from still
holds (its precondition). A saved plan is applied exactly or not at all: the actions given
here are those of a fresh plan that equals the saved one (saved_plan.py; never the file's
own), every precondition is checked before the first change and one stale action refuses
the whole plan (each is checked again under its lock when it runs, for a change in
between). A live
run re-plans a stale action's instance instead, which is how a second reconciler started
at the same time finds the work already done and converges without touching anything.

Each step records its intent before it changes a volume (DESIGN invariant 2):
  create  record `creating` -> volume made -> record `ready`
  resize  record `resizing` (target size) -> volume grown -> record `ready`
  delete  record `deleting` -> volume removed -> record removed
so a crash at any point leaves a record the next plan finishes or rolls back.

Every step that destroys a volume (a delete or its redo, the old disk of a replace, a
migration's old volume) first asks libvirt, under the volume's lock, whether a defined
domain uses it (drivers/base.py: check_unused): a plan's own check is as old as the plan.

A fault of the records database itself (StoreError: locked, read-only, disk full, damaged)
stops the whole apply: no step can go on without its record. The steps under way finish,
none is started, and the error is raised for the CLI to render once. Each step wrote (or
failed to write) its intent before touching a volume, so what is left is what a crash
would leave.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TextIO

from reconciler.drivers.api import ManagingDriver, VolumeExists, check_unused
from reconciler.drivers.host.store import StoreError
from reconciler.drivers.records import Records
from reconciler.model.errors import ReconcileError
from reconciler.model.plan import Action, ActionKind, Plan
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.model.units import format_size
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.manifest import TemplateSource
from reconciler.util import faults
from reconciler.util.logs import get_logger

log = get_logger(__name__)


class StalePlan(ReconcileError):
    """The state an action was planned from has changed."""


# Re-plan one action's instance against fresh state.
Replanner = Callable[[Action], Plan]


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


_VERB = {
    ActionKind.CREATE: "created",
    ActionKind.RESIZE: "resized",
    ActionKind.REPLACE: "replaced",
    ActionKind.UPDATE: "updated",
    ActionKind.DELETE: "deleted",
    ActionKind.RELEASE: "released",
    ActionKind.TAKE_OVER: "taken over",
    ActionKind.HAND_OVER: "handed over",
    ActionKind.MIGRATE: "migrated",
}


Key = tuple[str, str]


def _checked_at(a: Action) -> Key:
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


def _keys(a: Action) -> frozenset[Key]:
    """The volumes an action touches: actions sharing one never run at the same time."""
    keys = {(a.pool, a.volume)}
    if a.replaces:
        keys.add(a.replaces)
    return frozenset(keys)


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
        self._out = out
        self.jobs = max(1, jobs)
        self._print_lock = threading.Lock()
        self._progress = (0, 0, 0)  # done, running, total: for the terminal's status line
        self._refused: dict[str, str] = {}  # pool -> why this store may not change it
        self._halted: StoreError | None = None  # the first store fault: start nothing more

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def apply(self, actions: list[Action] | tuple[Action, ...]) -> ApplyResult:
        """Apply `actions`; raises StoreError (after the steps under way end) if the
        records database fails."""
        actions = list(actions)
        self._refused = {}
        self._halted = None
        # A locked or read-only store stops the run here, before anything changes.
        self.store.check_writable(dict.fromkeys(p for a in actions for p, _ in _keys(a)))
        self.store.beat()  # hosts sharing a pool: this one is alive (Records.beat)
        if self.replan is None:
            self._refuse_if_stale(actions)
        for pool in dict.fromkeys(p for a in actions for p, _ in _keys(a)):
            self._prepare(pool)
        outcomes: list[Outcome | None] = [None] * len(actions)
        try:
            if self.jobs == 1:
                for i, a in enumerate(actions):
                    if self.stop.is_set() or self._halted:
                        break
                    outcomes[i] = self._run(a)
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

    def _run_parallel(self, actions: list[Action], outcomes: list[Outcome | None]) -> None:
        keys = [_keys(a) for a in actions]
        queue = collections.deque(range(len(actions)))  # not started, in plan order
        deferred: list[int] = []  # passed over: they share a volume with earlier work
        busy: set[Key] = set()
        running: dict[Future[Outcome], int] = {}
        done_count = 0

        def fill(pool: ThreadPoolExecutor) -> None:
            nonlocal deferred
            if self.stop.is_set() or self._halted:  # stopping, or a store fault
                queue.clear()  # start nothing more
                deferred = []
                return
            blocked = set(busy)

            def consider(i: int) -> bool:
                free = len(running) < self.jobs and not keys[i] & blocked
                if free:
                    running[pool.submit(self._run, actions[i])] = i
                    busy.update(keys[i])
                blocked.update(keys[i])
                return free

            deferred = [i for i in deferred if not consider(i)]
            while queue and len(running) < self.jobs:
                i = queue.popleft()
                if not consider(i):
                    deferred.append(i)

        def collect(futures: set[Future[Outcome]]) -> None:
            nonlocal done_count
            for f in futures:
                i = running.pop(f)
                busy.difference_update(keys[i])
                outcomes[i] = f.result()
                done_count += 1

        pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="apply")
        try:
            while queue or deferred or running:
                fill(pool)
                self._progress = (done_count, len(running), len(actions))
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                collect(finished)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            started = [f for f in running if not f.cancelled()]
            print(
                f"\ninterrupted: finishing {len(started)} step(s) already under way "
                "(Ctrl-C again to stop at once; the next run finishes or rolls back "
                "whatever is cut short)",
                file=sys.stderr,
                flush=True,
            )
            try:
                wait(started)
            except KeyboardInterrupt:
                # Every step records its intent before it changes a volume (as after a
                # SIGKILL, which the crash tests cover), so stopping here loses nothing.
                os._exit(130)
            collect(set(started))  # all done: wait() returned
            raise
        finally:
            pool.shutdown(wait=True)

    def _run(self, a: Action) -> Outcome:
        start = time.monotonic()
        if self.jobs == 1 and self.out.isatty():
            self.out.write(f"... {a.action.value} {a.instance}/{a.disk}\r")
            self.out.flush()
        try:
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
        self._report(a, status, msg, took)
        return Outcome(a, status, msg, took)

    def _report(self, a: Action, status: str, msg: str, took: float) -> None:
        subject = f"{a.instance}/{a.disk} ({a.pool}/{a.volume})"
        if status == "done":
            line = f"{_VERB[a.action]} {subject} in {took:.2f}s"
            if msg and a.action is ActionKind.MIGRATE:
                line += f": {msg}"
        elif status == "skipped":
            line = f"skipped {a.action.value} {subject}: {msg}"
        else:
            line = f"FAILED {a.action.value} {subject}: {msg}"
        tty = self.out.isatty()
        with self._print_lock:
            print(("\x1b[2K" if tty else "") + line, file=self.out, flush=True)
            if tty and self.jobs > 1:
                done, running, total = self._progress
                self.out.write(f"... {done + 1} of {total} done, {running} running\r")
                self.out.flush()
        log.info(
            "apply.step",
            action=a.action.value,
            volume=a.volume,
            pool=a.pool,
            status=status,
            seconds=round(took, 3),
            message=msg,
        )

    def _refuse_if_stale(self, actions: list[Action]) -> None:
        """Raise StalePlan naming every action of a saved plan whose precondition no longer
        holds, before any change: a plan is applied exactly, or not at all."""
        stale: list[str] = []
        earlier: set[Key] = set()
        for a in actions:
            keys = _keys(a)
            if keys & earlier:
                continue  # follows an earlier action on its volume: checked when it runs
            earlier |= keys
            pool, volume = _checked_at(a)
            subject = f"{a.action.value} {a.instance}/{a.disk} ({a.pool}/{a.volume})"
            if (pool, volume) != (a.pool, a.volume):
                subject += f", moving from {pool}/{volume}"
            want = (a.precondition.record_generation, a.precondition.volume_exists)
            try:
                rec = self.store.get(pool, volume)
                seen = (rec.generation if rec else None, self.driver(pool).volume_exists(volume))
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
            print(f"removed temporary file {pool}/{name} left by an interrupted run", file=self.out)

    def driver(self, pool: str) -> ManagingDriver:
        d = self.drivers.get(pool)
        if d is None:
            raise ReconcileError(f"pool {pool} has no driver that can change it")
        return d

    def _one(self, a: Action) -> tuple[str, str]:
        for pool, _ in _keys(a):
            if pool in self._refused:
                raise ReconcileError(self._refused[pool])
        d = self.driver(a.pool)
        with d.lock(a.volume):
            rec = self.store.get(a.pool, a.volume)
            exists = d.volume_exists(a.volume)
            if a.replaces and a.replaces != (a.pool, a.volume):
                # The old location is what the precondition describes.
                old = self.driver(a.replaces[0])
                rec_old = self.store.get(*a.replaces)
                seen = (rec_old.generation if rec_old else None, old.volume_exists(a.replaces[1]))
            else:
                rec_old = None
                seen = (rec.generation if rec else None, exists)
            want = (a.precondition.record_generation, a.precondition.volume_exists)
            if seen != want:
                if self.replan is None:
                    raise StalePlan(
                        f"the state changed since the plan was made ({_changes(want, seen)}); "
                        "make a new plan"
                    )
                again = self.replan(a)
                fresh = [x for x in again.actions if x.disk == a.disk]
                if not fresh:
                    # Nothing to do now: done by another run, or refused (a volume that
                    # appeared without a record is not "already in the desired state").
                    refused = [e for e in again.errors if e.disk == a.disk]
                    if refused:
                        raise ReconcileError(
                            "the state changed since planning: "
                            + "; ".join(f"{e.message} [{e.code}]" for e in refused)
                        )
                    return "skipped", "already in the desired state (another run did it)"
                if len(fresh) == 1 and fresh[0].action == a.action and not fresh[0].destructive:
                    now = fresh[0]
                    log.info("apply.replanned", volume=a.volume)
                    moved = now.replaces is not None and now.replaces != (a.pool, a.volume)
                    old_rec = self.store.get(*now.replaces) if moved and now.replaces else None
                    return self._do(now, d, self.store.get(a.pool, a.volume), old_rec)
                raise StalePlan("the state changed since planning; run again to re-plan")
            return self._do(a, d, rec, rec_old)

    def _do(
        self, a: Action, d: ManagingDriver, rec: DiskRecord | None, rec_old: DiskRecord | None
    ) -> tuple[str, str]:
        if a.action in (ActionKind.CREATE, ActionKind.REPLACE):
            if a.replaces and a.replaces != (a.pool, a.volume) and rec_old is not None:
                old = self.driver(a.replaces[0])
                with old.lock(a.replaces[1]):
                    self._delete(old, rec_old)
            self._create(a, d, rec)
            return "done", ""
        if a.action is ActionKind.RESIZE:
            assert rec is not None
            self._resize(a, d, rec)
            return "done", ""
        if a.action is ActionKind.UPDATE:
            assert rec is not None and a.spec is not None
            rec = self._put(
                rec, rec.generation, spec=dict(a.spec), state=RecordState.READY, pending_size=None
            )
            d.keep_record_copy(rec)
            return "done", ""
        if a.action is ActionKind.DELETE:
            assert rec is not None
            self._delete(d, rec)
            return "done", ""
        if a.action is ActionKind.MIGRATE:
            return self._migrate(a, rec, rec_old)
        if a.action is ActionKind.RELEASE:
            assert rec is not None
            self.store.delete(rec.pool, rec.volume, rec.generation, durable=False)
            faults.point("record.released")
            return "done", "the volume is kept and no longer managed"
        if a.action is ActionKind.TAKE_OVER:
            assert rec is not None and a.holder is not None
            self.store.take(rec.pool, rec.volume, rec.generation, a.holder)
            faults.point("record.taken")
            return "done", f"this host now owns it (from {a.holder})"
        if a.action is ActionKind.HAND_OVER:
            assert rec is not None
            self.store.release(rec.pool, rec.volume, rec.generation)
            faults.point("record.handed-over")
            return "done", "the disk is kept; a host whose manifest names it may take it"
        raise AssertionError(a.action)

    def _migrate(
        self, a: Action, rec: DiskRecord | None, rec_old: DiskRecord | None
    ) -> tuple[str, str]:
        """A migrate (apply/steps/migrate.py); to another pool, the old volume is locked too."""
        from reconciler.apply.steps.migrate import Migrator

        migrator = Migrator(self.store, self.driver, self._put)
        if a.replaces is None or a.replaces == (a.pool, a.volume):
            if rec is None:
                raise ReconcileError(f"{a.pool}/{a.volume} has no record; nothing to migrate")
            return "done", migrator.run(a, rec)
        if rec_old is None:
            return "skipped", "already migrated (the old location has no record)"
        with self.driver(a.replaces[0]).lock(a.replaces[1]):
            fresh = self.store.get(*a.replaces)
            if fresh is None or fresh.generation != rec_old.generation:
                raise StalePlan("the disk's record changed while waiting for its lock")
            return "done", migrator.run(a, fresh)

    def _put(
        self, rec: DiskRecord, expect: int | None, *, durable: bool = True, **changes: Any
    ) -> DiskRecord:
        """Write a record change; intents durably, completions lazily (see store.py)."""
        new = rec.model_copy(update={**changes, "generation": (expect or 0) + 1})
        self.store.put(new, expect, durable=durable)
        return new

    def _create(self, a: Action, d: ManagingDriver, rec: DiskRecord | None) -> None:
        assert a.spec is not None
        spec = dict(a.spec)
        gen = rec.generation if rec else None
        exists = d.volume_exists(a.volume)
        if rec is None and exists:
            raise ReconcileError(
                f"volume {a.pool}/{a.volume} exists but the reconciler has no record of making "
                "it; it is left untouched"
            )
        if rec is not None and exists:
            # A partial volume from an interrupted create, or the old disk of a replace (or
            # of an interrupted delete): record the intent to remove it first, so a crash
            # here is finished next time. Only a partial volume holds no one's data.
            if rec.state is RecordState.DELETING:
                check_unused(d, a.volume, "making again")
            elif rec.state is not RecordState.CREATING:
                check_unused(d, a.volume, "replacing")
            rec = self._put(rec, gen, state=RecordState.DELETING)
            faults.point("record.deleting")
            d.delete_volume(a.volume)
            gen = rec.generation
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
            backing=d.entry_for(spec),
            state=RecordState.CREATING,
            generation=(gen or 0) + 1,
        )
        self.store.put(new, gen)
        faults.point("record.creating")
        try:
            if "image" in new.source:
                d.create_from_image(new, new.source["image"])
            else:
                d.create_from_template(new, TemplateSource.model_validate(new.source))
        except BaseException as e:
            self._roll_back(d, new, e)
            raise
        ready = self._put(
            new, new.generation, durable=False, state=RecordState.READY, backing=d.backing_for(spec)
        )
        faults.point("record.ready")
        d.keep_record_copy(ready)

    def _roll_back(self, d: ManagingDriver, rec: DiskRecord, err: BaseException) -> None:
        """Remove what a failed create left, then its record; never mask the first error."""
        if isinstance(err, KeyboardInterrupt):
            return  # the record stays `creating`; the next run removes the partial volume
        try:
            if not isinstance(err, VolumeExists):  # never remove a volume we did not make
                d.delete_volume(rec.volume)
            self.store.delete(rec.pool, rec.volume, rec.generation)
        except Exception as e:
            log.warning("apply.rollback_failed", volume=rec.volume, error=str(e))

    def _resize(self, a: Action, d: ManagingDriver, rec: DiskRecord) -> None:
        assert a.spec is not None
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
        rec = self._put(rec, rec.generation, state=RecordState.RESIZING, pending_size=size)
        faults.point("record.resizing")
        d.keep_record_copy(rec)  # a rebuild from it finishes the resize
        d.resize(rec, size)
        rec = self._put(
            rec,
            rec.generation,
            durable=False,
            state=RecordState.READY,
            pending_size=None,
            virtual_size=size,
            spec=dict(a.spec),
        )
        faults.point("record.ready")
        d.keep_record_copy(rec)

    def _delete(self, d: ManagingDriver, rec: DiskRecord) -> None:
        if d.volume_exists(rec.volume) and rec.state is not RecordState.CREATING:
            check_unused(d, rec.volume, "deleting")
        if rec.state is not RecordState.DELETING:
            rec = self._put(rec, rec.generation, state=RecordState.DELETING)
            faults.point("record.deleting")
        if rec.migration is not None:
            from reconciler.apply.steps.migrate import drop_partial_copy

            drop_partial_copy(self.store, self.driver, rec)
        d.delete_volume(rec.volume)
        self.store.delete(rec.pool, rec.volume, rec.generation, durable=False)
        faults.point("record.deleted")
