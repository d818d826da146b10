"""The work queue keeps controller-runtime's promises (reconciler/control/workqueue.py)."""

from __future__ import annotations

import random
import threading
from collections import Counter

from reconciler.control.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_added_twice_while_waiting_is_worked_once() -> None:
    q: WorkQueue[str] = WorkQueue()
    for k in ("a", "b", "a", "a"):
        q.add(k)
    assert q.depth() == 2
    assert [q.get(timeout=0), q.get(timeout=0), q.get(timeout=0)] == ["a", "b", None]


def test_a_key_added_while_worked_is_queued_again_only_when_done() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")  # a change arrives while "a" is being worked
    q.add("a")
    assert q.get(timeout=0) is None  # not handed to a second worker
    q.done("a")
    assert q.get(timeout=0) == "a"  # once, for both adds
    q.done("a")
    assert q.get(timeout=0) is None


def test_backoff_doubles_from_one_second_to_five_minutes_and_forget_resets() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    delays = [q.add_rate_limited("a") for _ in range(12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert q.requeues("a") == 12
    q.forget("a")
    assert q.requeues("a") == 0 and q.backoff("a") == 1
    assert q.backoff("b") == 1  # per key


def test_delayed_keys_come_due_in_order_and_not_before() -> None:
    clock = Clock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("late", 10)
    q.add_after("soon", 2)
    q.add_after("now", 0)
    assert q.get(timeout=0) == "now"
    assert q.get(timeout=0) is None and q.delayed() == 2
    clock.now += 2
    assert q.get(timeout=0) == "soon"
    clock.now += 7.9
    assert q.get(timeout=0) is None
    clock.now += 0.1
    assert q.get(timeout=0) == "late"


def test_a_blocked_get_wakes_for_a_delayed_key() -> None:
    q: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=30)))
    t.start()
    q.add_after("a", 0.05)
    t.join(timeout=30)
    assert got == ["a"]


def test_shutdown_wakes_every_blocked_get() -> None:
    q: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    threads = [threading.Thread(target=lambda: got.append(q.get())) for _ in range(3)]
    for t in threads:
        t.start()
    q.shutdown()
    for t in threads:
        t.join(timeout=30)
    assert got == [None, None, None]
    q.add("a")
    assert q.get(timeout=0) is None


def test_a_burst_of_adds_from_many_threads_never_works_a_key_twice_at_once() -> None:
    """1,000 adds of 100 keys from 4 writers, 4 workers: every key is worked, never by two
    workers at the same time, and the queue drains."""
    q: WorkQueue[int] = WorkQueue()
    active: set[int] = set()
    overlaps: list[int] = []
    worked: Counter[int] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            key = q.get(timeout=0.05)
            if key is None:
                continue
            with lock:
                if key in active:
                    overlaps.append(key)
                active.add(key)
            worked[key] += 1
            with lock:
                active.discard(key)
            q.done(key)

    added: set[int] = set()

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(250):
            key = rnd.randrange(100)
            with lock:
                added.add(key)
            q.add(key)

    workers = [threading.Thread(target=worker) for _ in range(4)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in workers + writers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    # Drained: nothing waits and nothing is being worked (a condition, with a deadline).
    done = threading.Event()
    for _ in range(600):
        if q.depth() == 0 and not q.processing():
            done.set()
            break
        done.wait(0.05)
    stop.set()
    for t in workers:
        t.join(timeout=30)
    assert done.is_set()
    assert overlaps == []
    assert set(worked) == added  # every key added was worked
    assert sum(worked.values()) <= 1000  # and never more often than it was added
