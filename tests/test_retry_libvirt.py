"""Transient libvirt errors are retried with capped backoff, against real daemons."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.drivers.libvirt_conn import Backoff, Connections
from reconciler.errors import PoolError
from tests.conftest import DirPool
from tests.env import ROOT, qemu_uri

pytestmark = pytest.mark.libvirtd

SCRIPT = str(ROOT / "scripts" / "libvirtd.sh")


class Recorder(Backoff):
    """Capped exponential backoff whose sleeps are recorded (and still taken)."""

    def __init__(self) -> None:
        self.slept: list[float] = []

        def sleep(seconds: float) -> None:
            self.slept.append(seconds)
            threading.Event().wait(seconds)

        super().__init__(attempts=12, first=0.05, cap=1.0, sleep=sleep)


def test_backoff_is_exponential_and_capped() -> None:
    assert Backoff(attempts=8, first=0.05, cap=1.0).delays() == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_busy_pool_is_retried_until_its_job_ends(dir_pool: DirPool) -> None:
    """While libvirt copies a volume (createXMLFrom), the pool refuses a refresh with
    'asynchronous jobs running'; the call is retried and succeeds once the copy ends."""
    conn = libvirt.open(dir_pool.uri)
    pool = conn.storagePoolLookupByName(dir_pool.name)
    src = Path(dir_pool.path) / "src.raw"
    with open(src, "wb") as f:
        for _ in range(768):
            f.write(b"\x5a" * (1 << 20))  # real data, so the copy takes a while
    pool.refresh(0)
    source = pool.storageVolLookupByName("src.raw")
    xml = (
        "<volume><name>copy.raw</name><capacity unit='bytes'>805306368</capacity>"
        "<target><format type='raw'/></target></volume>"
    )
    done = threading.Event()
    errors: list[BaseException] = []

    def copy() -> None:
        try:
            libvirt.open(dir_pool.uri).storagePoolLookupByName(dir_pool.name).createXMLFrom(
                xml, source, 0
            )
        except BaseException as e:  # reported by the assertion below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=copy)
    t.start()
    # Wait for the copy to be under way: libvirt lists the volume while it builds it.
    seen = False
    for _ in range(10000):
        if done.is_set():
            break
        try:
            pool.storageVolLookupByName("copy.raw")
            seen = True
            break
        except libvirt.libvirtError:
            continue
    backoff = Recorder()
    conns = Connections(backoff)
    try:
        conns.call(
            dir_pool.uri, "refresh", lambda c: c.storagePoolLookupByName(dir_pool.name).refresh(0)
        )
    finally:
        conns.close()
        t.join()
        conn.close()
    assert not errors, errors
    assert seen, "the copy finished before it could be observed; make it larger"
    assert backoff.slept, "the busy pool was never seen: no retry happened"
    assert backoff.slept == Backoff(12, 0.05, 1.0).delays()[: len(backoff.slept)]


@pytest.fixture
def own_daemon(tmp_path: Path) -> Iterator[tuple[str, str]]:
    d = Path("/tmp") / f"rcl-retry-{abs(hash(str(tmp_path))) % 10**8}"
    out = subprocess.run([SCRIPT, "start", str(d)], capture_output=True, text=True, check=True)
    try:
        yield str(d), qemu_uri(out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run([SCRIPT, "stop", str(d)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)


def test_lost_connection_is_reopened(own_daemon: tuple[str, str]) -> None:
    d, uri = own_daemon
    conns = Connections(Recorder())
    first: Any = conns.call(uri, "version", lambda c: c.getLibVersion())
    subprocess.run([SCRIPT, "stop", d], check=True)
    subprocess.run([SCRIPT, "start", d], check=True, capture_output=True)
    second: Any = conns.call(uri, "version", lambda c: c.getLibVersion())
    assert first == second
    conns.close()


def test_permanent_errors_are_not_retried(dir_pool: DirPool) -> None:
    backoff = Recorder()
    conns = Connections(backoff)
    with pytest.raises(PoolError, match="no storage pool"):
        conns.call(dir_pool.uri, "lookup", lambda c: c.storagePoolLookupByName("no-such-pool-here"))
    conns.close()
    assert backoff.slept == []
