"""drivers/host/pause.py on libvirt's test:/// driver (its domains keep state and live
metadata as qemu's do): the window pauses only running domains, resumes exactly those,
and a window killed midway (a paused domain with the marker) is resumed by the next one,
while a domain an operator paused is left paused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from reconciler.drivers.host import pause
from reconciler.drivers.host.libvirt import Connections

URI = "test:///default"


@pytest.fixture
def conns() -> Iterator[Connections]:
    c = Connections()
    yield c


def dom(conns: Connections, name: str) -> Any:
    return conns.get(URI).lookupByName(name)


def define(conns: Connections, name: str) -> Any:
    conn = conns.get(URI)
    d = conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>1024</memory><vcpu>1</vcpu>"
        "<os><type>hvm</type></os></domain>"
    )
    d.create()
    return d


def state(d: Any) -> int:
    return int(d.state()[0])


def test_the_window_pauses_running_domains_and_resumes_them(conns: Connections) -> None:
    a, b = define(conns, "pa"), define(conns, "pb")
    b.suspend()  # the operator's: not ours to resume
    with pause.paused(conns, URI, ["pa", "pb", "gone"]) as mine:
        assert mine == ["pa"]
        assert state(a) == libvirt.VIR_DOMAIN_PAUSED
        assert pause._marked(a) and not pause._marked(b)
    assert state(a) == libvirt.VIR_DOMAIN_RUNNING and not pause._marked(a)
    assert state(b) == libvirt.VIR_DOMAIN_PAUSED

    with pytest.raises(RuntimeError), pause.paused(conns, URI, ["pa"]):
        raise RuntimeError("a snapshot failed")
    assert state(a) == libvirt.VIR_DOMAIN_RUNNING


def test_a_killed_window_is_resumed_by_the_next(conns: Connections) -> None:
    a, b = define(conns, "ka"), define(conns, "kb")
    pause._set_marker(a, True)  # what a kill inside the window leaves
    a.suspend()
    b.suspend()
    assert pause.resume_left(conns, URI) == ["ka"]
    assert state(a) == libvirt.VIR_DOMAIN_RUNNING and not pause._marked(a)
    assert state(b) == libvirt.VIR_DOMAIN_PAUSED
    assert pause.resume_left(conns, URI) == []
