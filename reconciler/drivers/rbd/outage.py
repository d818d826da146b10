"""One deadline per step while a Ceph cluster does not answer.

Every Ceph call waits at most the pool's `opTimeout` (rados_osd_op_timeout,
rados_mon_op_timeout and client_mount_timeout are all set to it). A step makes many calls
(lease, record, reference, clone, grow, record again, and on failure its cleanup and the
lease's release), so with an OSD or the monitor gone each call after the first would wait
the whole timeout again: one step took 25 s to fail with opTimeout 5 s.

The invariant kept here: once a call of a client has timed out (or its connect failed),
every call of that client begun within the next `opTimeout` seconds fails at once with
the first failure's message, the cause, instead of waiting again. So a step fails at
most `opTimeout` after its first Ceph call that finds the cluster gone, and its cleanup
is skipped rather than waited for: what it leaves is what a crash at that point leaves,
which the next run finds and finishes or removes (DESIGN invariant 1). Once the window
has passed, the next call tries the cluster again, so a run (or the loop) goes on as
soon as the cluster is back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from reconciler.model.errors import PoolError
from reconciler.util.logs import get_logger

log = get_logger(__name__)


class CephUnreachable(PoolError):
    """A Ceph call was not made: the cluster timed out moments ago (the message is the
    first failure's)."""


class Outage:
    """The first timeout of one Ceph client, shared by everything that uses the client."""

    def __init__(self, op_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.op_timeout = op_timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None
        self._cause = ""

    def note(self, cause: str) -> None:
        """A call timed out (or the connect failed) with message `cause`. Within a window
        already open, the first cause stays."""
        now = self.clock()
        with self._lock:
            if self._since is None or now - self._since >= self.op_timeout:
                self._since = now
                self._cause = cause
                log.warning("ceph.unreachable", cause=cause, fail_fast_for=self.op_timeout)

    def cause(self) -> str | None:
        """The first failure's message while the window is open, else None."""
        now = self.clock()
        with self._lock:
            if self._since is None:
                return None
            if now - self._since >= self.op_timeout:
                self._since = None
                return None
            return self._cause

    def check(self) -> None:
        """Raise CephUnreachable (naming the cause) instead of making a call now."""
        cause = self.cause()
        if cause is not None:
            raise CephUnreachable(cause)
