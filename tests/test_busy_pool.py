"""Runs beside each other on one pool, as real processes on the private libvirtd: another
run's ordinary work never fails a run. libvirt refuses a pool refresh ("pool has
asynchronous jobs running") while any client builds a volume in the pool; the driver
reads the directory instead when listing, and waits for the build (with a deadline) where
libvirt itself must be told (Connections.call)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from subprocess import Popen
from typing import Any

import libvirt
import pytest

from reconciler.model.record import RecordKind, RecordState
from tests.conftest import DirPool
from tests.env import Env, disk

pytestmark = pytest.mark.libvirtd

DEADLINE = 300.0  # seconds for any one process or wait below; far above what each takes


def many_disks(env: Env, n: int, prefix: str = "vm") -> None:
    """`n` disks, 10 per instance, each a qcow2 overlay on one ext4 template entry: making
    one is a libvirt volume build (qemu-img create) of milliseconds, so while a run makes
    them the pool is building a volume most of the time."""
    for i in range(n // 10):
        env.manifest(
            f"{prefix}{i}",
            [
                disk(f"d{j}", backend="qcow2", fmt="qcow2", size="8MiB", template="ext4")
                for j in range(10)
            ],
        )


def volumes(env: Env) -> int:
    """Disks in the pool, made or being made (not cache entries or the state directory)."""
    return sum(1 for p in env.pool_dir("local").iterdir() if not p.name.startswith(("_", ".")))


def made_at_least(env: Env, n: int) -> Callable[[], bool]:
    return lambda: volumes(env) >= n


def wait_for(what: str, ok: Callable[[], bool], proc: Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + DEADLINE
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert proc is None or proc.poll() is None, f"the run ended before {what}"
        time.sleep(0.01)


def ready_disks(env: Env) -> int:
    store = env.store()
    try:
        records, bad = store.load_all()
    finally:
        store.close()
    assert not bad
    return sum(r.kind is RecordKind.DISK and r.state is RecordState.READY for r in records)


def test_three_processes_on_one_pool_all_succeed(env: Env) -> None:
    """Each run after the first starts (and so lists the pool) while the runs before it
    are making disks."""
    many_disks(env, 100)
    procs = [env.start("--jobs", "8")]
    wait_for("the first run to make disks", lambda: volumes(env) >= 5, procs[0])
    procs.append(env.start("--jobs", "8"))
    wait_for("more disks", lambda: volumes(env) >= 20, procs[0])
    procs.append(env.start("--jobs", "8"))
    results = [(*p.communicate(timeout=DEADLINE), p.returncode) for p in procs]
    for out, err, rc in results:
        assert rc == 0, out + err
    assert ready_disks(env) == 100
    assert env.plan_json()["actions"] == []


def test_one_shot_runs_beside_a_loop_succeed(env: Env, tmp_path: Path) -> None:
    many_disks(env, 100)
    log = tmp_path / "watch.log"
    loop = env.start_watch(log, "--workers", "8")
    try:
        # One-shot runs started while the loop makes the disks.
        for n in (5, 30, 60):
            wait_for(f"the loop to make {n} disks", made_at_least(env, n), loop)
            res = env.subprocess(timeout=DEADLINE)
            assert res.returncode == 0, res.stdout + res.stderr
        wait_for("the loop to make every disk", lambda: ready_disks(env) == 100, loop)
        # More disks for the loop (its watcher sees them), and one-shot runs again while
        # it makes them.
        many_disks(env, 100, prefix="more")
        for n in (105, 140):
            wait_for(f"the loop to make {n} disks", made_at_least(env, n), loop)
            res = env.subprocess(timeout=DEADLINE)
            assert res.returncode == 0, res.stdout + res.stderr
        wait_for("the loop to make every disk", lambda: ready_disks(env) == 200, loop)
        assert loop.poll() is None, log.read_text()
    finally:
        loop.terminate()
        loop.wait(timeout=DEADLINE)
    docs = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    errors = [doc for doc in docs if doc.get("level") == "error"]
    assert not errors, errors
    assert ready_disks(env) == 200
    assert env.plan_json()["actions"] == []


@contextmanager
def building(pool: DirPool) -> Iterator[Callable[[], int]]:
    """Another client's volume builds in `pool`, back to back in two threads, so that
    libvirt counts a job on the pool all the time (each a copy of 128 MiB of data,
    createXMLFrom, then deleted): yields how many copies were made so far."""
    conn = libvirt.open(pool.uri)
    lp = conn.storagePoolLookupByName(pool.name)
    with open(pool.path / "busy-src.raw", "wb") as f:
        for _ in range(128):
            f.write(b"\x5a" * (1 << 20))
    lp.refresh(0)
    stop = threading.Event()
    made = [0]
    errors: list[BaseException] = []

    def copies(n: int) -> None:
        try:
            c = libvirt.open(pool.uri)
            p = c.storagePoolLookupByName(pool.name)
            src = p.storageVolLookupByName("busy-src.raw")
            xml = (
                f"<volume><name>busy-{n}.raw</name><capacity unit='bytes'>{128 << 20}"
                "</capacity><target><format type='raw'/></target></volume>"
            )
            while not stop.is_set():
                p.createXMLFrom(xml, src, 0).delete(0)
                made[0] += 1
            c.close()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=copies, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    try:
        yield lambda: made[0]
    finally:
        stop.set()
        for t in threads:
            t.join()
        conn.close()
    assert not errors, errors


def test_a_run_while_another_client_builds_volumes_succeeds(env: Env, dir_pool: DirPool) -> None:
    """libvirt refuses every refresh of the pool while the builds go on; the run lists
    the directory instead and never waits for them."""
    many_disks(env, 20)
    with building(dir_pool) as made:
        wait_for("a first copy", lambda: made() >= 1)
        before = made()
        res = env.subprocess(timeout=DEADLINE)
        assert res.returncode == 0, res.stdout + res.stderr
        after = made()
        # Asked until refused (at most 50 times): between one copy's delete and the next
        # copy's start no job runs, and on a loaded machine one ask can land there.
        refused = any(libvirt_refuses_refresh(dir_pool) for _ in range(50))
    assert ready_disks(env) == 20
    assert after > before  # the builds went on while the run listed and made its disks
    assert refused  # and they made libvirt refuse a refresh meanwhile


def libvirt_refuses_refresh(pool: DirPool) -> bool:
    conn = libvirt.open(pool.uri)
    try:
        conn.storagePoolLookupByName(pool.name).refresh(0)
    except libvirt.libvirtError as e:
        return "asynchronous jobs running" in str(e)
    finally:
        conn.close()
    return False
