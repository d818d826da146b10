"""A work queue with the semantics of controller-runtime's (client-go's workqueue).

For the control loop, which decides only *when* an instance is reconciled:
- a key added while it waits is queued once (`dirty` holds what waits to be worked);
- a key is handed to one worker at a time: added again while it is worked, it waits in
  `dirty` and is queued again only when the worker calls `done`, so no instance is ever
  reconciled by two workers at once and no change that arrived meanwhile is lost;
- `add_rate_limited` requeues a failed key after a per-key exponential backoff (by default
  1 s doubling to 5 min), `forget` resets it after a success;
- `add_after` queues a key once a delay has passed (a periodic resync, a backoff).
No thread of its own: a blocked `get` waits until the earliest delayed key is due.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

BACKOFF_FIRST = 1.0
BACKOFF_CAP = 300.0


class WorkQueue(Generic[K]):
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_first: float = BACKOFF_FIRST,
        backoff_cap: float = BACKOFF_CAP,
    ) -> None:
        self._clock = clock
        self._first = backoff_first
        self._cap = backoff_cap
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._waiting: list[tuple[float, int, K]] = []  # (due, order, key): a heap
        self._order = itertools.count()
        self._failures: dict[K, int] = {}
        self._shutdown = False

    # -- adding -----------------------------------------------------------------------

    def add(self, key: K) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: K) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # queued again by done()
        self._queue.append(key)
        self._cond.notify()

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` once `delay` seconds have passed (at once for delay <= 0)."""
        with self._cond:
            if delay <= 0:
                self._add(key)
                return
            heapq.heappush(self._waiting, (self._clock() + delay, next(self._order), key))
            self._cond.notify()  # a blocked get() may now have to wake up sooner

    def backoff(self, key: K) -> float:
        """The delay the next `add_rate_limited(key)` waits."""
        with self._cond:
            return self._delay(self._failures.get(key, 0))

    def _delay(self, failures: int) -> float:
        return float(min(self._cap, self._first * 2.0 ** min(failures, 62)))

    def add_rate_limited(self, key: K) -> float:
        """Requeue a key whose work failed, after its backoff; returns the delay."""
        with self._cond:
            delay = self._delay(self._failures.get(key, 0))
            self._failures[key] = self._failures.get(key, 0) + 1
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key's work succeeded (or will not be retried): reset its backoff."""
        with self._cond:
            self._failures.pop(key, None)

    def requeues(self, key: K) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    # -- working ----------------------------------------------------------------------

    def _promote(self) -> float | None:
        """Queue the delayed keys that are due; seconds until the next one (None: none)."""
        now = self._clock()
        while self._waiting and self._waiting[0][0] <= now:
            _, _, key = heapq.heappop(self._waiting)
            self._add(key)
        return self._waiting[0][0] - now if self._waiting else None

    def get(self, timeout: float | None = None) -> K | None:
        """The next key to work (now the caller's until `done`), or None once shut down
        or when `timeout` seconds pass with nothing to do."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shutdown:
                    return None
                next_due = self._promote()
                if self._queue:
                    key = self._queue.popleft()
                    self._processing.add(key)
                    self._dirty.discard(key)
                    return key
                wait = next_due
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def done(self, key: K) -> None:
        """The caller finished working `key`; if it was added meanwhile, it is queued."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._shutdown:
                self._queue.append(key)
                self._cond.notify()

    def shutdown(self) -> None:
        """Wake every blocked `get` (which returns None); nothing is handed out again."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    # -- looking ----------------------------------------------------------------------

    def depth(self) -> int:
        """Keys waiting to be worked now (not the delayed ones, nor those being worked)."""
        with self._cond:
            return len(self._queue)

    def delayed(self) -> int:
        with self._cond:
            return len(self._waiting)

    def processing(self) -> frozenset[K]:
        with self._cond:
            return frozenset(self._processing)
