"""Step boundaries, and a fault-injection hook for crash tests.

Every durable step (a record written, a volume made, grown or removed) ends at a named
boundary. With RECONCILER_CRASH_AT=N the process kills itself with SIGKILL at the Nth
boundary, exactly as a power cut or OOM kill would stop it; with RECONCILER_TRACE_STEPS=FILE
each boundary is appended to FILE so a test can count them; with
RECONCILER_INTERRUPT_AT=N[,M...] it sends itself SIGINT (Ctrl-C) there; with
RECONCILER_PAUSE_AT=N:FILE it creates FILE at the Nth boundary and waits (at most 5 min)
until FILE is removed, so a test can change the world (stop a daemon) between two steps.
With RECONCILER_HOLD_AT=NAME:FILE a thread that passes hold point NAME while FILE exists
creates FILE.held and waits (at most 5 min) until FILE is removed: a wedged thread, for
as long as a test wants one (hold points are not steps and are not counted).
All are for tests only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

_count = 0
_lock = threading.Lock()  # steps on apply's worker threads are counted one at a time


def point(name: str) -> None:
    global _count
    with _lock:
        _count += 1
        n = _count
        trace = os.environ.get("RECONCILER_TRACE_STEPS")
        if trace:
            with open(trace, "a") as f:
                f.write(f"{n} {name}\n")
    crash_at = os.environ.get("RECONCILER_CRASH_AT")
    if crash_at and int(crash_at) == n:
        os.kill(os.getpid(), signal.SIGKILL)
    interrupt_at = os.environ.get("RECONCILER_INTERRUPT_AT")
    if interrupt_at and str(n) in interrupt_at.split(","):
        os.kill(os.getpid(), signal.SIGINT)  # as an operator's Ctrl-C
    pause_at = os.environ.get("RECONCILER_PAUSE_AT")
    if pause_at and pause_at.split(":", 1)[0] == str(n):
        flag = pause_at.split(":", 1)[1]
        with open(flag, "w") as f:
            f.write(f"{n} {name}\n")
        deadline = time.monotonic() + 300
        while os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.02)  # the test removes the file; nothing here to wait on instead


def hold(name: str) -> None:
    """A hold point (see the module's docstring): with RECONCILER_HOLD_AT=NAME:FILE, wait
    here while FILE exists, saying so in FILE.held (removed when the hold ends)."""
    spec = os.environ.get("RECONCILER_HOLD_AT")
    if not spec:
        return
    at, _, flag = spec.partition(":")
    if at != name or not flag or not os.path.exists(flag):
        return
    held = flag + ".held"
    with open(held, "w") as f:
        f.write(f"{os.getpid()} {name}\n")
    deadline = time.monotonic() + 300
    while os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.02)  # the test removes the file; nothing here to wait on instead
    with contextlib.suppress(FileNotFoundError):
        os.unlink(held)
