"""Leases on RADOS objects (drivers/rbd/leases.py) and what they buy the rbd driver: two
hosts sharing a Ceph pool import an image once, a lease whose holder stops renewing expires
while a renewed one holds, and a busy lock is reported for requeueing, not as a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.rbd.leases import LeaseLocks, LockBusy, lock_object
from tests.conftest_ceph import Ceph, unique
from tests.env import ROOT
from tests.httpserver import ImageServer, serve
from tests.rbdsite import RbdSite, rbd_site
from tests.test_rbd import catalog, image_file, rdisk

pytestmark = pytest.mark.ceph

DEADLINE = 60.0


@pytest.fixture
def ns_ioctx(ceph: Ceph) -> Iterator[Any]:
    """An ioctx of pool rbd in a namespace of this test's own; its objects removed after."""
    io = ceph.cluster.open_ioctx(ceph.pool)
    io.set_namespace(unique("locks"))
    yield io
    for o in list(io.list_objects()):
        io.remove_object(o.key)
    io.close()


def other_client(ceph: Ceph, ns: str) -> tuple[Any, Any]:
    cluster = ceph.connect()
    io = cluster.open_ioctx(ceph.pool)
    io.set_namespace(ns)
    return cluster, io


def test_exclusive_and_shared_holds_exclude_as_they_should(ceph: Ceph, ns_ioctx: Any) -> None:
    a = LeaseLocks(ns_ioctx, "test", "host-a", wait=0)
    cluster, io = other_client(ceph, ns_ioctx.get_namespace())
    b = LeaseLocks(io, "test", "host-b", wait=0)
    try:
        with a.hold("x"):
            with pytest.raises(LockBusy, match="stayed locked by another reconciler"), b.hold("x"):
                pass
            with pytest.raises(LockBusy), a.hold("x"):  # another holder in this process, too
                pass
            with b.attempt("x") as got:
                assert got is None
        with (
            a.hold("x", shared=True),
            b.hold("x", shared=True),  # readers share
            pytest.raises(LockBusy),
            a.hold("x"),
        ):
            pass
        with b.hold("x"):  # all released
            pass
    finally:
        io.close()
        cluster.shutdown()


def test_a_lease_not_renewed_expires_and_a_renewed_one_holds(ceph: Ceph, ns_ioctx: Any) -> None:
    ns = ns_ioctx.get_namespace()
    # Another client takes the lock for 2 s and never renews it (a host that died).
    cluster, io = other_client(ceph, ns)
    try:
        io.lock_exclusive(lock_object("x"), "reconciler", "gone/1/boot/1", "dead", 2, 0)
        waiter = LeaseLocks(ns_ioctx, "test", "host-a", wait=DEADLINE)
        with waiter.hold("x"):  # waits for the expiry: bounded by DEADLINE
            pass
        # A holder that renews keeps it far past its duration.
        holder = LeaseLocks(io, "test", "host-b", duration=2, wait=0)
        with holder.hold("y"):
            other = LeaseLocks(ns_ioctx, "test", "host-a", wait=0)
            deadline = time.monotonic() + 8  # four durations
            while time.monotonic() < deadline:
                with pytest.raises(LockBusy), other.hold("y"):
                    pass
                time.sleep(0.25)
        holder.close()
    finally:
        io.close()
        cluster.shutdown()


def test_a_dead_local_holder_is_broken_at_once(ceph: Ceph, ns_ioctx: Any, tmp_path: Path) -> None:
    """A process of this host that took a lock and was SIGKILLed: its lock is broken by the
    next taker, which does not wait for the lease (30 s here) to run out."""
    ns = ns_ioctx.get_namespace()
    ready = tmp_path / "locked"
    code = f"""
import pathlib, time, rados
from reconciler.drivers.rbd.leases import LeaseLocks
c = rados.Rados(conffile={str(ceph.conf)!r}, name="client.admin"); c.connect()
io = c.open_ioctx({ceph.pool!r}); io.set_namespace({ns!r})
with LeaseLocks(io, "test", "host-a", duration=3600).hold("x"):
    pathlib.Path({str(ready)!r}).write_text("held")
    time.sleep(600)
"""
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + DEADLINE
        while not ready.exists():
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        busy = LeaseLocks(ns_ioctx, "test", "host-a", wait=0)
        with pytest.raises(LockBusy), busy.hold("x"):
            pass  # alive: held
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        # wait=0: only breaking it (the lease has an hour left) lets this succeed.
        with LeaseLocks(ns_ioctx, "test", "host-a", wait=0).hold("x"):
            pass
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ImageServer]:
    d = tmp_path / "images"
    d.mkdir()
    image_file(d / "img.raw")
    with serve(d) as s:
        yield s


@pytest.mark.libvirtd
def test_two_hosts_import_one_image_once(
    ceph: Ceph, libvirt_uri: str, tmp_path: Path, server: ImageServer
) -> None:
    """Two hosts (two configs, two state directories) sharing one Ceph pool and namespace,
    started together, each making four disks from one image: one fetch, one cache entry,
    eight clones of it, each host's disks in its own records."""
    with rbd_site(ceph, libvirt_uri) as site:
        envs = []
        for h in ("a", "b"):
            env = site.env(tmp_path / h, namespace="shared")
            env.host = f"host-{h}"
            entry = catalog(tmp_path / "images" / "img.raw", "raw")
            entry["location"] = server.url("img.raw")
            env.images = {"img": entry}
            env.write_config()
            for i in range(4):
                env.manifest(f"{h}{i}", [rdisk("root", size="16MiB", image="img", template=None)])
            envs.append(env)
        procs = [env.start("--jobs", "4") for env in envs]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, out + err
        assert server.gets["img.raw"] == 1
        entries = {n for n in site.images() if n.startswith("_cache_")}
        assert len(entries) == 1
        disks = {n for n in site.images() if not n.startswith("_cache_")}
        assert len(disks) == 8
        assert {site.parent(d)[0] for d in disks} == entries  # type: ignore[index]
        for env in envs:
            assert env.plan_json()["actions"] == []
        check_owners(site, envs)


def check_owners(site: RbdSite, envs: list[Any]) -> None:
    from reconciler.drivers.rbd.records import RadosRecordStore

    seen: set[str] = set()
    for env in envs:
        store = RadosRecordStore(
            lambda: site.ceph.cluster.open_ioctx(site.pool),
            site.pool,
            host=env.host,
            namespace="shared",
        )
        try:
            recs, _ = store.load_all()
        finally:
            store.close()
        disks = {r.volume for r in recs if r.kind.value == "disk"}
        assert len(disks) == 4, (env.host, disks)
        assert not disks & seen
        seen |= disks
