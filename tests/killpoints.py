"""Which step boundaries a crash test kills a run at (RECONCILER_CRASH_AT, 1-based), and
running the kill points of one test side by side.

With --jobs 1 the Nth boundary is the same step in every run, so each boundary is a state
of its own and every one is killed at. With more jobs which step is the Nth varies from
run to run (and a kill cuts several steps short at once), so no boundary names one state:
those variants kill at SAMPLES boundaries spread evenly from the first to the last, the
same ones every run, which keeps each crash test's time to a few of its --jobs 1 runs.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

SAMPLES = 8


def kill_points(count: int, jobs: int) -> list[int]:
    """Every boundary of `count` with jobs 1; else SAMPLES of them, first and last included."""
    if jobs == 1 or count <= SAMPLES:
        return list(range(1, count + 1))
    return sorted({1 + round(i * (count - 1) / (SAMPLES - 1)) for i in range(SAMPLES)})


def at_each(points: Sequence[int], one: Callable[[int], None], workers: int = 2) -> None:
    """one(k) for every kill point k, `workers` at a time, for kill points that share
    nothing (each its own Ceph pool, state directory and processes): much of a point's
    time is waiting (Ceph commits, a killed client's watch expiring, child processes
    starting), which another point's work fills. In-process runs (Env.main) take turns.
    The first failure, in the points' order, is raised once the points under way end."""
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(one, k) for k in points]
        try:
            for f in futures:
                f.result()
        finally:
            for f in futures:
                f.cancel()


def at_each_with(
    points: Sequence[int], resources: Sequence[T], one: Callable[[int, T], None]
) -> None:
    """at_each, one worker per resource, each point lent one of `resources` (a volume
    group, say) that no other point uses while it runs."""
    free: queue.SimpleQueue[T] = queue.SimpleQueue()
    for r in resources:
        free.put(r)

    def lent(k: int) -> None:
        r = free.get()
        try:
            one(k, r)
        finally:
            free.put(r)

    at_each(points, lent, workers=len(resources))
