"""libvirt connections: per URI one, or a few when actions run in parallel (`spread`),
re-opened after a lost connection, with capped exponential backoff on transient errors.

A daemon serves at most `max_client_requests` calls of one connection at once (5 in a
stock libvirtd.conf); a call beyond them waits in the daemon, unread, until one ends. So
`--jobs 8` on one connection ran 5 volume builds at a time, not 8. Each thread keeps to
one connection of its URI (a libvirt object belongs to the connection it came from), and
threads are dealt over `ceil(jobs / CALLS_PER_CONNECTION)` connections.

Two kinds of trouble are retried, differently:
- a lost connection (the daemon restarting, or down: then libvirt.open itself fails) is
  re-opened with capped backoff until `reconnect_timeout` seconds have passed since the
  connection was first found lost. The outage is shared by every call on that URI, so once
  its deadline has passed each further call fails at once (until a connection opens
  again), rather than every step of an apply waiting the whole timeout once more. A URI
  this process has never reached is not a lost connection but a daemon that may not be
  there at all: it gets `FIRST_CONTACT` seconds (a few quick tries), then fails saying so;
- a busy pool is waited on, with capped backoff, until `busy_timeout` seconds have passed
  since the call first found it busy. libvirt refuses a pool refresh (storagePoolRefresh;
  also destroy, delete and undefine, which we never call) with "pool has asynchronous jobs
  running" while any client is building a volume in the pool (storageVolCreateXML and
  createXMLFrom count as the pool's asyncjobs while their volume is built). Another run's
  ordinary work on the same pool is that, so it must never fail a run: the wait ends when
  the build does, and the deadline is only for a build that never ends;
- other transient errors are retried a fixed number of times.

A call whose connection dropped after its request was sent may still have been carried
out: libvirtd finishes a call whose client has gone. Callers of calls that are not
idempotent (making a volume) deal with that; see file/volumes.py (PoolDir.create_xml).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from reconciler.model.errors import PoolError
from reconciler.util.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised and rendered once."""


libvirt.registerErrorHandler(_quiet, None)

# Errors worth another try: a pool busy with another client's job, a dropped connection.
_TRANSIENT_CODES = {
    libvirt.VIR_ERR_OPERATION_INVALID,  # "pool has asynchronous jobs running"
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INTERNAL_ERROR,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
}
_TRANSIENT_TEXT = (
    "asynchronous jobs running",
    "client socket is closed",
    "connection",
    "End of file while reading data",
    "Broken pipe",
    "Cannot recv data",
    "Cannot write data",
    "in use by another",
)
# Permanent failures that share a transient code.
_PERMANENT_TEXT = ("Too many storage_vols",)


def is_connection_lost(err: libvirt.libvirtError) -> bool:
    """The daemon cannot be reached: it is down or restarting ("Failed to connect socket"),
    or it dropped the connection during a call ("End of file while reading data",
    "Cannot write data: Broken pipe", "client socket is closed")."""
    code = err.get_error_code()
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_RPC):
        return True
    return err.get_error_domain() == libvirt.VIR_FROM_RPC and code in (
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    )


def is_transient(err: libvirt.libvirtError) -> bool:
    msg = str(err)
    if any(t in msg for t in _PERMANENT_TEXT):
        return False
    if err.get_error_code() in (libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT):
        return True
    return err.get_error_code() in _TRANSIENT_CODES and any(t in msg for t in _TRANSIENT_TEXT)


class Backoff:
    """Capped exponential backoff: `first` seconds doubling to at most `cap`. A busy pool
    gets `attempts` tries; a lost connection is retried until its deadline instead."""

    def __init__(
        self,
        attempts: int = 8,
        first: float = 0.05,
        cap: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.attempts = attempts
        self.first = first
        self.cap = cap
        self.sleep = sleep

    def delay(self, retry: int) -> float:
        """The wait before retry number `retry` (0 for the first)."""
        return min(self.cap, self.first * 2.0 ** min(retry, 64))

    def delays(self) -> list[float]:
        return [self.delay(i) for i in range(self.attempts - 1)]


DEFAULT_RECONNECT_TIMEOUT = 30.0  # seconds (libvirt.reconnectTimeout in the config)
# Calls one thread's connection carries at once, at most, when threads share it: a stock
# libvirtd serves 5 calls of a client at once (max_client_requests), and one is left for the
# applying process's own thread (observing, refreshing).
CALLS_PER_CONNECTION = 4
# Connections per URI, at most, however many jobs: a stock libvirtd serves 20 calls at
# once in all (max_workers) and 5 clients unauthenticated (max_anonymous_clients).
MAX_CONNECTIONS = 4

# Seconds a URI never reached yet is tried for: a daemon starting up answers within them,
# and an operator whose libvirtd is not running hears it at once, not after the timeout.
FIRST_CONTACT = 2.5


# Seconds a call waits for a pool that is busy building another client's volume. Such a
# build takes milliseconds to seconds (an allocated or copied volume: its size over the
# disk's rate); three runs of 100 disks each kept one pool busy for about half the time.
DEFAULT_BUSY_TIMEOUT = 120.0


def is_pool_busy(err: libvirt.libvirtError) -> bool:
    """libvirt refused a pool call because a volume is being built in the pool."""
    return "asynchronous jobs running" in str(err)


@dataclass
class _Tries:
    """One call's retries so far."""

    delays: list[float]  # the backoff's delays for transient errors
    busy: int = 0  # retries of a transient error other than a busy pool
    waits: int = 0  # waits for a busy pool
    busy_since: float | None = None  # when the call first found the pool busy
    lost: int = 0  # re-opens of a lost connection in this call


class Connections:
    """Open libvirt connections, one per URI and thread slot (`spread`), re-opened after
    a lost connection."""

    def __init__(
        self,
        backoff: Backoff | None = None,
        *,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conns: dict[tuple[str, int], Any] = {}  # (URI, slot) -> connection
        self._lock = threading.Lock()
        self._per_uri = 1  # connections per URI (spread)
        self._thread = threading.local()  # this thread's slot
        self._slots = 0  # slots dealt to threads so far
        self.backoff = backoff or Backoff()
        self.calls = 0  # calls made through call(), for the loop's resync log
        self.reconnect_timeout = reconnect_timeout
        self.busy_timeout = busy_timeout
        self.clock = clock
        self._lost_since: dict[str, float] = {}  # URI -> when its connection was found lost
        self._reached_once: set[str] = set()  # URIs this process has had a connection to

    def spread(self, jobs: int) -> None:
        """Deal the threads of `jobs` parallel actions over enough connections per URI
        that none carries more than CALLS_PER_CONNECTION calls at once (MAX_CONNECTIONS
        at most). Connections are opened as threads first use them."""
        per_uri = min(MAX_CONNECTIONS, max(1, -(-jobs // CALLS_PER_CONNECTION)))
        with self._lock:
            self._per_uri = per_uri

    def _key(self, uri: str) -> tuple[str, int]:
        """This thread's connection of `uri`: its slot, dealt when it first asked, over
        the connections per URI there are now."""
        slot: int | None = getattr(self._thread, "slot", None)
        if slot is None:
            with self._lock:
                slot = self._slots
                self._slots += 1
            self._thread.slot = slot
        return uri, slot % self._per_uri

    def get(self, uri: str) -> Any:
        key = self._key(uri)
        with self._lock:
            c = self._conns.get(key)
            if c is not None:
                try:
                    if c.isAlive():
                        return c
                except libvirt.libvirtError:
                    pass
                self._conns.pop(key, None)
            c = libvirt.open(uri)
            self._conns[key] = c
            return c

    def drop(self, uri: str) -> None:
        """Close this thread's connection of `uri` (one found lost; the others are found
        lost, and dropped, by the threads that use them)."""
        key = self._key(uri)
        with self._lock:
            c = self._conns.pop(key, None)
        if c is not None:
            with contextlib.suppress(libvirt.libvirtError):
                c.close()

    def _timeout(self, uri: str) -> float:
        """How long an outage of `uri` is waited out: a lost connection the reconnect
        timeout, a URI never reached `FIRST_CONTACT` seconds."""
        with self._lock:
            if uri in self._reached_once:
                return self.reconnect_timeout
        return min(FIRST_CONTACT, self.reconnect_timeout)

    def _reconnect_wait(self, uri: str, retry: int) -> float | None:
        """How long to wait before re-opening `uri`; None once its outage has lasted its
        timeout (`_timeout`)."""
        now = self.clock()
        timeout = self._timeout(uri)
        with self._lock:
            since = self._lost_since.setdefault(uri, now)
        left = since + timeout - now
        if left <= 0:
            return None
        return min(self.backoff.delay(retry), left)

    def _reached(self, uri: str) -> None:
        with self._lock:
            since = self._lost_since.pop(uri, None)
            self._reached_once.add(uri)
        if since is not None:
            log.info("libvirt.reconnected", uri=uri, after=round(self.clock() - since, 2))

    def call(self, uri: str, what: str, fn: Callable[[Any], T]) -> T:
        """Run fn(connection): a lost connection is re-opened until the reconnect deadline,
        a busy pool waited on until the busy deadline; other transient errors are retried
        `backoff.attempts` times."""
        self.calls += 1
        tries = _Tries(self.backoff.delays())
        while True:
            try:
                result = fn(self.get(uri))
            except libvirt.libvirtError as e:
                if is_connection_lost(e):
                    self.drop(uri)
                    self._wait_reconnect(uri, what, e, tries)
                    continue
                self._reached(uri)
                if is_pool_busy(e):
                    self._wait_busy(what, e, tries)
                    continue
                if not is_transient(e) or tries.busy == len(tries.delays):
                    raise PoolError(f"{what}: {e.get_error_message() or e}") from e
                delay = tries.delays[tries.busy]
                log.warning(
                    "libvirt.retry", what=what, error=str(e), attempt=tries.busy + 1, delay=delay
                )
                self.backoff.sleep(delay)
                tries.busy += 1
                continue
            self._reached(uri)
            return result

    def _wait_reconnect(self, uri: str, what: str, e: libvirt.libvirtError, tries: _Tries) -> None:
        """Wait before re-opening a lost connection; PoolError once its outage has lasted
        its timeout (`_timeout`)."""
        wait = self._reconnect_wait(uri, tries.lost)
        if wait is None and self._timeout(uri) < self.reconnect_timeout:
            raise PoolError(
                f"{what}: cannot connect to libvirt at {uri}: "
                f"{e.get_error_message() or e}; is libvirtd running at {uri}?"
            ) from e
        if wait is None:
            raise PoolError(
                f"{what}: lost the connection to libvirt at {uri} and could not "
                f"reconnect within {self.reconnect_timeout:g} s "
                f"(libvirt.reconnectTimeout): {e.get_error_message() or e}; "
                "is libvirtd running?"
            ) from e
        # The first loss is news; the retries after it are not, nor are the quick tries
        # of a first contact.
        first = tries.lost == 0 and self._timeout(uri) == self.reconnect_timeout
        (log.warning if first else log.info)(
            "libvirt.reconnect", what=what, error=str(e), delay=round(wait, 3)
        )
        tries.lost += 1
        self.backoff.sleep(wait)

    def _wait_busy(self, what: str, e: libvirt.libvirtError, tries: _Tries) -> None:
        """Wait for a pool busy building a volume; PoolError once the call has waited
        `busy_timeout` seconds."""
        now = self.clock()
        if tries.busy_since is None:
            tries.busy_since = now
        left = tries.busy_since + self.busy_timeout - now
        if left <= 0:
            raise PoolError(
                f"{what}: {e.get_error_message() or e}: the pool was still busy "
                f"building a volume after {self.busy_timeout:g} s; run again once "
                "the other job has finished"
            ) from e
        wait = min(self.backoff.delay(tries.waits), left)
        # The first wait is news; the ones after it are not.
        (log.info if tries.waits == 0 else log.debug)(
            "libvirt.pool_busy", what=what, attempt=tries.waits + 1, delay=round(wait, 3)
        )
        self.backoff.sleep(wait)
        tries.waits += 1

    def close(self) -> None:
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for c in conns:
            with contextlib.suppress(libvirt.libvirtError):
                c.close()
