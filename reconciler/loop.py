"""`reconcile watch`: the control loop that keeps a host's disks converged.

The loop decides only *when* an instance is reconciled; *what* is done is the one planner
and executor that `--dry-run` and apply use. Level-triggered and idempotent, as
controller-runtime's reconcilers are:

- watchdog (inotify) sees the manifest directory; a changed file is read again once its
  writes have been quiet for `DEBOUNCE` seconds (a burst of writes is one reconcile; an
  atomic write, temp file + rename, is one change, and hidden temp files are never read),
  and the instances it names (before and after) are queued;
- every `resync` seconds every pool is observed again and every manifest whose file
  changed is read again, so drift (a volume removed behind the reconciler's back) is found
  without any event: one plan of everything, as a dry run makes, and the instances with
  something to do are queued;
- workers take instances off a work queue (reconciler/workqueue.py) and reconcile one
  instance at a time each: plan it against its own records and volumes, apply, and map
  the outcome, in one place (`_outcome`), to a queue action, a status and a metric label;
- nothing is deleted before the whole directory has been read once (the first full read
  happens before any worker starts), a removed manifest file is not a tombstone (its
  disks are reported as orphaned; `--prune` deletes them), and deletions within one resync
  interval beyond `safety.maxDeletePercent` of the managed disks (and more than
  `safety.deleteGuardFloor`) wait, Degraded with reason DeleteGuard;
- SIGTERM and SIGINT start nothing new, let the steps under way finish and exit 0; SIGHUP
  reloads the config (a bad one is reported and the old one kept).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from reconciler.apply import Executor
from reconciler.desired import build_desired
from reconciler.diff import (
    DesiredInstance,
    FailedInput,
    Plan,
    PlanOptions,
    Problem,
    Severity,
    plan,
)
from reconciler.errors import ReconcileError
from reconciler.logs import get_logger
from reconciler.schema.config import Config
from reconciler.schema.load import (
    MANIFEST_SUFFIXES,
    FailedManifest,
    LoadedManifest,
    load_config,
    load_manifest,
)
from reconciler.schema.mcache import stat_key
from reconciler.schema.record import RecordKind
from reconciler.session import Session
from reconciler.status import InstanceStatus, StatusStore, now_iso, with_conditions
from reconciler.workqueue import WorkQueue

log = get_logger("reconciler.loop")

DEBOUNCE = 0.05
DEFAULT_RESYNC = 60.0
DEFAULT_WORKERS = 4
SIGNAL_POLL = 0.2  # seconds: the longest a signal waits for its handler

# Plan error codes -> (status reason, terminal). A terminal error waits for its manifest
# to change (a resync also notices when it went away by other means); the others are
# retried with backoff.
REASONS: dict[str, tuple[str, bool]] = {
    "manifest-invalid": ("ManifestInvalid", True),
    "conflict": ("ManifestConflict", True),
    "shrink-refused": ("ShrinkRefused", True),
    "replace-required": ("ReplaceRequired", True),
    "unmanaged-volume": ("UnmanagedVolume", True),
    "cache-entry-unmanaged": ("CacheEntryUnmanaged", True),
    "cache-entry-unreadable": ("RecordUnreadable", True),
    "record-unreadable": ("RecordUnreadable", True),
    "record-conflict": ("RecordConflict", True),
    "attachments-unknown": ("AttachmentsUnknown", True),
    "prune-refused": ("PruneRefused", True),
    "migrate-unsupported": ("MigrateUnsupported", True),
    "migration-changed": ("MigrationChanged", True),
    # Space is freed by other means (the loop's resync notices); retried with backoff.
    "migrate-no-space": ("MigrateNoSpace", False),
    "volume-in-use": ("VolumeInUse", False),
    "pool-unreachable": ("PoolUnreachable", False),
    "pool-managed-elsewhere": ("PoolManagedElsewhere", False),
}


class Metrics:
    """Prometheus metrics, named as operators know them from controller-runtime."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        c = {"controller": "reconcile"}
        self.reconciles = Counter(
            "controller_runtime_reconcile_total",
            "Reconciles by result",
            ["controller", "result"],
            registry=r,
        )
        self.errors = Counter(
            "controller_runtime_reconcile_errors_total",
            "Reconcile errors",
            ["controller"],
            registry=r,
        ).labels(**c)
        self.duration = Histogram(
            "controller_runtime_reconcile_time_seconds",
            "Time per reconcile",
            ["controller"],
            registry=r,
        ).labels(**c)
        q = {"name": "reconcile"}
        self.depth = Gauge("workqueue_depth", "Queue depth", ["name"], registry=r).labels(**q)
        self.adds = Counter("workqueue_adds_total", "Adds", ["name"], registry=r).labels(**q)
        self.retries = Counter("workqueue_retries_total", "Retries", ["name"], registry=r).labels(
            **q
        )
        self.queue_time = Histogram(
            "workqueue_queue_duration_seconds", "Time in the queue", ["name"], registry=r
        ).labels(**q)
        self.work_time = Histogram(
            "workqueue_work_duration_seconds", "Time worked", ["name"], registry=r
        ).labels(**q)
        self.actions = Counter(
            "reconcile_actions_total", "Actions applied", ["kind", "outcome"], registry=r
        )
        self.drift = Counter("reconcile_drift_total", "Drift found by resyncs", registry=r)
        self.not_ready = Gauge(
            "reconcile_instances_not_ready", "Instances whose Ready is not True", registry=r
        )
        self.resyncs = Counter("reconcile_resyncs_total", "Resyncs done", registry=r)


@dataclass
class Entry:
    """What one manifest file holds, as last read."""

    key: tuple[int, int, int, int, int]
    sha256: str
    result: LoadedManifest | FailedManifest


class ManifestIndex:
    """The manifest directory as the loop last read it: file -> what it holds."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.files: dict[str, Entry] = {}
        self.by_instance: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    @staticmethod
    def wanted(name: str) -> bool:
        return name.endswith(MANIFEST_SUFFIXES) and not name.startswith(".")

    def names(self) -> list[str]:
        with os.scandir(self.dir) as it:
            return sorted(str(self.dir / e.name) for e in it if self.wanted(e.name))

    def instances(self) -> set[str]:
        with self.lock:
            return set(self.by_instance)

    def _instances_of(self, entry: Entry | None) -> set[str]:
        if entry is None:
            return set()
        r = entry.result
        inst = r.manifest.instance if isinstance(r, LoadedManifest) else r.instance
        return {inst} if inst else set()

    def read(self, path: str, config: Config, *, if_changed: bool = False) -> set[str]:
        """Read one file again (or forget it if it is gone); the instances it named before
        and names now."""
        try:
            st = os.stat(path)
            key = stat_key(st)
            with self.lock:
                old = self.files.get(path)
            if if_changed and old is not None and old.key == key:
                return set()
            with open(path, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            return self.forget(path)
        result = load_manifest(path, config)
        entry = Entry(key, sha, result)
        with self.lock:
            old = self.files.get(path)
            if old is not None and old.sha256 == sha and type(old.result) is type(result):
                self.files[path] = entry
                return set()  # rewritten with the same content: nothing changed
            before = self._instances_of(old)
            self._unlink(path, old)
            self.files[path] = entry
            after = self._instances_of(entry)
            for inst in after:
                self.by_instance.setdefault(inst, set()).add(path)
        return before | after

    def forget(self, path: str) -> set[str]:
        with self.lock:
            old = self.files.pop(path, None)
            self._unlink(path, old)
            return self._instances_of(old)

    def _unlink(self, path: str, old: Entry | None) -> None:
        for inst in self._instances_of(old):
            paths = self.by_instance.get(inst)
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del self.by_instance[inst]

    def refresh(self, config: Config) -> set[str]:
        """Read every file whose stat changed, forget the removed ones: what changed."""
        changed: set[str] = set()
        present = set(self.names())
        with self.lock:
            known = set(self.files)
        for path in known - present:
            changed |= self.forget(path)
        for path in sorted(present):
            changed |= self.read(path, config, if_changed=True)
        return changed

    def unknown_failures(self) -> list[FailedManifest]:
        """Files that failed to load without saying which instance they are for."""
        with self.lock:
            return [
                e.result
                for e in self.files.values()
                if isinstance(e.result, FailedManifest) and e.result.instance is None
            ]

    def desired_for(self, instance: str) -> tuple[list[LoadedManifest], list[FailedManifest], str]:
        """The instance's loaded and failed manifests, and a hash of their contents."""
        with self.lock:
            entries = [self.files[p] for p in sorted(self.by_instance.get(instance, ()))]
        loaded = [e.result for e in entries if isinstance(e.result, LoadedManifest)]
        failed = [e.result for e in entries if isinstance(e.result, FailedManifest)]
        sha = hashlib.sha256("".join(e.sha256 for e in entries).encode()).hexdigest()
        return loaded, failed, sha if entries else ""

    def everything(self) -> tuple[list[LoadedManifest], list[FailedManifest]]:
        with self.lock:
            entries = list(self.files.values())
        loaded = [e.result for e in entries if isinstance(e.result, LoadedManifest)]
        failed = [e.result for e in entries if isinstance(e.result, FailedManifest)]
        return loaded, failed


class _Events(FileSystemEventHandler):
    def __init__(self, loop: Loop) -> None:
        self.loop = loop

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for p in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(p) if p else ""
            if (
                path
                and os.path.dirname(path) == str(self.loop.index.dir)
                and ManifestIndex.wanted(os.path.basename(path))
            ):
                self.loop.changed(path)


class StateLock:
    """One loop per state directory: an flock on `watch.lock`, which holds the PID."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "watch.lock"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ReconcileError(
                f"another 'reconcile watch' (PID {pid}) runs on the state directory "
                f"{state_dir} (it holds {self.path}); one loop per state directory"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) something, if it asked to be told; True if sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)
    return True


@dataclass(frozen=True)
class Outcome:
    """The one mapping of a reconcile's result (see `Loop._outcome`)."""

    result: str  # metric label: success, error, requeue_after
    ready: tuple[str, str, str]  # (status, reason, message)
    degraded: tuple[str, str, str]
    retry: bool  # back off and try again
    terminal: bool  # wait for the manifest to change
    error: str = ""

    @classmethod
    def failed(cls, reason: str, message: str, *, terminal: bool) -> Outcome:
        """Not ready and degraded for `reason`: retried with backoff unless terminal."""
        return cls(
            "error",
            ("False", reason, message),
            ("True", reason, message),
            retry=not terminal,
            terminal=terminal,
            error=message,
        )


class Loop:
    def __init__(
        self,
        config_path: str,
        directory: Path,
        *,
        resync: float = DEFAULT_RESYNC,
        prune: bool = False,
        workers: int = DEFAULT_WORKERS,
        jobs: int = 1,
        metrics_port: int | None = None,
        metrics_address: str = "127.0.0.1",
    ) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.index = ManifestIndex(directory.resolve())
        self.resync_interval = resync
        self.prune = prune
        self.workers = workers
        self.jobs = jobs
        self.metrics = Metrics()
        self.metrics_port = metrics_port
        self.metrics_address = metrics_address
        self.queue: WorkQueue[str] = WorkQueue()
        self.stop = threading.Event()  # no new work; steps under way finish
        self._wake = threading.Event()  # for the main thread: a signal arrived
        self._reload = False
        self._pending: dict[str, float] = {}  # file -> when its writes went quiet
        self._pending_cond = threading.Condition()
        self._queued_at: dict[str, float] = {}
        self._deletes: deque[tuple[float, int]] = deque()  # (when, disks destroyed)
        self._deletes_lock = threading.Lock()
        self._managed = 0
        self._old_sessions: list[Session] = []
        self.session: Session | None = None
        self.status: StatusStore | None = None
        self.ready = threading.Event()
        self._not_ready: set[str] = set()  # instances whose Ready is not True
        self._not_ready_lock = threading.Lock()

    # -- queueing ---------------------------------------------------------------------

    def enqueue(self, instance: str, delay: float = 0.0) -> None:
        self._queued_at.setdefault(instance, time.monotonic() + max(delay, 0.0))
        self.metrics.adds.inc()
        if delay > 0:
            self.queue.add_after(instance, delay)
        else:
            self.queue.add(instance)
        self.metrics.depth.set(self.queue.depth())

    def changed(self, path: str) -> None:
        """A manifest file had an event: read it once its writes are quiet."""
        with self._pending_cond:
            self._pending[path] = time.monotonic() + DEBOUNCE
            self._pending_cond.notify()

    def _debouncer(self) -> None:
        while not self.stop.is_set():
            with self._pending_cond:
                now = time.monotonic()
                due = [p for p, t in self._pending.items() if t <= now]
                for p in due:
                    del self._pending[p]
                if not due:
                    wait = min(self._pending.values(), default=now + 1.0) - now
                    self._pending_cond.wait(max(wait, 0.001))
                    continue
            for path in due:
                try:
                    for inst in self.index.read(path, self.config):
                        self._manifest_changed(inst)
                except OSError as e:
                    log.error("manifest.read_failed", file=path, error=str(e))

    def _manifest_changed(self, instance: str) -> None:
        self.queue.forget(instance)  # a new manifest starts with a fresh backoff
        self.enqueue(instance)

    # -- running ----------------------------------------------------------------------

    def run(self) -> int:
        lock = StateLock(self.config.state_dir())
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> int:
        handlers = self._signals()
        self.session = Session(self.config)
        self.status = StatusStore(self.config.state_dir() / "status.sqlite")
        self._not_ready = {st.instance for st in self.status.all() if not _ready(st)}
        observer = Observer()
        observer.schedule(_Events(self), str(self.index.dir), recursive=False)
        observer.start()  # before the first read: a change during it is seen again
        threads: list[threading.Thread] = []
        metrics_server: tuple[Any, threading.Thread] | None = None
        try:
            if self.metrics_port is not None:
                metrics_server = start_http_server(
                    self.metrics_port, addr=self.metrics_address, registry=self.metrics.registry
                )
            self.index.refresh(self.config)
            self.resync(first=True)
            threads = [
                threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True)
                for i in range(self.workers)
            ]
            threads.append(threading.Thread(target=self._debouncer, name="debounce", daemon=True))
            threads.append(threading.Thread(target=self._resyncer, name="resync", daemon=True))
            threads.append(threading.Thread(target=self._beater, name="heartbeat", daemon=True))
            for t in threads:
                t.start()
            log.info("ready", instances=len(self.index.instances()), dir=str(self.index.dir))
            sd_notify("READY=1")
            self.ready.set()
            while not self.stop.is_set():
                # With a timeout: Linux hands a signal to any thread, and Python runs its
                # handler only in the main thread once that executes again, which an
                # untimed wait never does (SIGTERM was lost about one time in ten).
                self._wake.wait(SIGNAL_POLL)
                self._wake.clear()
                if self._reload:
                    self._reload = False
                    self._reload_config()
            log.info("stopping", reason="signal", working=sorted(self.queue.processing()))
            sd_notify("STOPPING=1")
        finally:
            self.stop.set()
            self.queue.shutdown()
            with self._pending_cond:
                self._pending_cond.notify_all()
            for t in threads:
                t.join()
            observer.stop()
            observer.join()
            if metrics_server is not None:  # a stopped loop leaves no port open, no thread
                metrics_server[0].shutdown()
                metrics_server[0].server_close()
                metrics_server[1].join()
            for s in [self.session, *self._old_sessions]:
                if s is not None:
                    s.close()
            if self.status is not None:
                self.status.close()
            for sig, old in handlers.items():
                signal.signal(sig, old)
        log.info("stopped")
        return 0

    def _signals(self) -> dict[int, Any]:
        def stop(signum: int, _frame: object) -> None:
            log.info("signal", signal=signal.Signals(signum).name)
            self.request_stop()

        def reload(_signum: int, _frame: object) -> None:
            self.request_reload()

        old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig, fn in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
                old[sig] = signal.signal(sig, fn)
        return old

    def request_stop(self) -> None:
        """As SIGTERM does."""
        self.stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """As SIGHUP does."""
        self._reload = True
        self._wake.set()

    def _reload_config(self) -> None:
        try:
            config = load_config(self.config_path)
            session = Session(config)
        except ReconcileError as e:
            log.error("config.reload_failed", error=str(e), kept="the running config")
            return
        old, self.session, self.config = self.session, session, config
        if old is not None:
            self._old_sessions.append(old)  # workers may still use it; closed at exit
        log.info("config.reloaded", file=self.config_path)
        for inst in self.index.instances():
            self.enqueue(inst)

    def _beater(self) -> None:
        """Renew this host's heartbeat in the pools many hosts share, four times per
        `ownership.heartbeatExpiry`, so other hosts take its instances only once it is
        gone (a store that fails is reported by the pool's next plan)."""
        session = self.session
        while session is not None:
            session.store.beat()
            if self.stop.wait(self.config.ownership.heartbeat_expiry / 4):
                return
            session = self.session

    def _resyncer(self) -> None:
        while not self.stop.wait(self.resync_interval):
            try:
                changed = self.index.refresh(self.config)
                for inst in changed:
                    self._manifest_changed(inst)
                self.resync()
            except ReconcileError as e:
                log.error("resync.failed", error=str(e))

    def resync(self, *, first: bool = False) -> None:
        """Observe every pool and plan everything once, as a dry run does; queue the
        instances with something to do, mark the others Ready."""
        session = self.session
        assert session is not None and self.status is not None
        start = time.monotonic()
        calls = session.conns.calls
        loaded, failed = self.index.everything()
        desired = session._with_entries(build_desired(loaded, failed))
        observed = session.observe(desired)
        # The loop has read every manifest: a disk of a pool many hosts share whose
        # manifest is gone is handed over (never deleted without --prune and a tombstone).
        opts = PlanOptions(prune=self.prune, hand_over=True, force=True)
        full = plan(desired, observed, opts)
        self._managed = sum(1 for r in observed.records if r.kind is RecordKind.DISK)
        per: dict[str, list[Any]] = {}
        for a in full.actions:
            per.setdefault(a.instance, []).append(a)
        troubled: dict[str, list[Problem]] = {}
        for p in full.errors:
            if p.instance:
                troubled.setdefault(p.instance, []).append(p)
        unusable = {n for n, p in observed.pools.items() if p.volumes is None}
        for r in observed.records:
            if r.pool in unusable:
                troubled.setdefault(r.instance, [])
        for di in desired.instances:
            if any(d.spec.pool in unusable for d in di.disks):
                troubled.setdefault(di.instance, [])
        drift = [w for w in full.warnings if w.code == "drift"]
        if drift and not first:
            self.metrics.drift.inc(len(drift))
            for w in drift:
                log.warning("drift", instance=w.instance, disk=w.disk, volume=w.volume)
        everyone = {i.instance for i in desired.instances}
        everyone |= {r.instance for r in observed.records if r.kind is RecordKind.DISK}
        queued = 0
        known = {st.instance: st for st in self.status.all()}
        converged: list[InstanceStatus] = []
        for inst in sorted(everyone):
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
            elif old is None or old.manifest_sha256 != sha or not _ready(old):
                warnings = [w for w in full.warnings if w.instance == inst]
                outcome = self._outcome(inst, None, [], warnings, 0)
                converged.append(self._status(inst, outcome, old))
        self._save(converged)
        session.renew_record_copies()  # an untrusted copy of an intact record is replaced
        self.metrics.resyncs.inc()
        log.info(
            "resync",
            seconds=round(time.monotonic() - start, 3),
            instances=len(everyone),
            queued=queued,
            drift=len(drift),
            libvirt_calls=session.conns.calls - calls,
        )

    # -- one reconcile ----------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            inst = self.queue.get()
            if inst is None:
                return
            queued = self._queued_at.pop(inst, None)
            if queued is not None:
                self.metrics.queue_time.observe(max(0.0, time.monotonic() - queued))
            self.metrics.depth.set(self.queue.depth())
            start = time.monotonic()
            try:
                self.reconcile(inst)
            except Exception as e:  # never let one instance kill a worker
                log.exception("reconcile.crashed", instance=inst, error=str(e))
                self.metrics.errors.inc()
                self.metrics.retries.inc()
                self.queue.add_rate_limited(inst)
            finally:
                took = time.monotonic() - start
                self.metrics.work_time.observe(took)
                self.metrics.duration.observe(took)
                self.queue.done(inst)

    def reconcile(self, instance: str) -> None:
        session = self.session
        assert session is not None
        loaded, failed, _ = self.index.desired_for(instance)
        desired = session._with_entries(build_desired(loaded, failed))
        # Unreadable files that name no instance may be this one's: they block --prune.
        unknown = build_desired([], self.index.unknown_failures()).failed
        opts = PlanOptions(prune=self.prune, hand_over=True, force=True)
        wanted: tuple[DesiredInstance, ...] = desired.instances
        bad: tuple[FailedInput, ...] = desired.failed + unknown
        p = session.plan_instance(instance, wanted, bad, opts)
        errors = list(p.errors)
        failed_steps = 0
        if p.actions:  # what can be done is done, beside what is refused (as one-shot runs)
            guard = self._guard(p)
            if guard is not None:
                self._write_status(instance, guard)
                self._apply_queue_action(instance, guard)
                return
            self._write_status(instance, self._progressing(instance, p))
            # The loop logs each step (below); nothing goes to a terminal.
            with open(os.devnull, "w") as quiet:
                result = Executor(
                    session.store,
                    session.managing_drivers(),
                    replan=lambda a: session.plan_instance(a.instance, wanted, bad, opts),
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
            failed_steps = len(result.failed)
            if result.failed:
                first = result.failed[0]
                errors.append(_apply_failed(first.action.disk, first.message))
            if self.stop.is_set() and len(result.outcomes) < len(p.actions):
                return  # stopping: the rest is done after the restart
        outcome = self._outcome(instance, p, errors, list(p.warnings), failed_steps)
        self._write_status(instance, outcome)
        self._apply_queue_action(instance, outcome)

    def _apply_queue_action(self, instance: str, o: Outcome) -> None:
        if o.retry:
            self.metrics.retries.inc()
            self.metrics.errors.inc()
            self.metrics.reconciles.labels("reconcile", "error").inc()
            self.queue.add_rate_limited(instance)
        else:
            self.queue.forget(instance)
            if o.terminal:
                self.metrics.reconciles.labels("reconcile", "error").inc()
            elif o.result == "success":
                self.metrics.reconciles.labels("reconcile", "success").inc()

    def _guard(self, p: Plan) -> Outcome | None:
        """The delete guard: destructive actions beyond the share allowed in one resync
        interval wait (Degraded, DeleteGuard) until the limit allows them."""
        doomed = sum(1 for a in p.actions if a.destructive)
        if not doomed:
            return None
        safety = self.config.safety
        now = time.monotonic()
        with self._deletes_lock:
            while self._deletes and self._deletes[0][0] < now - self.resync_interval:
                self._deletes.popleft()
            recent = sum(n for _, n in self._deletes)
            limit = max(safety.delete_guard_floor, safety.max_delete_percent * self._managed / 100)
            if recent + doomed > limit:
                msg = (
                    f"{doomed} disk(s) to destroy, after {recent} in the last "
                    f"{self.resync_interval:g} s: more than the limit of {limit:g} "
                    f"(safety.maxDeletePercent {safety.max_delete_percent}% of {self._managed} "
                    f"managed disks, at least safety.deleteGuardFloor "
                    f"{safety.delete_guard_floor}). Run 'reconcile --force' once, or raise the "
                    "limit and send SIGHUP"
                )
                return Outcome.failed("DeleteGuard", msg, terminal=False)
            self._deletes.append((now, doomed))
        return None

    def _progressing(self, instance: str, p: Plan) -> Outcome:
        msg = f"applying {len(p.actions)} action(s)"
        return Outcome("", ("False", "Progressing", msg), ("False", "AsExpected", ""), False, False)

    def _outcome(
        self,
        instance: str,
        p: Plan | None,
        errors: list[Problem],
        warnings: list[Problem],
        failed_steps: int,
    ) -> Outcome:
        """The one place a reconcile's result becomes a queue action, a status and a
        metric label (controller-runtime's `match`)."""
        if errors:
            # Retried while any error may pass by itself; terminal only when all wait for
            # the manifest (or an operator) to change.
            def kind(e: Problem) -> tuple[str, bool]:
                if e.code == "apply-failed":
                    return "ApplyFailed", False
                return REASONS.get(e.code, ("ReconcileFailed", False))

            transient = [e for e in errors if not kind(e)[1]]
            e = (transient or errors)[0]
            reason, terminal = kind(e)
            return Outcome.failed(reason, e.message, terminal=terminal)
        orphaned = [w for w in warnings if w.code == "orphaned-record"]
        if orphaned and not self.index.desired_for(instance)[2]:
            msg = (
                f"no manifest names this instance; its {len(orphaned)} disk(s) are kept "
                "(watch --prune deletes them)"
            )
            return Outcome(
                "success",
                ("Unknown", "NoManifest", msg),
                ("False", "NoManifest", msg),
                retry=False,
                terminal=True,
            )
        done = f"{len(p.actions)} action(s) applied" if p and p.actions else "nothing to do"
        return Outcome(
            "success", ("True", "Converged", done), ("False", "AsExpected", ""), False, False
        )

    def _write_status(self, instance: str, o: Outcome) -> None:
        assert self.status is not None
        session = self.session
        if (
            o.result == "success"
            and not self.index.desired_for(instance)[2]
            and session is not None
            and session.store.for_instance_by_pool(instance) == ([], {})
        ):
            # Neither a manifest nor a disk: the instance is gone, and so is its status.
            self.status.delete(instance)
            with self._not_ready_lock:
                self._not_ready.discard(instance)
                self.metrics.not_ready.set(len(self._not_ready))
            return
        self._save([self._status(instance, o, self.status.get(instance))])

    def _save(self, statuses: list[InstanceStatus]) -> None:
        assert self.status is not None
        if not statuses:
            return
        self.status.put_many(statuses)
        with self._not_ready_lock:
            for st in statuses:
                if _ready(st):
                    self._not_ready.discard(st.instance)
                else:
                    self._not_ready.add(st.instance)
            self.metrics.not_ready.set(len(self._not_ready))

    def _status(self, instance: str, o: Outcome, old: InstanceStatus | None) -> InstanceStatus:
        """The status `o` gives an instance whose last status was `old`."""
        loaded, _, sha = self.index.desired_for(instance)
        generation = old.generation if old else 0
        if sha and (old is None or old.manifest_sha256 != sha):
            generation += 1
        disks = sum(len(lm.manifest.disks) for lm in loaded)
        progressing = (
            ("True", "Applying", o.ready[2])
            if o.ready[1] == "Progressing"
            else ("False", "Idle", "")
        )
        ready = ("False", "Applying", o.ready[2]) if o.ready[1] == "Progressing" else o.ready
        next_retry = ""
        if o.retry:
            when = time.time() + self.queue.backoff(instance)
            next_retry = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(when))
        new = InstanceStatus(
            instance,
            generation,
            sha,
            disks,
            lastError=o.error,
            nextRetry=next_retry,
            terminal=o.terminal,
        )
        return with_conditions(
            old,
            new,
            {"Ready": ready, "Progressing": progressing, "Degraded": o.degraded},
            now_iso(),
        )


def _ready(s: InstanceStatus) -> bool:
    c = s.condition("Ready")
    return c is not None and c.status == "True"


def _apply_failed(disk: str, message: str) -> Problem:
    return Problem(Severity.ERROR, "apply-failed", f"{disk}: {message}", disk=disk)


@contextlib.contextmanager
def running(loop: Loop) -> Iterator[threading.Thread]:
    """Run a loop on a thread (for tests); stopped and joined on exit."""
    t = threading.Thread(target=loop.run, name="loop", daemon=True)
    t.start()
    try:
        yield t
    finally:
        loop.request_stop()
        t.join()
