"""drivers/host/freeze.py and the session's one question to guest agents.

libvirt's test:/// driver implements fsFreeze/fsThaw (it counts frozen filesystems) and
has no guest agent: enough to see a freeze held for exactly the body and thawed after, a
missing domain make the snapshot crash-consistent, and an agent that does not answer
counted as silent. The file and LVM drivers' snapshots are tested against the real
daemon (tests/test_snapshots_file.py, tests/test_snapshots_lvm.py), where no domain runs
(idle)."""

from __future__ import annotations

import types
from typing import Any

import libvirt
import pytest

from reconciler.control.session import Session
from reconciler.drivers.host import freeze
from reconciler.drivers.host.libvirt import Connections
from reconciler.model import Observed, ObservedPool
from reconciler.model.plan import (
    Action,
    ActionKind,
    Plan,
    Precondition,
    SnapshotMember,
    SnapshotOp,
)
from reconciler.model.record import Consistency

URI = "test:///default"


def test_frozen_holds_the_freeze_for_the_body_only() -> None:
    conns = Connections()
    dom = libvirt.open(URI).lookupByName("test")
    with freeze.frozen(conns, URI, ["test"], "frozen") as got:
        assert got is Consistency.FROZEN
        assert dom.fsThaw(None, 0) > 0  # it was frozen (thawed here to see it)
        dom.fsFreeze(None, 0)
    assert dom.fsThaw(None, 0) == 0  # thawed already by frozen()
    with freeze.frozen(conns, URI, ["test", "no-such-domain"], "frozen") as got:
        assert got is Consistency.CRASH  # one did not freeze: crash-consistent
    assert dom.fsThaw(None, 0) == 0  # the one that froze was thawed
    with freeze.frozen(conns, URI, [], "idle") as got:
        assert got is Consistency.IDLE


def test_an_agent_that_does_not_answer_is_silent() -> None:
    got = freeze.agents_answering(Connections(), URI, ["test", "no-such-domain"])
    assert got == {"test": False, "no-such-domain": False}


def _plan(domains: tuple[str, ...]) -> Plan:
    op = SnapshotOp("s", (SnapshotMember("d", "v", "v+snap-s", 1),), "crash", domains)
    a = Action(ActionKind.SNAPSHOT, "i", "d", "local", "v+snap-s", "r", (), False,
               Precondition(None, False), snapshot=op)  # fmt: skip
    return Plan((a,), (), ())


@pytest.mark.parametrize(
    ("domains", "answers", "asked", "planned"),
    [
        ((), {}, [], 1),  # no running domain: no agent is asked, one plan
        (("vm",), {"vm": False}, ["vm"], 1),  # silent: the first plan stands
        (("vm",), {"vm": True}, ["vm"], 2),  # answered: planned again, with the answer
    ],
)
def test_agents_are_asked_only_for_a_snapshot_of_a_running_domain(
    monkeypatch: pytest.MonkeyPatch,
    domains: tuple[str, ...],
    answers: dict[str, bool],
    asked: list[str],
    planned: int,
) -> None:
    calls: list[list[str]] = []

    def answering(conns: Any, uri: str, doms: Any) -> dict[str, bool]:
        calls.append(sorted(doms))
        return {d: answers[d] for d in doms}

    monkeypatch.setattr(freeze, "agents_answering", answering)
    seen: list[Observed] = []

    def make(o: Observed) -> Plan:
        seen.append(o)
        return _plan(domains)

    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(pools={"local": types.SimpleNamespace(uri=URI)}),
        conns=None,
    )
    observed = Observed({"local": ObservedPool("local", frozenset())})
    Session._asking_agents(fake, observed, make)  # type: ignore[arg-type]
    assert calls == ([asked] if asked else [])
    assert len(seen) == planned
    if planned == 2:
        assert seen[1].agents == answers
