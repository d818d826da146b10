"""libvirt connections: one per URI, with capped exponential backoff on transient errors."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import structlog

from reconciler.errors import PoolError

log = structlog.get_logger(__name__)
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


def is_transient(err: libvirt.libvirtError) -> bool:
    msg = str(err)
    if any(t in msg for t in _PERMANENT_TEXT):
        return False
    if err.get_error_code() in (libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT):
        return True
    return err.get_error_code() in _TRANSIENT_CODES and any(t in msg for t in _TRANSIENT_TEXT)


class Backoff:
    """Capped exponential backoff: 0.05 s doubling to at most `cap`, `attempts` tries."""

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

    def delays(self) -> list[float]:
        return [min(self.cap, self.first * (2**i)) for i in range(self.attempts - 1)]


class Connections:
    """Open libvirt connections, one per URI, reopened after a lost connection."""

    def __init__(self, backoff: Backoff | None = None) -> None:
        self._conns: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.backoff = backoff or Backoff()
        self.calls = 0  # calls made through call(), for the loop's resync log

    def get(self, uri: str) -> Any:
        with self._lock:
            c = self._conns.get(uri)
            if c is not None:
                try:
                    if c.isAlive():
                        return c
                except libvirt.libvirtError:
                    pass
                self._conns.pop(uri, None)
            c = libvirt.open(uri)
            self._conns[uri] = c
            return c

    def drop(self, uri: str) -> None:
        with self._lock:
            c = self._conns.pop(uri, None)
        if c is not None:
            with contextlib.suppress(libvirt.libvirtError):
                c.close()

    def call(self, uri: str, what: str, fn: Callable[[Any], T]) -> T:
        """Run fn(connection), retrying transient libvirt errors with backoff."""
        self.calls += 1
        delays = self.backoff.delays()
        for attempt in range(len(delays) + 1):
            try:
                return fn(self.get(uri))
            except libvirt.libvirtError as e:
                if not is_transient(e) or attempt == len(delays):
                    raise PoolError(f"{what}: {e.get_error_message() or e}") from e
                log.warning(
                    "libvirt.retry",
                    what=what,
                    error=str(e),
                    attempt=attempt + 1,
                    delay=delays[attempt],
                )
                if e.get_error_code() in (
                    libvirt.VIR_ERR_RPC,
                    libvirt.VIR_ERR_NO_CONNECT,
                    libvirt.VIR_ERR_SYSTEM_ERROR,
                ):
                    self.drop(uri)
                self.backoff.sleep(delays[attempt])
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        for uri in list(self._conns):
            self.drop(uri)
