"""The reconciler's loggers: structlog's, imported when the first line is emitted.

Importing structlog takes about 45 ms here (27 of them asyncio, which structlog.stdlib
imports), a sixth of a `reconcile` run that has nothing to do; at the default level most
runs emit no line at all. A logger of this module is structlog's `get_logger(name)` once
a line at or above the configured level is emitted; `configure` is applied then, or at
once if structlog is loaded already (a test's structlog.testing.capture_logs then
replaces its processors, as it would without this module).
"""

from __future__ import annotations

import io
import sys
import threading
from typing import Any, TextIO, cast

# logging's numbers, without importing logging.
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_LEVEL = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "exception": ERROR}

# Re-entrant: a signal handler that logs may run while its own thread is inside _emit.
_lock = threading.RLock()
_threshold = 0  # lines below it are dropped here; 0 until configure(): all go to structlog
_pending: tuple[int, bool] | None = None  # (level, json_lines) not yet given to structlog


# Erases the terminal's current line: an in-place progress line (an image fetch's, the
# executor's) that a log line would otherwise continue.
CLEAR_LINE = "\r\x1b[2K"


class _Stderr(io.TextIOBase):
    """Whatever sys.stderr is when a line is logged. main() may run under a redirected
    stderr that is closed afterwards (a caller's capture, a test's), and the logging set up
    here outlives it: a later log line must not go to a closed file. On a terminal each
    line starts by clearing the line the cursor is on, so a retry notice is a line of its
    own, never the tail of a progress line (which its next update draws again)."""

    _at_start = True  # the next write begins a line (structlog writes a line, then "\n")

    def write(self, text: str) -> int:
        err = sys.stderr
        if self._at_start and text and text != "\n" and err.isatty():
            err.write(CLEAR_LINE)
        if text:
            self._at_start = text.endswith("\n")
        return err.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: int, *, json_lines: bool = False) -> None:
    """Lines at `level` and above to stderr: readable console lines, or (json_lines, off a
    terminal) one JSON object a line, for a service's journal."""
    global _threshold, _pending
    with _lock:
        _threshold = level
        _pending = (level, json_lines)
        if "structlog" in sys.modules:
            _apply()


def enabled(level: int) -> bool:
    """Whether a line at `level` would be shown."""
    return level >= _threshold


def _apply() -> None:
    """Give the pending configuration to structlog (the caller holds _lock)."""
    global _pending
    if _pending is None:
        return
    import structlog

    level, json_lines = _pending
    _pending = None
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(sort_keys=True)
        if json_lines and not sys.stderr.isatty()
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Stderr())),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        cache_logger_on_first_use=False,
    )


class Logger:
    """structlog's logger `name`, made when its first line is emitted."""

    __slots__ = ("_log", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._log: Any = None

    def _emit(self, method: str, event: str, kw: dict[str, Any]) -> None:
        if _LEVEL[method] < _threshold:
            return
        if self._log is None or _pending is not None:
            with _lock:
                _apply()
                if self._log is None:
                    import structlog

                    self._log = structlog.get_logger(self._name)
        getattr(self._log, method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        """An error line with the exception being handled."""
        self._emit("exception", event, kw)


def get_logger(name: str) -> Logger:
    return Logger(name)
