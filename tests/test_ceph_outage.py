"""The one-deadline-per-step rule of drivers/rbd/outage.py, on a clock that moves only
when told: after a timeout, calls fail at once naming the first failure for opTimeout
seconds, then the cluster is tried again."""

from __future__ import annotations

import pytest

from reconciler.drivers.rbd.outage import CephUnreachable, Outage


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_calls_fail_at_once_naming_the_first_failure_then_try_again() -> None:
    clock = Clock()
    o = Outage(5.0, clock)
    o.check()  # nothing noted: calls go ahead
    o.note("locking x timed out")
    clock.now += 1
    o.note("releasing lock x timed out")  # a cleanup's failure after it: not the cause
    with pytest.raises(CephUnreachable, match=r"^locking x timed out$"):
        o.check()
    clock.now += 3.9
    assert o.cause() == "locking x timed out"
    clock.now += 0.1  # opTimeout after the first failure: the next call tries again
    o.check()
    o.note("updating record r timed out")  # a new outage has its own cause
    with pytest.raises(CephUnreachable, match=r"^updating record r timed out$"):
        o.check()
