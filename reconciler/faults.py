"""Step boundaries, and a fault-injection hook for crash tests.

Every durable step (a record written, a volume made, grown or removed) ends at a named
boundary. With RECONCILER_CRASH_AT=N the process kills itself with SIGKILL at the Nth
boundary, exactly as a power cut or OOM kill would stop it; with RECONCILER_TRACE_STEPS=FILE
each boundary is appended to FILE so a test can count them; with
RECONCILER_INTERRUPT_AT=N[,M...] it sends itself SIGINT (Ctrl-C) there. All are for tests
only.
"""

from __future__ import annotations

import os
import signal
import threading

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
