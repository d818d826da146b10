"""Progress of the long steps (an image fetched, converted, copied, compared, wiped): bytes,
percent, rate and time left, wherever someone looks.

A long step opens a `task(what, total)` and advances it as bytes go by (`advance`, or
`reach` with a fraction, as qemu-img's `-p` reports it: drivers/host/run.py reads it for
the task that is current in its thread). Each task belongs to the action its thread is
applying (`acting`, set by the executor), so every sink names instance, disk and action:

- on a terminal (stderr), one line updated in place at most every half second;
- off a terminal, a structured line every 2 s: a log line where the log shows info (the
  loop's journal), else a `progress key=value ...` line of its own on stderr (a one-shot
  run in a pipeline, whose log shows warnings only);
- `running()`: a snapshot of every task under way, which the loop's metrics serve
  (reconcile_step_done_bytes / _size_bytes) and publishes to its state directory for
  `reconcile status` (`publish_to`), rewritten at most every 2 s and at each task's end.

Progress is never worth a failure: a sink that cannot write is skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reconciler.util import logs

log = logs.get_logger(__name__)

TTY_EVERY = 0.5  # seconds between a terminal line's updates
LOG_EVERY = 2.0  # seconds between structured lines (and publishes)
# Tests set it lower, to see lines of a step that lasts a second.
_ENV_EVERY = "RECONCILER_PROGRESS_EVERY"
# The file in the state directory a loop publishes its tasks to (`reconcile status`).
PROGRESS_FILE = "progress.json"

_action: ContextVar[tuple[str, str, str] | None] = ContextVar("progress_action", default=None)
_task: ContextVar[Task | None] = ContextVar("progress_task", default=None)
_lock = threading.Lock()
_running: dict[int, Task] = {}
_ids = itertools.count(1)
_published: Path | None = None
_last_publish = 0.0


def _every(default: float) -> float:
    try:
        return max(0.0, float(os.environ[_ENV_EVERY]))
    except (KeyError, ValueError):
        return default


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable


def human_seconds(s: float) -> str:
    s = int(s + 0.5)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


@dataclass(frozen=True)
class Snapshot:
    """One task under way, as status and metrics show it."""

    action: str
    instance: str
    disk: str
    step: str
    done: int
    total: int
    rate: float  # bytes per second so far
    eta: float | None  # seconds left at that rate; None before a rate is known
    started: float  # time.time() when it began

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def line(self) -> str:
        who = f"{self.action} {self.instance}/{self.disk}: " if self.instance else ""
        eta = f", {human_seconds(self.eta)} left" if self.eta is not None else ""
        return (
            f"{who}{self.step}: {human_bytes(self.done)} of {human_bytes(self.total)} "
            f"({self.percent:.0f}%) at {human_bytes(self.rate)}/s{eta}"
        )

    def fields(self) -> dict[str, Any]:
        out = asdict(self)
        out["percent"] = round(self.percent, 1)
        out["rate"] = int(self.rate)
        out["eta"] = None if self.eta is None else round(self.eta, 1)
        return out


SNAPSHOT_FIELDS = ("action", "instance", "disk", "step", "done", "total", "rate", "eta", "started")


class Task:
    """One long step's bytes; see the module docstring."""

    def __init__(self, what: str, total: int) -> None:
        self.id = next(_ids)
        self.what = what
        self.total = max(0, total)
        self.done = 0
        self.action = _action.get() or ("", "", "")
        self.start = time.monotonic()
        self.wall = time.time()
        self._tty_at = self.start
        self._log_at = self.start
        self._drawn = False

    def advance(self, n: int) -> None:
        """`n` more bytes done."""
        self._set(self.done + n)

    def reach(self, fraction: float) -> None:
        """`fraction` (0..1) of the total done (qemu-img reports a percentage)."""
        self._set(int(self.total * min(max(fraction, 0.0), 1.0)))

    def _set(self, done: int) -> None:
        self.done = min(done, self.total) if self.total else done
        now = time.monotonic()
        if _tty() and now - self._tty_at >= _every(TTY_EVERY):
            self._tty_at = now
            self._draw()
        if now - self._log_at >= _every(LOG_EVERY):
            self._log_at = now
            self._log()
            _publish(now)

    def snapshot(self) -> Snapshot:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total else None
        action, instance, disk = self.action
        return Snapshot(
            action, instance, disk, self.what, self.done, self.total, rate, eta, self.wall
        )

    def _draw(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(logs.CLEAR_LINE + self.snapshot().line())
            sys.stderr.flush()
            self._drawn = True

    def _log(self) -> None:
        s = self.snapshot()
        if _tty():
            return  # the terminal's line says it
        if logs.enabled(logs.INFO):
            log.info("step.progress", **s.fields())
            return
        pairs = " ".join(f"{k}={_logfmt(v)}" for k, v in s.fields().items())
        with contextlib.suppress(OSError, ValueError):
            print(f"progress {pairs}", file=sys.stderr, flush=True)

    def _end(self) -> None:
        if self._drawn:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(logs.CLEAR_LINE)
                sys.stderr.flush()


def _logfmt(v: Any) -> str:
    text = "" if v is None else str(v)
    return json.dumps(text) if (not text or any(c in text for c in ' "=')) else text


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def acting(action: str, instance: str, disk: str) -> Iterator[None]:
    """The tasks this thread opens belong to `action` of `instance`/`disk`."""
    token = _action.set((action, instance, disk))
    try:
        yield
    finally:
        _action.reset(token)


@contextlib.contextmanager
def task(what: str, total: int) -> Iterator[Task]:
    """A long step of `total` bytes under way (see the module docstring)."""
    t = Task(what, total)
    with _lock:
        _running[t.id] = t
    token = _task.set(t)
    try:
        yield t
    finally:
        _task.reset(token)
        with _lock:
            _running.pop(t.id, None)
        t._end()
        _publish(time.monotonic(), force=True)


def current() -> Task | None:
    """The task this thread has open, if any (qemu-img's progress goes to it)."""
    return _task.get()


def running() -> list[Snapshot]:
    """Every task under way, oldest first."""
    with _lock:
        tasks = sorted(_running.values(), key=lambda t: t.id)
    return [t.snapshot() for t in tasks]


def publish_to(path: Path | None) -> None:
    """Keep `running()` in `path` (JSON, replaced atomically) for `reconcile status`;
    None stops. The loop calls it; a one-shot run publishes nothing."""
    global _published
    _published = path
    if path is not None:
        _publish(time.monotonic(), force=True)


def _publish(now: float, *, force: bool = False) -> None:
    global _last_publish
    path = _published
    if path is None or (not force and now - _last_publish < _every(LOG_EVERY)):
        return
    _last_publish = now
    doc = {
        "pid": os.getpid(),
        "written": time.time(),
        "running": [s.fields() for s in running()],
    }
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with contextlib.suppress(OSError):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)


def read_published(path: Path) -> list[dict[str, Any]]:
    """The tasks a running loop published to `path`; nothing if the file is missing,
    unreadable, not this user's, or its writer is gone. Only shown, never acted on."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if st.st_uid != os.geteuid() or st.st_size > 1 << 20:
            return []
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        pid, items = int(doc["pid"]), list(doc["running"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    try:
        os.kill(pid, 0)
    except OSError:
        return []  # the loop that wrote it is gone: nothing of it is under way
    return [i for i in items if isinstance(i, dict)]
