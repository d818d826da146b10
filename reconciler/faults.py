"""Step boundaries, and a fault-injection hook for crash tests.

Every durable step (a record written, a volume made, grown or removed) ends at a named
boundary. With RECONCILER_CRASH_AT=N the process kills itself with SIGKILL at the Nth
boundary, exactly as a power cut or OOM kill would stop it; with RECONCILER_TRACE_STEPS=FILE
each boundary is appended to FILE so a test can count them. Both are for tests only.
"""

from __future__ import annotations

import os
import signal

_count = 0


def point(name: str) -> None:
    global _count
    _count += 1
    trace = os.environ.get("RECONCILER_TRACE_STEPS")
    if trace:
        with open(trace, "a") as f:
            f.write(f"{_count} {name}\n")
    crash_at = os.environ.get("RECONCILER_CRASH_AT")
    if crash_at and int(crash_at) == _count:
        os.kill(os.getpid(), signal.SIGKILL)
