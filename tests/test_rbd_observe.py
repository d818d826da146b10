"""An rbd pool's observe asks libvirt for the domains in a thread while it asks Ceph for the
owner and the images (drivers/rbd/pool.py): what it returns is what asking one after the
other returned, whichever fails, and no thread outlives it."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from reconciler.drivers.host import ownership
from reconciler.drivers.host.domains import Attachments
from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.rbd.pool import RbdPoolDriver
from reconciler.model.errors import PoolError
from reconciler.schema.config import PoolConfig


def driver(monkeypatch: pytest.MonkeyPatch, **fails: BaseException) -> RbdPoolDriver:
    """A driver whose Ceph and libvirt calls are stand-ins raising `fails` (by the
    method's name); `started` records the thread each ran in."""
    cfg = PoolConfig.model_validate(
        {
            "uri": "test:///default",
            "libvirtPool": "lv",
            "backends": ["rbd"],
            "ceph": {"conf": "/nonexistent/ceph.conf", "pool": "p"},
        }
    )
    d = RbdPoolDriver("ceph", cfg, Connections(), store=object(), host="host-a")  # type: ignore[arg-type]
    d.started = {}  # type: ignore[attr-defined]

    def stand_in(name: str, value: Any) -> Any:
        def call() -> Any:
            d.started[name] = threading.current_thread()  # type: ignore[attr-defined]
            if name in fails:
                raise fails[name]
            return value

        return call

    monkeypatch.setattr(d, "check_owner", stand_in("check_owner", None))
    monkeypatch.setattr(d, "list_volumes", stand_in("list_volumes", frozenset({"a_root"})))
    att = Attachments(True, {"a_root": ("dom",)}, {})
    monkeypatch.setattr(d, "attachments", stand_in("attachments", att))
    return d


def test_domains_are_asked_in_a_thread_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    d = driver(monkeypatch)
    before = threading.active_count()
    p = d.observe()
    assert p.error is None and p.volumes == frozenset({"a_root"})
    assert p.attached == {"a_root": ("dom",)}
    started = d.started  # type: ignore[attr-defined]
    assert started["attachments"] is not threading.current_thread()
    assert started["check_owner"] is threading.current_thread()
    assert threading.active_count() == before  # joined


@pytest.mark.parametrize(
    ("fails", "error", "elsewhere"),
    [
        ({"attachments": PoolError("libvirt is down")}, "libvirt is down", False),
        ({"list_volumes": PoolError("ceph is down")}, "ceph is down", False),
        (  # both: Ceph's, asked first one after the other
            {"list_volumes": PoolError("ceph is down"), "attachments": PoolError("lv")},
            "ceph is down",
            False,
        ),
        (
            {"check_owner": ownership.ManagedElsewhere("not ours"), "attachments": PoolError("x")},
            "not ours",
            True,
        ),
    ],
)
def test_errors_are_those_of_asking_one_after_the_other(
    monkeypatch: pytest.MonkeyPatch, fails: dict[str, BaseException], error: str, elsewhere: bool
) -> None:
    d = driver(monkeypatch, **fails)
    before = threading.active_count()
    p = d.observe()
    assert p.volumes is None and p.error == error and p.managed_elsewhere is elsewhere
    assert threading.active_count() == before


def test_an_internal_error_in_the_thread_is_raised_by_observe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = driver(monkeypatch, attachments=KeyError("bug"))
    with pytest.raises(KeyError, match="bug"):
        d.observe()
