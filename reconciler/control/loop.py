"""`reconcile watch`: the control loop that keeps a host's disks converged.

The loop decides only *when* an instance is reconciled; *what* is done is the one planner
and executor that `--dry-run` and apply use. Level-triggered and idempotent, as
controller-runtime's reconcilers are:

- watchdog (inotify) sees the manifest directory; a file is read again when a writer has
  closed it (IN_CLOSE_WRITE) or it was renamed into the directory, after `DEBOUNCE` seconds
  of quiet (a burst of writes is one reconcile; an atomic write, temp file + rename, is one
  change, and hidden temp files are never read), and the instances it names (before and
  after) are queued. No file is read while a process holds it open for writing
  (reconciler/control/writers.py): half a manifest rewritten in place is a valid manifest naming
  fewer disks;
- every `resync` seconds every pool is observed again and every manifest whose file
  changed is read again, unless a writer holds it open, so drift (a volume removed behind
  the reconciler's back) is found without any event: one plan of everything, as a dry run
  makes, and the instances with something to do are queued;
- destructive actions of an instance that a manifest still names (a disk removed from it)
  wait until each of its files has been closed and unchanged for `settle` seconds, and
  those of one whose manifest was just removed (--prune) for `settle` seconds after that
  (the instance is Ready False, reason Settling, meanwhile); creates, resizes and
  tombstones do not wait;
- workers take instances off a work queue (reconciler/control/workqueue.py) and reconcile one
  instance at a time each: plan it against its own records and volumes, apply, and map
  the outcome, in one place (`settlement`), to a queue action, a status and a metric
  label; whether an error is retried or waits for its manifest is declared with its code
  (ProblemCode in reconciler/model/plan.py), never decided here;
- nothing is deleted before the whole directory has been read once (the first full read
  happens before any worker starts), a removed manifest file is not a tombstone (its
  disks are reported as orphaned; `--prune` deletes them), and deletions within one resync
  interval beyond `safety.maxDeletePercent` of the managed disks (and more than
  `safety.deleteGuardFloor`) wait, Degraded with reason DeleteGuard;
- SIGTERM and SIGINT start nothing new, let the steps under way finish and exit 0; SIGHUP
  reloads the config (a bad one is reported and the old one kept) and reads every manifest
  again, since whether one is valid depends on the config.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from reconciler.apply.executor import Executor
from reconciler.commands import internal
from reconciler.control.session import Session
from reconciler.control.status import InstanceStatus, StatusStore, now_iso, with_conditions
from reconciler.control.workqueue import WorkQueue
from reconciler.control.writers import held_for_writing
from reconciler.diff import PlanOptions, plan
from reconciler.diff.desired import build_desired
from reconciler.model import (
    DesiredInstance,
    FailedInput,
    Handling,
    Plan,
    Problem,
    ProblemCode,
    Severity,
)
from reconciler.model.errors import InputError, ReconcileError
from reconciler.model.record import RecordKind
from reconciler.schema.config import Config
from reconciler.schema.load import (
    MANIFEST_SUFFIXES,
    FailedManifest,
    LoadedManifest,
    load_config,
    parse_manifest,
)
from reconciler.schema.readfile import read_regular
from reconciler.schema.speed.mcache import stat_key
from reconciler.util.logs import get_logger
from reconciler.util.statedir import private_dir, private_file

log = get_logger("reconciler.control.loop")

DEBOUNCE = 0.05
DEFAULT_SETTLE = 5.0  # seconds a manifest is closed and unchanged before a disk it drops goes
DEFAULT_RESYNC = 60.0
DEFAULT_WORKERS = 4
SIGNAL_POLL = 0.2  # seconds: the longest a signal waits for its handler


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
        for label in ("success", "error"):  # scraped as 0 before the first of each
            self.reconciles.labels("reconcile", label)

    def reconciled(self, label: str) -> None:
        """Count one reconcile by its result label: every "error" is also an error, so
        the two counters controller-runtime keeps always agree."""
        self.reconciles.labels("reconcile", label).inc()
        if label == "error":
            self.errors.inc()


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
        # One read of the file (reconciler/schema/readfile.py: a regular file only, never
        # through a link, never blocking, bounded): its hash, its key and its manifest
        # all come from the same bytes. The name's lstat only saves reading an unchanged
        # file again; whatever else stands there is read, and refused, once per change.
        try:
            key = stat_key(os.lstat(path))
        except FileNotFoundError:
            return self.forget(path)
        with self.lock:
            old = self.files.get(path)
        if if_changed and old is not None and old.key == key:
            return set()
        result: LoadedManifest | FailedManifest
        try:
            read = read_regular(path)
        except InputError as e:
            if not os.path.lexists(path):
                return self.forget(path)
            result, sha = FailedManifest(path, (e,), None), ""
        else:
            key = stat_key(read.stat)  # what was read, should the name have changed since
            sha = hashlib.sha256(read.data).hexdigest()
            result = parse_manifest(path, read.data, config)
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

    def refresh(
        self,
        config: Config,
        *,
        skip: Callable[[str], bool] | None = None,
        force: bool = False,
    ) -> set[str]:
        """Read every file whose stat changed (every file if `force`) but those `skip`
        keeps as last read, forget the removed ones: what changed."""
        changed: set[str] = set()
        present = set(self.names())
        with self.lock:
            known = set(self.files)
        for path in known - present:
            changed |= self.forget(path)
        for path in sorted(present):
            if skip is not None and skip(path):
                continue
            changed |= self.read(path, config, if_changed=not force)
        return changed

    def key(self, path: str) -> tuple[int, int, int, int, int] | None:
        """The stat key of the file as last read (None: never read)."""
        with self.lock:
            e = self.files.get(path)
            return e.key if e is not None else None

    def paths_of(self, instance: str) -> list[str]:
        with self.lock:
            return sorted(self.by_instance.get(instance, ()))

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
        # A close after writing, a rename and a removal end a write. A modification or a
        # creation may be a writer in the middle of the file (or a chmod, or a rename from
        # another directory, which watchdog reports as a creation): the file is read only
        # once no process holds it open for writing.
        ended = event.event_type in ("closed", "moved", "deleted")
        for p in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(p) if p else ""
            if (
                path
                and os.path.dirname(path) == str(self.loop.index.dir)
                and ManifestIndex.wanted(os.path.basename(path))
            ):
                self.loop.changed(path, ended=ended)


class StateLock:
    """One loop per state directory: an flock on `watch.lock`, which holds the PID."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "watch.lock"
        private_dir(state_dir)  # 0700, its files 0600 (reconciler/util/statedir.py)
        private_file(self.path, ())
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


class Result(Enum):
    """How a reconcile ended; `settlement` maps each to what the loop does next."""

    CONVERGED = "converged"
    WAITING = "waiting"  # nothing to do until a manifest names the instance again
    BACKOFF = "backoff"  # an error that may pass by itself
    TERMINAL = "terminal"  # an error that waits for the manifest (or an operator)


class QueueAction(Enum):
    FORGET = "forget"  # done: no retry, and the next failure starts a fresh backoff
    BACKOFF = "backoff"  # requeued after the instance's backoff


@dataclass(frozen=True)
class Settlement:
    queue: QueueAction
    label: str  # controller_runtime_reconcile_total's result
    terminal: bool  # the status says it waits for its manifest to change


def settlement(result: Result) -> Settlement:
    """The one mapping of a reconcile's result to its queue action, metric label and the
    status's terminality (controller-runtime's switch)."""
    match result:
        case Result.CONVERGED:
            return Settlement(QueueAction.FORGET, "success", terminal=False)
        case Result.WAITING:
            return Settlement(QueueAction.FORGET, "success", terminal=True)
        case Result.BACKOFF:
            return Settlement(QueueAction.BACKOFF, "error", terminal=False)
        case Result.TERMINAL:
            return Settlement(QueueAction.FORGET, "error", terminal=True)


@dataclass(frozen=True)
class Outcome:
    """A reconcile's result with its status conditions (see `Loop._outcome`)."""

    result: Result
    ready: tuple[str, str, str]  # (status, reason, message)
    degraded: tuple[str, str, str]
    error: str = ""

    @property
    def settled(self) -> Settlement:
        return settlement(self.result)

    @classmethod
    def failed(cls, reason: str, message: str, *, terminal: bool) -> Outcome:
        """Not ready and degraded for `reason`: retried with backoff unless terminal."""
        return cls(
            Result.TERMINAL if terminal else Result.BACKOFF,
            ("False", reason, message),
            ("True", reason, message),
            error=message,
        )

    @classmethod
    def of(cls, problem: Problem) -> Outcome:
        """The outcome of an error, as its code declares it."""
        code = problem.code
        return cls.failed(code.reason, problem.message, terminal=code.handling is Handling.TERMINAL)


class Loop:
    def __init__(
        self,
        config_path: str,
        directory: Path,
        *,
        resync: float = DEFAULT_RESYNC,
        settle: float = DEFAULT_SETTLE,
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
        self.settle = settle
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
        # Under _pending_cond: files written and not closed since (a writer may hold them),
        # and when each file last had an event (monotonic), for the settle time.
        self._open: set[str] = set()
        self._touched: dict[str, float] = {}
        self._changed_at: dict[str, float] = {}  # instance -> its manifests last changed
        self._queued_at: dict[str, float] = {}
        self._deletes: deque[tuple[float, int]] = deque()  # (when, disks destroyed)
        self._deletes_lock = threading.Lock()
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

    def changed(self, path: str, *, ended: bool = True) -> None:
        """A manifest file had an event: read it once its writes are quiet and, unless
        `ended` (closed, renamed, removed), once no writer holds it open."""
        with self._pending_cond:
            now = time.monotonic()
            self._touched[path] = now
            if ended:
                self._open.discard(path)
            else:
                self._open.add(path)
            self._pending[path] = now + DEBOUNCE
            self._pending_cond.notify()

    def _held_open(self, path: str) -> bool:
        """Whether a writer holds `path` open (then its close is awaited). Asked of every
        file about to be read, not only of those with writes and no close: events come
        late (watchdog holds inotify's for half a second to pair renames), and the close
        of one write may be read after the next writer opened the file again. The
        kernel's answer (a lease) is cheap; /proc is scanned, where the kernel cannot
        say, only for a file that had writes without a close."""
        with self._pending_cond:
            was_open = path in self._open
        if path in held_for_writing([path], scan=was_open):
            with self._pending_cond:
                self._open.add(path)
            log.info("manifest.held_open", file=path, waits="for the writer to close it")
            return True
        with self._pending_cond:
            self._open.discard(path)
        return False

    def _busy(self) -> Callable[[str], bool]:
        """For one pass over the directory (a resync, a reload): whether a file that
        changed since it was read is held open by a writer, to be kept as last read; a
        file never read is read (its instance's deletions still wait for the settle
        time)."""

        def busy(path: str) -> bool:
            key = self.index.key(path)
            if key is None:
                return False
            try:
                if stat_key(os.stat(path)) == key:
                    return False
            except OSError:
                return False
            return self._held_open(path)

        return busy

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
                    if self._held_open(path):
                        continue  # its close is an event of its own
                    for inst in self.index.read(path, self.config):
                        self._manifest_changed(inst)
                except OSError as e:
                    log.error("manifest.read_failed", file=path, error=str(e))

    def _forget_settled(self) -> None:
        """Event times older than the settle time say nothing more: dropped, so that a
        directory with much churn does not grow these maps."""
        with self._pending_cond:
            old = time.monotonic() - self.settle
            for times in (self._touched, self._changed_at):
                for k in [k for k, t in times.items() if t < old]:
                    del times[k]

    def _manifest_changed(self, instance: str) -> None:
        with self._pending_cond:
            self._changed_at[instance] = time.monotonic()
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
        # Every manifest is read again: whether it is valid depends on the config (its
        # pools and images), and an unchanged file would not be read by the resync.
        try:
            self.index.refresh(config, skip=self._busy(), force=True)
        except OSError as e:
            log.error("manifest.read_failed", file=str(self.index.dir), error=str(e))
        for inst in self.index.instances():
            self.queue.forget(inst)
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
                self._forget_settled()
                changed = self.index.refresh(self.config, skip=self._busy())
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
        drift = [w for w in full.warnings if w.code is ProblemCode.DRIFT]
        if drift and not first:
            self.metrics.drift.inc(len(drift))
            for w in drift:
                log.warning("drift", instance=w.instance, disk=w.disk, volume=w.volume)
        everyone = {i.instance for i in desired.instances}
        everyone |= {r.instance for r in observed.records if r.kind is RecordKind.DISK}
        everyone |= {f.instance for f in desired.failed if f.instance}  # invalid: a status too
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
                # One line (as the CLI's edge): the traceback goes to a private file.
                text = internal.traceback_text(e)
                where = internal.keep_traceback(text)
                log.error(
                    "reconcile.crashed",
                    instance=inst,
                    error=internal.one_line(e),
                    traceback=text if where is None else where,  # kept somewhere, never lost
                )
                self._settle(inst, Outcome.failed("ReconcileCrashed", str(e), terminal=False))
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
        errors = [_located(e, [*failed, *self.index.unknown_failures()]) for e in p.errors]
        failed_steps = 0
        if p.actions:  # what can be done is done, beside what is refused (as one-shot runs)
            wait, held = self._unsettled(instance, wanted, p)
            if wait > 0:
                doomed = sorted({a.disk for a in p.actions if a.destructive})
                why = (
                    f"a process holds {', '.join(held)} open for writing"
                    if held
                    else f"until the manifest has been closed and unchanged for {self.settle:g} s"
                )
                msg = f"{len(doomed)} disk(s) to destroy ({', '.join(doomed)}): waiting {why}"
                # Waiting, not settled: the instance is queued again once the time is up.
                settling = Outcome(
                    Result.WAITING, ("False", "Settling", msg), ("False", "AsExpected", "")
                )
                self._write_status(instance, settling)
                log.info("settling", instance=instance, disks=doomed, seconds=round(wait, 3))
                self.enqueue(instance, delay=wait)
                return
            guard = self._guard(p)
            if guard is not None:
                self._write_status(instance, guard)
                self._settle(instance, guard)
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
        self._settle(instance, outcome)

    def _settle(self, instance: str, o: Outcome) -> None:
        """Do what the outcome's settlement says: its queue action and its metrics."""
        s = o.settled
        match s.queue:
            case QueueAction.BACKOFF:
                self.metrics.retries.inc()
                self.queue.add_rate_limited(instance)
            case QueueAction.FORGET:
                self.queue.forget(instance)
        self.metrics.reconciled(s.label)

    def _unsettled(
        self, instance: str, wanted: tuple[DesiredInstance, ...], p: Plan
    ) -> tuple[float, list[str]]:
        """Seconds until a plan that destroys disks of an instance a manifest still names
        may be applied: each of its files closed (no writer holds it) and unchanged for
        `settle` seconds, by the loop's events and by the file's ctime (a change whose
        events were missed, or made before the loop started); 0: go ahead. And the files
        a writer holds open, if that is why."""
        if not any(a.destructive for a in p.actions):
            return 0.0, []
        now, wall = time.monotonic(), time.time()
        if not wanted:
            # No manifest names it (--prune): one removed a moment ago may be on its way
            # back (an editor that unlinks and writes anew, `rm f; cat > f`).
            with self._pending_cond:
                t = self._changed_at.get(instance)
            return (max(0.0, t + self.settle - now) if t is not None else 0.0), []
        if all(d.deleted for d in wanted):
            return 0.0, []  # a tombstone: never half a file
        paths = self.index.paths_of(instance)
        wait = 0.0
        with self._pending_cond:
            if any(path in self._open or path in self._pending for path in paths):
                return self.settle, []  # written and not closed, or its event not read yet
            times = [self._touched.get(path) for path in paths]
            times.append(self._changed_at.get(instance))
        for t in times:
            if t is not None:
                wait = max(wait, t + self.settle - now)
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                return self.settle, []  # removed since it was read: its event follows
            if stat_key(st) != self.index.key(path):
                return self.settle, []  # changed since it was read
            age = wall - st.st_ctime  # ctime, which no one can set (mtime can be)
            if age >= -1.0:  # a ctime in the future is a clock that went back: ignored
                wait = max(wait, min(self.settle - age, self.settle))
        if wait > 0:
            return wait, []
        held = sorted(held_for_writing(paths))
        return (self.settle if held else 0.0), held

    def _guard(self, p: Plan) -> Outcome | None:
        """The delete guard: destructive actions beyond the share allowed in one resync
        interval wait (Degraded, DeleteGuard) until the limit allows them."""
        doomed = sum(1 for a in p.actions if a.destructive)
        if not doomed:
            return None
        session = self.session
        assert session is not None
        # The disks managed now, not as the last resync counted them: the limit (and its
        # message) follow creates and deletes made since.
        managed = sum(1 for r in session.store.load().records if r.kind is RecordKind.DISK)
        safety = self.config.safety
        now = time.monotonic()
        with self._deletes_lock:
            while self._deletes and self._deletes[0][0] < now - self.resync_interval:
                self._deletes.popleft()
            recent = sum(n for _, n in self._deletes)
            limit = max(safety.delete_guard_floor, safety.max_delete_percent * managed / 100)
            if recent + doomed > limit:
                msg = (
                    f"{doomed} disk(s) to destroy, after {recent} in the last "
                    f"{self.resync_interval:g} s: more than the limit of {limit:g} "
                    f"(safety.maxDeletePercent {safety.max_delete_percent}% of {managed} "
                    f"managed disks, at least safety.deleteGuardFloor "
                    f"{safety.delete_guard_floor}). Run 'reconcile --force' once, or raise the "
                    "limit and send SIGHUP"
                )
                return Outcome.failed("DeleteGuard", msg, terminal=False)
            self._deletes.append((now, doomed))
        return None

    def _progressing(self, instance: str, p: Plan) -> Outcome:
        msg = f"applying {len(p.actions)} action(s)"
        # Written as the status only, never settled: the reconcile's end is.
        return Outcome(Result.CONVERGED, ("False", "Progressing", msg), ("False", "AsExpected", ""))

    def _outcome(
        self,
        instance: str,
        p: Plan | None,
        errors: list[Problem],
        warnings: list[Problem],
        failed_steps: int,
    ) -> Outcome:
        """A reconcile's result and status, from its errors (each code declares whether
        it is terminal) and warnings; `settlement` maps it to the queue and metrics."""
        if errors:
            # Retried while any error may pass by itself; terminal only when all wait for
            # the manifest (or an operator) to change.
            transient = [e for e in errors if e.code.handling is not Handling.TERMINAL]
            return Outcome.of((transient or errors)[0])
        orphaned = [w for w in warnings if w.code is ProblemCode.ORPHANED_RECORD]
        if orphaned and not self.index.desired_for(instance)[2]:
            msg = (
                f"no manifest names this instance; its {len(orphaned)} disk(s) are kept "
                "(watch --prune deletes them)"
            )
            return Outcome(
                Result.WAITING, ("Unknown", "NoManifest", msg), ("False", "NoManifest", msg)
            )
        elsewhere = [w for w in warnings if w.code is ProblemCode.OWNED_ELSEWHERE]
        if elsewhere:
            # Another live host owns the instance (it is moving): not ready here, and not
            # an error either; a resync plans the take-over once that host lets it go.
            msg = f"{len(elsewhere)} disk(s) owned by another host: {elsewhere[0].message}"
            return Outcome(
                Result.WAITING,
                ("False", ProblemCode.OWNED_ELSEWHERE.reason, msg),
                ("False", "AsExpected", ""),
            )
        done = f"{len(p.actions)} action(s) applied" if p and p.actions else "nothing to do"
        return Outcome(Result.CONVERGED, ("True", "Converged", done), ("False", "AsExpected", ""))

    def _write_status(self, instance: str, o: Outcome) -> None:
        assert self.status is not None
        session = self.session
        if (
            o.settled.label == "success"
            and o.ready[1] != "Progressing"
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
        settled = o.settled
        if settled.queue is QueueAction.BACKOFF:
            when = time.time() + self.queue.backoff(instance)
            next_retry = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(when))
        new = InstanceStatus(
            instance,
            generation,
            sha,
            disks,
            lastError=o.error,
            nextRetry=next_retry,
            terminal=settled.terminal,
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


def _located(e: Problem, failed: list[FailedManifest]) -> Problem:
    """An invalid manifest's error as `reconcile validate` says it, file:line:column first
    (the plan keeps file and line apart, and no column)."""
    if e.code != "manifest-invalid":
        return e
    for f in failed:
        for err in f.errors:
            text = f"{err.field}: {err.message}" if err.field else err.message
            if (f.file, err.location.line, text) == (e.file, e.line, e.message):
                return replace(e, message=str(err))
    return e


def _apply_failed(disk: str, message: str) -> Problem:
    return Problem(Severity.ERROR, ProblemCode.APPLY_FAILED, f"{disk}: {message}", disk=disk)


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
