"""Transient libvirt errors are retried with capped backoff, against real daemons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.drivers.host.libvirt import FIRST_CONTACT, Backoff, Connections
from reconciler.model.errors import PoolError
from tests.conftest import DirPool
from tests.env import ROOT, Env, disk, qemu_uri

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
    # A busy pool is waited on until its deadline, not for a number of tries.
    assert backoff.slept == [backoff.delay(i) for i in range(len(backoff.slept))]


def test_a_pool_busy_past_the_deadline_fails_naming_why(dir_pool: DirPool) -> None:
    """Builds that never end (here: back to back until the call has failed) fail the call
    once busy_timeout seconds have passed, saying the pool was busy; none before."""
    from tests.test_busy_pool import building

    clock = FakeClock()
    conns = Connections(
        Backoff(first=0.05, cap=1.0, sleep=clock.sleep), busy_timeout=2, clock=clock
    )
    with building(dir_pool) as made:
        while made() < 1:
            threading.Event().wait(0.01)
        with pytest.raises(PoolError, match=r"still busy building a volume after 2 s"):
            conns.call(
                dir_pool.uri,
                "refresh",
                lambda c: c.storagePoolLookupByName(dir_pool.name).refresh(0),
            )
    conns.close()
    assert clock.slept[:5] == [0.05, 0.1, 0.2, 0.4, 0.8]
    assert sum(clock.slept) == pytest.approx(2.0)


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


class FakeClock:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_daemon_down_is_retried_with_capped_backoff_until_the_deadline(
    own_daemon: tuple[str, str],
) -> None:
    """While the daemon is down (libvirt.open itself fails), a call is retried with capped
    exponential backoff for reconnect_timeout seconds of the clock, then fails naming why."""
    d, uri = own_daemon
    clock = FakeClock()
    conns = Connections(
        Backoff(first=0.05, cap=1.0, sleep=clock.sleep), reconnect_timeout=5, clock=clock
    )
    assert conns.call(uri, "version", lambda c: c.getLibVersion())
    subprocess.run([SCRIPT, "stop", d], check=True)
    try:
        with pytest.raises(PoolError, match=r"could not reconnect within 5 s"):
            conns.call(uri, "version", lambda c: c.getLibVersion())
        assert clock.slept[:6] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
        assert max(clock.slept) == 1.0 and sum(clock.slept) == pytest.approx(5.0)
        # The outage is past its deadline: the next call fails at once, not after 5 s more.
        before = len(clock.slept)
        with pytest.raises(PoolError, match=r"could not reconnect"):
            conns.call(uri, "version", lambda c: c.getLibVersion())
        assert len(clock.slept) == before
    finally:
        subprocess.run([SCRIPT, "start", d], check=True, capture_output=True)
    # Back up: the next call reconnects, and a later outage has a deadline of its own.
    assert conns.call(uri, "version", lambda c: c.getLibVersion())
    conns.close()


def test_a_daemon_never_reached_fails_within_the_first_contact_time(tmp_path: Path) -> None:
    """A URI this process never reached (no daemon at the socket) is tried for
    FIRST_CONTACT seconds of the clock, not reconnectTimeout, and the error asks whether
    libvirtd runs there; a connection reached once keeps the reconnect deadline (above)."""
    uri = f"qemu+unix:///system?socket={tmp_path / 'no-daemon.sock'}"
    clock = FakeClock()
    conns = Connections(
        Backoff(first=0.05, cap=1.0, sleep=clock.sleep), reconnect_timeout=30, clock=clock
    )
    with pytest.raises(PoolError) as e:
        conns.call(uri, "version", lambda c: c.getLibVersion())
    assert f"cannot connect to libvirt at {uri}" in str(e.value)
    assert str(e.value).endswith(f"is libvirtd running at {uri}?")
    assert len(clock.slept) >= 2  # a few tries, a daemon starting up may answer
    assert sum(clock.slept) == pytest.approx(FIRST_CONTACT)
    before = len(clock.slept)
    with pytest.raises(PoolError, match="is libvirtd running at"):  # shared: fails at once
        conns.call(uri, "version", lambda c: c.getLibVersion())
    assert len(clock.slept) == before


DISKS = 50


def restart_env(own_daemon: tuple[str, str], tmp_path: Path, **libvirt_cfg: Any) -> Env:
    """A pool on the test's own daemon and manifests for DISKS disks (5 per instance)."""
    _, uri = own_daemon
    path = tmp_path / "pool"
    path.mkdir()
    conn = libvirt.open(uri)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>restart</name><target><path>{path}</path></target></pool>"
    )
    pool.create(0)
    conn.close()
    env = Env(tmp_path / "env", uri, {"local": ("restart", path)})
    env.write_config()
    if libvirt_cfg:
        cfg = json.loads(env.config_path.read_text())
        cfg["libvirt"] = libvirt_cfg
        env.config_path.write_text(json.dumps(cfg, indent=2))
    for i in range(DISKS // 5):
        env.manifest(f"vm{i}", [disk(f"d{j}", size="4MiB", template="ext4") for j in range(5)])
    return env


def made(env: Env) -> int:
    return sum(1 for p in env.pool_dir().iterdir() if not p.name.startswith(("_", ".")))


def stop_daemon_mid_apply(env: Env, d: str, tmp_path: Path) -> subprocess.Popen[str]:
    """Start an apply; once it has made a few disks, pause it, stop the daemon and let
    it go on (so it certainly meets the daemon down with work left)."""
    # Output to files, not pipes: a full pipe would stall the apply.
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(
            env.argv("--jobs", "4"), stdout=out, stderr=err, text=True, cwd=ROOT
        )
    deadline = time.monotonic() + 120
    while made(env) < 5:
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()
        assert time.monotonic() < deadline, "the apply made no disks"
        threading.Event().wait(0.005)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert made(env) < DISKS
        subprocess.run([SCRIPT, "stop", d], check=True)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    return proc


def test_apply_survives_a_daemon_restart(own_daemon: tuple[str, str], tmp_path: Path) -> None:
    """libvirtd down for 3 s in the middle of an apply of 50 disks: every disk is made."""
    d, _ = own_daemon
    env = restart_env(own_daemon, tmp_path)
    proc = stop_daemon_mid_apply(env, d, tmp_path)
    # The fault injected: the daemon comes back 3 s later (a timer, not synchronisation).
    threading.Event().wait(3)
    subprocess.run([SCRIPT, "start", d], check=True, capture_output=True)
    rc = proc.wait(timeout=300)
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert rc == 0, out + err
    assert "Traceback" not in err
    assert "libvirt.reconnect" in err  # the outage was met, and waited out
    assert f"Apply: {DISKS} done, 0 skipped, 0 failed." in out
    assert made(env) == DISKS
    assert env.plan_json()["actions"] == []


def test_apply_fails_cleanly_when_the_daemon_stays_down(
    own_daemon: tuple[str, str], tmp_path: Path
) -> None:
    """Down longer than libvirt.reconnectTimeout (2 s): the steps fail with a clear message,
    exit 1, no traceback; once the daemon is back, a run converges."""
    d, _ = own_daemon
    env = restart_env(own_daemon, tmp_path, reconnectTimeout=2)
    proc = stop_daemon_mid_apply(env, d, tmp_path)
    try:
        rc = proc.wait(timeout=300)
    finally:
        subprocess.run([SCRIPT, "start", d], check=True, capture_output=True)
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert rc == 1, out + err
    assert "Traceback" not in err
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert failed
    assert all("could not reconnect within 2 s" in line for line in failed), failed
    res = env.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    assert made(env) == DISKS
    assert env.plan_json()["actions"] == []
