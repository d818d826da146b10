"""`reconcile watch`: the control loop that keeps a host's disks converged.

The loop decides only *when* an instance is reconciled; *what* is done
(reconciler/control/reconcile.py) is the one planner and executor that `--dry-run` and
apply use. Level-triggered and idempotent, as controller-runtime's reconcilers are. This
module owns the threads, the signals and the run:

- watchdog (inotify) sees the manifest directory; a file is read again when a writer has
  closed it (IN_CLOSE_WRITE) or it was renamed into the directory, after `DEBOUNCE` seconds
  of quiet (a burst of writes is one reconcile; an atomic write, temp file + rename, is one
  change, and hidden temp files are never read), and the instances it names (before and
  after) are queued. No file is read while a process holds it open for writing
  (reconciler/control/writers.py): half a manifest rewritten in place is a valid manifest
  naming fewer disks (what the loop keeps of the directory: reconciler/control/index.py);
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
  the outcome, in one place (reconciler/control/outcome.py), to a queue action, a status
  and a metric label; whether an error is retried or waits for its manifest is declared
  with its code (ProblemCode in reconciler/model/plan.py), never decided here;
- nothing is deleted before the whole directory has been read once (the first full read
  happens before any worker starts), a removed manifest file is not a tombstone (its
  disks are reported as orphaned; `--prune` deletes them), and deletions within one resync
  interval beyond `safety.maxDeletePercent` of the managed disks (and more than
  `safety.deleteGuardFloor`) wait, Degraded with reason DeleteGuard;
- SIGTERM and SIGINT start nothing new, let the steps under way finish and exit 0; SIGHUP
  reloads the config (a bad one is reported and the old one kept) and reads every manifest
  again, since whether one is valid depends on the config;
- systemd (Type=notify) is told READY=1 once the loop is ready, STOPPING=1 on the way
  out, and, when its unit sets WatchdogSec=, WATCHDOG=1 every half of it from the main
  thread's cycle: a main thread that stops cycling stops them, and systemd restarts it;
- one loop per state directory (`StateLock`); a stopped loop leaves no port open and no
  thread running.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server
from watchdog.observers import Observer

from reconciler.commands import internal
from reconciler.control.index import DirectoryEvents, ManifestIndex, Settling
from reconciler.control.metrics import Metrics
from reconciler.control.outcome import Outcome
from reconciler.control.reconcile import DeleteGuard, Reconciler
from reconciler.control.session import Session
from reconciler.control.status import StatusStore
from reconciler.control.workqueue import WorkQueue
from reconciler.model.errors import ReconcileError
from reconciler.schema.load import load_config
from reconciler.util import faults, progress
from reconciler.util.logs import get_logger
from reconciler.util.progress import PROGRESS_FILE
from reconciler.util.statedir import private_dir, private_file

log = get_logger(__name__)

DEFAULT_SETTLE = 5.0  # seconds a manifest is closed and unchanged before a disk it drops goes
DEFAULT_RESYNC = 60.0
DEFAULT_WORKERS = 4
SIGNAL_POLL = 0.2  # seconds: the longest a signal waits for its handler


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
    """Tell systemd (Type=notify) something, if it asked to be told; True if sent. A send
    that fails (the manager gone) is logged, never raised: the loop runs on."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message.encode(), addr)
    except OSError as e:
        log.warning("sd_notify.failed", message=message, socket=addr, error=str(e))
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1, half the WatchdogSec= systemd passes as
    WATCHDOG_USEC (as sd_watchdog_enabled reads it: WATCHDOG_PID, where set, must be
    this process); None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # the variables were meant for another process (a parent)
    try:
        n = int(usec)
    except ValueError:
        n = 0
    if n <= 0:
        log.warning("watchdog.ignored", WATCHDOG_USEC=usec, reason="not a positive integer")
        return None
    return n / 2e6


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
        self.settling = Settling(self.index, settle)
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
        self._queued_at: dict[str, float] = {}
        self._old_sessions: list[Session] = []
        self.session: Session | None = None
        self.reconciler: Reconciler | None = None  # while running
        self.ready = threading.Event()

    # -- queueing ---------------------------------------------------------------------

    def enqueue(self, instance: str, delay: float = 0.0) -> None:
        self._queued_at.setdefault(instance, time.monotonic() + max(delay, 0.0))
        self.metrics.adds.inc()
        if delay > 0:
            self.queue.add_after(instance, delay)
        else:
            self.queue.add(instance)
        self.metrics.depth.set(self.queue.depth())

    def _manifest_changed(self, instance: str) -> None:
        self.settling.instance_changed(instance)
        self.queue.forget(instance)  # a new manifest starts with a fresh backoff
        self.enqueue(instance)

    def _debouncer(self) -> None:
        while not self.stop.is_set():
            for path in self.settling.due():
                try:
                    if self.settling.held_open(path):
                        continue  # its close is an event of its own
                    for inst in self.index.read(path, self.config):
                        self._manifest_changed(inst)
                except OSError as e:
                    log.error("manifest.read_failed", file=path, error=str(e))

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
        status = StatusStore(self.config.state_dir() / "status.sqlite")
        self.metrics.start(st.instance for st in status.all() if not st.is_ready())
        self.reconciler = Reconciler(
            self.index,
            self.settling,
            self.queue,
            self.metrics,
            status,
            self.enqueue,
            self.stop,
            DeleteGuard(self.resync_interval),
            prune=self.prune,
            jobs=self.jobs,
        )
        observer = Observer()
        events = DirectoryEvents(self.index.dir, self.settling.changed)
        observer.schedule(events, str(self.index.dir), recursive=False)
        observer.start()  # before the first read: a change during it is seen again
        progress.publish_to(self.config.state_dir() / PROGRESS_FILE)  # for reconcile status
        threads: list[threading.Thread] = []
        metrics_server: tuple[Any, threading.Thread] | None = None
        try:
            if self.metrics_port is not None:
                metrics_server = start_http_server(
                    self.metrics_port, addr=self.metrics_address, registry=self.metrics.registry
                )
            self.index.refresh(self.config)
            self.resync(first=True)
            threads = self._start_threads()
            self._serve()
        finally:
            self._shutdown(threads, observer, metrics_server, status)
            progress.publish_to(None)
            with contextlib.suppress(OSError):
                (self.config.state_dir() / PROGRESS_FILE).unlink()
            for sig, old in handlers.items():
                signal.signal(sig, old)
        log.info("stopped")
        return 0

    def _start_threads(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True)
            for i in range(self.workers)
        ]
        threads.append(threading.Thread(target=self._debouncer, name="debounce", daemon=True))
        threads.append(threading.Thread(target=self._resyncer, name="resync", daemon=True))
        threads.append(threading.Thread(target=self._beater, name="heartbeat", daemon=True))
        for t in threads:
            t.start()
        return threads

    def _serve(self) -> None:
        """The main thread, once the loop is ready: signals, until one says stop.

        It is also the loop's heartbeat to systemd (WatchdogSec=): each cycle that finds
        a WATCHDOG=1 due sends one, so a main thread that stops cycling (wedged in a
        reload, a lock, a hung call) stops sending them and systemd restarts the service.
        Long steps run on the workers and do not hold it up; a worker thread that dies
        stops the whole loop (commands/watch.py)."""
        log.info("ready", instances=len(self.index.instances()), dir=str(self.index.dir))
        sd_notify("READY=1")
        self.ready.set()
        every = watchdog_interval()
        poll = SIGNAL_POLL if every is None else min(SIGNAL_POLL, every)
        last_beat = time.monotonic()
        if every is not None:
            log.info("watchdog", interval=every)
            sd_notify("WATCHDOG=1")
        while not self.stop.is_set():
            # With a timeout: Linux hands a signal to any thread, and Python runs its
            # handler only in the main thread once that executes again, which an
            # untimed wait never does (SIGTERM was lost about one time in ten).
            self._wake.wait(poll)
            self._wake.clear()
            if self._reload:
                self._reload = False
                self._reload_config()
            faults.hold("loop.main")  # tests wedge the main thread here
            if every is not None and time.monotonic() - last_beat >= every:
                last_beat = time.monotonic()
                if not self.stop.is_set():
                    sd_notify("WATCHDOG=1")
        log.info("stopping", reason="signal", working=sorted(self.queue.processing()))
        sd_notify("STOPPING=1")

    def _shutdown(
        self,
        threads: list[threading.Thread],
        observer: Any,
        metrics_server: tuple[Any, threading.Thread] | None,
        status: StatusStore,
    ) -> None:
        """Let the steps under way finish, join every thread, close what the run opened."""
        self.stop.set()
        self.queue.shutdown()
        self.settling.wake()
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
        status.close()

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
            self.index.refresh(config, skip=self.settling.busy(), force=True)
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
                self.settling.forget_settled()
                changed = self.index.refresh(self.config, skip=self.settling.busy())
                for inst in changed:
                    self._manifest_changed(inst)
                self.resync()
            except ReconcileError as e:
                log.error("resync.failed", error=str(e))

    def resync(self, *, first: bool = False) -> None:
        """Observe every pool and plan everything once (Reconciler.resync)."""
        assert self.session is not None and self.reconciler is not None
        self.reconciler.resync(self.session, first=first)

    # -- one reconcile ----------------------------------------------------------------

    def _worker(self) -> None:
        assert self.reconciler is not None
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
                crashed = Outcome.failed("ReconcileCrashed", str(e), terminal=False)
                self.reconciler.settle(inst, crashed)
            finally:
                took = time.monotonic() - start
                self.metrics.work_time.observe(took)
                self.metrics.duration.observe(took)
                self.queue.done(inst)

    def reconcile(self, instance: str) -> None:
        """Reconcile one instance with the session of the moment (Reconciler.reconcile)."""
        assert self.session is not None and self.reconciler is not None
        self.reconciler.reconcile(self.session, instance)


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
