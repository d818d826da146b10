"""`reconcile watch`: a real watchdog observer, real files and the real private libvirtd.

Everything is observed through the status the loop writes and through the pool, waiting
on a condition with a deadline, never on sleeps. The resync interval is long (600 s)
wherever the watcher, not the resync, must do the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.control.loop import Loop, running
from reconciler.control.status import InstanceStatus, StatusStore
from reconciler.schema.write import write_atomic
from tests.conftest import own_daemon_pool
from tests.env import ROOT, Env, disk

pytestmark = pytest.mark.libvirtd

DEADLINE = 60.0


def wait_until(what: str, cond: Callable[[], Any], timeout: float = DEADLINE) -> Any:
    """Poll `cond` until it is truthy; fail naming `what` at the deadline."""
    end = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        pause.wait(0.02)


def write(env: Env, name: str, disks: list[dict[str, Any]], *, deleted: bool = False) -> str:
    """Write a manifest as the compute service does: a temp file, then a rename."""
    inst = env.manifest(name, disks, deleted=deleted)  # to learn the instance and the text
    path = env.manifests / f"{name}.yaml"
    text = path.read_text()
    path.unlink()
    write_atomic(str(path), text)
    return inst


def status(env: Env, instance: str) -> InstanceStatus | None:
    store = StatusStore(env.root / "state" / "status.sqlite")
    try:
        return store.get(instance)
    finally:
        store.close()


def ready(env: Env, instance: str, generation: int | None = None) -> bool:
    s = status(env, instance)
    if s is None:
        return False
    c = s.condition("Ready")
    return (
        c is not None
        and c.status == "True"
        and (generation is None or c.observedGeneration == generation)
    )


@contextmanager
def loop(env: Env, **kw: Any) -> Iterator[Loop]:
    kw.setdefault("resync", 600.0)
    lp = Loop(str(env.config_path), env.manifests, **kw)
    with running(lp):
        wait_until("the loop to be ready", lp.ready.is_set)
        yield lp


def test_write_grow_and_tombstone_through_the_watcher(env: Env) -> None:
    with loop(env) as lp:
        inst = write(env, "w", [disk("disk", size="16MiB"), disk("swap", template="swap")])
        vol = env.volume(inst, "disk")
        wait_until("the disks and a Ready status", lambda: vol.exists() and ready(env, inst, 1))
        assert env.volume(inst, "swap").exists()

        write(env, "w", [disk("disk", size="32MiB"), disk("swap", template="swap")])
        wait_until("the disk to grow", lambda: ready(env, inst, 2))
        assert vol.stat().st_size == 32 << 20

        write(env, "w", [], deleted=True)
        wait_until("the disks to go", lambda: not vol.exists() and ready(env, inst, 3))
        assert not env.volume(inst, "swap").exists()
        assert lp.metrics.resyncs._value.get() == 1  # the first only: the watcher did it


def test_a_refused_shrink_is_degraded_and_terminal(env: Env) -> None:
    with loop(env):
        inst = write(env, "s", [disk("disk", size="32MiB")])
        wait_until("the disk", lambda: ready(env, inst, 1))
        write(env, "s", [disk("disk", size="16MiB")])

        def degraded() -> InstanceStatus | None:
            s = status(env, inst)
            return s if s is not None and s.generation == 2 and not ready(env, inst) else None

        s = wait_until("the refusal", degraded)
        r, d = s.condition("Ready"), s.condition("Degraded")
        assert r is not None and (r.status, r.reason) == ("False", "ShrinkRefused")
        assert d is not None and (d.status, d.reason) == ("True", "ShrinkRefused")
        assert s.terminal and s.nextRetry == "" and "shrinking" in s.lastError
        assert env.volume(inst, "disk").stat().st_size == 32 << 20


def test_a_volume_deleted_behind_the_loops_back_is_made_again_by_the_resync(env: Env) -> None:
    with loop(env, resync=0.5) as lp:
        inst = write(env, "d", [disk("disk", size="16MiB")])
        vol = env.volume(inst, "disk")
        wait_until("the disk", lambda: vol.exists() and ready(env, inst))
        conn = libvirt.open(env.uri)
        try:
            pool = conn.storagePoolLookupByName(env.pools["local"][0])
            pool.refresh(0)
            pool.storageVolLookupByName(vol.name).delete(0)
        finally:
            conn.close()
        assert not vol.exists()
        wait_until("the resync to make it again", vol.exists)
        wait_until("drift to be counted", lambda: lp.metrics.drift._value.get() >= 1)


def test_a_burst_of_1000_writes_is_each_reconciled_never_twice_at_once(env: Env) -> None:
    active: set[str] = set()
    overlaps: list[str] = []
    worked: list[str] = []
    lock = threading.Lock()

    class Watching(Loop):
        def reconcile(self, instance: str) -> None:
            with lock:
                if instance in active:
                    overlaps.append(instance)
                active.add(instance)
                worked.append(instance)
            try:
                super().reconcile(instance)
            finally:
                with lock:
                    active.discard(instance)

    lp = Watching(str(env.config_path), env.manifests, resync=600.0)
    with running(lp):
        wait_until("the loop to be ready", lp.ready.is_set)
        insts = []
        for i in range(500):  # 1,000 writes
            insts.append(write(env, f"b{i}", [disk("disk", size="1MiB")]))
            # Rewritten at once: still one instance, reconciled while it may be worked.
            write(env, f"b{i}", [disk("disk", size="2MiB")])
        wait_until(
            "every instance converged",
            lambda: all(ready(env, i) for i in insts),
            timeout=180,
        )
        wait_until("the queue to drain", lambda: not lp.queue.depth() and not lp.queue.processing())
    assert overlaps == []
    assert set(insts) <= set(worked)
    assert all(env.volume(i, "disk").stat().st_size == 2 << 20 for i in insts)


def _start(env: Env, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    e = dict(os.environ, **(extra or {}))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reconciler",
            "watch",
            "--config",
            str(env.config_path),
            "--resync-interval",
            "600",
            *args,
            str(env.manifests),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=e,
    )


def _ready_line(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Read the loop's JSON log lines until it says `ready`."""
    assert proc.stderr is not None
    lines = []
    for raw in proc.stderr:
        doc = json.loads(raw)
        lines.append(doc)
        if doc.get("event") == "ready":
            return lines
    pytest.fail(f"the loop exited before it was ready: {lines}")


def test_sigterm_finishes_the_step_under_way_and_a_second_loop_is_refused(
    env: Env, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    proc = _start(env, extra={"RECONCILER_TRACE_STEPS": str(trace)})
    try:
        _ready_line(proc)
        # A second loop on the same state directory refuses, naming the first.
        second = _start(env)
        _, err = second.communicate(timeout=DEADLINE)
        assert second.returncode == 1
        assert f"(PID {proc.pid})" in err and "Traceback" not in err

        # Twelve slow steps: on a loaded machine the signal may land a few steps late.
        inst = write(env, "t", [disk(f"d{i}", size="256MiB", template="ext4") for i in range(12)])
        wait_until(
            "a step to start", lambda: trace.exists() and "record.creating" in trace.read_text()
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
    store = env.store()
    try:
        records, bad = store.load_all()
    finally:
        store.close()
    assert not bad
    # The step under way finished: nothing is left half made, and not everything was made.
    assert all(r.state.value == "ready" for r in records)
    made = [d for d in range(12) if env.volume(inst, f"d{d}").exists()]
    assert len(made) < 12
    # The next start has nothing to repair and converges.
    again = _start(env)
    try:
        _ready_line(again)
        wait_until("the rest", lambda: ready(env, inst), timeout=120)
        assert all(env.volume(inst, f"d{d}").exists() for d in range(12))
        again.send_signal(signal.SIGINT)
        again.communicate(timeout=DEADLINE)
        assert again.returncode == 0
    finally:
        if again.poll() is None:
            again.kill()


def test_status_cli_shows_every_instance(env: Env) -> None:
    with loop(env):
        inst = write(env, "c", [disk("disk", size="16MiB")])
        wait_until("the disk", lambda: ready(env, inst))
    rc, out, err = env.main(["status", "--output", "json", "--config", str(env.config_path)])
    assert rc == 0, err
    (row,) = [r for r in json.loads(out) if r["instance"] == inst]
    conds = {c["type"]: c for c in row["conditions"]}
    assert set(conds) == {"Ready", "Progressing", "Degraded"}
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["reason"] == "Converged"
    assert conds["Ready"]["observedGeneration"] == 1
    for c in conds.values():
        assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(c)
    rc, out, err = env.main(["status", "--config", str(env.config_path)])
    assert rc == 0 and inst in out and "Converged" in out


SCRIPT = str(ROOT / "scripts" / "libvirtd.sh")


@pytest.fixture
def far_pool(tmp_path: Path) -> Iterator[tuple[str, str, str, Path]]:
    """A dir pool on a second private libvirtd: (daemon dir, uri, pool name, path)."""
    with own_daemon_pool(tmp_path, "far") as (d, uri, path):
        yield d, uri, "far", path


def test_a_pool_whose_daemon_stops_degrades_alone_then_converges(
    env: Env, far_pool: tuple[str, str, str, Path]
) -> None:
    d, uri, name, path = far_pool
    env.pools["far"] = (name, path)
    env.uris["far"] = uri
    env.libvirt = {"reconnectTimeout": 2}  # a stopped daemon is given up on quickly
    env.write_config()
    with loop(env):
        a = write(env, "a", [disk("disk", size="16MiB")])
        b = write(env, "b", [disk("disk", size="16MiB", pool="far")])
        wait_until("both", lambda: ready(env, a) and ready(env, b))
        subprocess.run([SCRIPT, "stop", d], check=True)
        write(env, "b", [disk("disk", size="32MiB", pool="far")])
        c = write(env, "c", [disk("disk", size="16MiB")])

        def degraded() -> InstanceStatus | None:
            s = status(env, b)
            deg = s.condition("Degraded") if s else None
            return s if deg is not None and deg.reason == "PoolUnreachable" else None

        s = wait_until("b to go Degraded", degraded, timeout=120)
        assert s.nextRetry and not s.terminal
        wait_until("c to converge meanwhile", lambda: ready(env, c), timeout=120)
        subprocess.run([SCRIPT, "start", d], check=True, capture_output=True)
        wait_until("b to converge", lambda: ready(env, b, 2), timeout=120)
        assert env.volume(b, "disk", pool="far").stat().st_size == 32 << 20


def test_the_delete_guard_holds_deletions_past_the_limit_until_it_is_raised(env: Env) -> None:
    env.safety = {"maxDeletePercent": 10, "deleteGuardFloor": 2}
    env.write_config()
    with loop(env) as lp:
        insts = [write(env, f"g{i}", [disk("disk", size="1MiB")]) for i in range(5)]
        wait_until("all", lambda: all(ready(env, i) for i in insts))
        for i in range(4):
            write(env, f"g{i}", [], deleted=True)

        def settled() -> list[InstanceStatus] | None:
            ss = [status(env, i) for i in insts[:4]]
            if any(s is None or s.generation != 2 for s in ss):
                return None
            held = [
                s for s in ss if s and (c := s.condition("Degraded")) and c.reason == "DeleteGuard"
            ]
            gone = [i for i in insts[:4] if ready(env, i, 2)]
            return held if len(held) + len(gone) == 4 else None

        held = wait_until("the guard to hold some", settled)
        assert len(held) == 2  # the floor lets two through; 10% of 5 disks is less
        assert sum(env.volume(i, "disk").exists() for i in insts[:4]) == 2
        # A bad config is reported and the old one kept.
        good = env.config_path.read_text()
        env.config_path.write_text("apiVersion: [")
        lp.request_reload()
        env.config_path.write_text(good)
        env.safety = {"maxDeletePercent": 10, "deleteGuardFloor": 10}
        env.write_config()
        lp.request_reload()
        wait_until("the rest to go", lambda: all(ready(env, i, 2) for i in insts[:4]), timeout=120)
        assert not any(env.volume(i, "disk").exists() for i in insts[:4])
        assert env.volume(insts[4], "disk").exists()


def test_metrics_and_a_one_shot_run_beside_the_loop(env: Env) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with loop(env, metrics_port=port):
        inst = write(env, "m", [disk("disk", size="16MiB")])
        wait_until("the disk", lambda: ready(env, inst))
        rc, out, err = env.run("--dry-run", "--detailed-exitcode")
        assert rc == 0, out + err
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    for name in (
        'controller_runtime_reconcile_total{controller="reconcile",result="success"}',
        "controller_runtime_reconcile_time_seconds_bucket",
        'workqueue_adds_total{name="reconcile"}',
        'workqueue_depth{name="reconcile"}',
        'reconcile_actions_total{kind="create",outcome="done"} 1.0',
        "reconcile_instances_not_ready 0.0",
    ):
        assert name in text, name


def test_sigkill_at_random_moments_under_a_stream_of_changes_then_converges(env: Env) -> None:
    import random

    rnd = random.Random(7)
    sizes = {f"k{i}": 1 for i in range(8)}
    for name in sizes:
        write(env, name, [disk("disk", size="1MiB")])
    for _ in range(20):
        proc = _start(env)
        try:
            stop = threading.Event()

            def stream(stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    name = rnd.choice(sorted(sizes))
                    sizes[name] += 1
                    write(env, name, [disk("disk", size=f"{sizes[name]}MiB")])
                    stop.wait(0.01)

            t = threading.Thread(target=stream)
            t.start()
            threading.Event().wait(rnd.uniform(0.3, 1.5))  # a random moment: the fault
            proc.kill()
            stop.set()
            t.join()
            proc.communicate(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
    final = _start(env)
    try:
        _ready_line(final)
        insts = {name: str(uuid.uuid5(uuid.NAMESPACE_DNS, name)) for name in sizes}
        wait_until(
            "every disk at its last size",
            lambda: all(
                env.volume(i, "disk").exists()
                and env.volume(i, "disk").stat().st_size == sizes[n] << 20
                for n, i in insts.items()
            ),
            timeout=120,
        )
    finally:
        final.send_signal(signal.SIGTERM)
        final.communicate(timeout=DEADLINE)
    store = env.store()
    try:
        records, bad = store.load_all()
    finally:
        store.close()
    assert not bad and all(r.state.value == "ready" for r in records)
    on_disk = {p.name for p in env.pool_dir().iterdir() if not p.name.startswith(".")}
    assert on_disk == {r.volume for r in records}  # nothing orphaned, nothing missing


def test_one_changed_manifest_reads_one_file_and_plans_one_instance(env: Env) -> None:
    insts = [env.manifest(f"n{i}", [disk("disk", size="1MiB")]) for i in range(30)]
    rc, out, err = env.run()
    assert rc == 0, out + err
    planned: list[str] = []
    read: list[str] = []

    class Counting(Loop):
        def reconcile(self, instance: str) -> None:
            planned.append(instance)
            super().reconcile(instance)

    lp = Counting(str(env.config_path), env.manifests, resync=600.0)
    real_read = lp.index.read

    def counted(path: str, *a: Any, **kw: Any) -> set[str]:
        read.append(path)
        return real_read(path, *a, **kw)

    with running(lp):
        wait_until("the loop to be ready", lp.ready.is_set)
        assert planned == []  # converged: the first resync queued nothing
        read.clear()
        lp.index.read = counted  # type: ignore[method-assign]
        write(env, "n7", [disk("disk", size="2MiB")])
        wait_until(
            "the disk to grow", lambda: env.volume(insts[7], "disk").stat().st_size == 2 << 20
        )
        wait_until("the queue to drain", lambda: not lp.queue.processing())
    assert planned == [insts[7]]
    assert read == [str(env.manifests / "n7.yaml")]


def test_ready_is_told_to_systemd_and_sighup_keeps_a_good_config(env: Env, tmp_path: Path) -> None:
    import socket

    addr = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(addr)
        sock.settimeout(DEADLINE)
        proc = _start(env, extra={"NOTIFY_SOCKET": addr})
        try:
            assert sock.recv(100) == b"READY=1"
            good = env.config_path.read_text()
            env.config_path.write_text("apiVersion: [")
            proc.send_signal(signal.SIGHUP)
            assert proc.stderr is not None
            for raw in proc.stderr:
                if json.loads(raw).get("event") == "config.reload_failed":
                    break
            env.config_path.write_text(good)
            inst = write(env, "h", [disk("disk", size="16MiB")])
            wait_until("the old config to keep working", lambda: ready(env, inst))
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(100) == b"STOPPING=1"
            proc.communicate(timeout=DEADLINE)
            assert proc.returncode == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_sigterm_during_an_image_fetch_exits_0_after_it_and_leaves_nothing_to_repair(
    env: Env, tmp_path: Path
) -> None:
    import hashlib

    from tests.httpserver import serve

    images = tmp_path / "images"
    images.mkdir()
    data = os.urandom(1 << 20) * 16  # 16 MiB that are not zeros
    (images / "big.raw").write_bytes(data)
    with serve(images) as server:
        server.faults["big.raw"] = "hold"  # half the image, then wait for the test
        env.images = {
            "big": {
                "location": server.url("big.raw"),
                "format": "raw",
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
        }
        env.write_config()
        proc = _start(env)
        try:
            _ready_line(proc)
            inst = write(env, "f", [disk("disk", size="32MiB", image="big")])
            assert server.holding.wait(DEADLINE), "the fetch never started"
            proc.send_signal(signal.SIGTERM)
            assert proc.stderr is not None
            for raw in proc.stderr:  # the loop has the signal: now let the fetch end
                if json.loads(raw).get("event") == "signal":
                    break
            server.release.set()
            _, err = proc.communicate(timeout=DEADLINE)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
    # The step under way (fetch, check, cache entry, the disk from it) finished.
    vol = env.volume(inst, "disk")
    assert vol.read_bytes()[: len(data)] == data
    store = env.store()
    try:
        records, bad = store.load_all()
    finally:
        store.close()
    assert not bad and records and all(r.state.value == "ready" for r in records)
    rc, out, err = env.run("--dry-run", "--detailed-exitcode")
    assert rc == 0, out + err  # nothing to repair
    assert not any(p.name.startswith(".reconciler-tmp-") for p in env.pool_dir().iterdir())


def test_what_can_be_done_is_done_beside_a_refusal_and_a_gone_instance_loses_its_status(
    env: Env,
) -> None:
    with loop(env):
        inst = write(env, "p", [disk("a", size="32MiB"), disk("b", size="16MiB")])
        wait_until("the disks", lambda: ready(env, inst, 1))
        write(env, "p", [disk("a", size="16MiB"), disk("b", size="32MiB")])  # shrink a, grow b
        b = env.volume(inst, "b")
        wait_until("b to grow", lambda: b.stat().st_size == 32 << 20)

        def refused() -> InstanceStatus | None:
            s = status(env, inst)
            c = s.condition("Ready") if s else None
            return s if s and c and s.generation == 2 and c.reason == "ShrinkRefused" else None

        s = wait_until("the shrink to be refused", refused)
        assert s.terminal
        assert env.volume(inst, "a").stat().st_size == 32 << 20

        gone = write(env, "g", [disk("disk", size="1MiB")])
        wait_until("g", lambda: ready(env, gone))
        write(env, "g", [], deleted=True)
        wait_until("g's disk to go", lambda: not env.volume(gone, "disk").exists())
        (env.manifests / "g.yaml").unlink()  # neither a manifest nor a disk remains
        wait_until("g's status to go", lambda: status(env, gone) is None)


def _ploop(name: str, **kw: Any) -> dict[str, Any]:
    return disk(name, backend="ploop", fmt="ploop", template="blank", **kw)


def _waiting_for(env: Env, instance: str, generation: int, reason: str) -> Any:
    def got() -> InstanceStatus | None:
        s = status(env, instance)
        c = s.condition("Ready") if s else None
        return s if s and c and s.generation == generation and c.reason == reason else None

    return got


def test_a_disk_that_cannot_grow_is_terminal_until_its_manifest_changes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.backends = ["flat", "qcow2", "ploop"]
    env.write_config()
    with loop(env) as lp:
        calls: dict[str, int] = {}
        reconcile = lp.reconcile

        def counted(instance: str) -> None:
            calls[instance] = calls.get(instance, 0) + 1
            reconcile(instance)

        monkeypatch.setattr(lp, "reconcile", counted)
        inst = write(env, "r", [_ploop("d", size="8MiB")])
        wait_until("the disk", lambda: ready(env, inst, 1))
        write(env, "r", [_ploop("d", size="16MiB")])
        s = wait_until("the refusal", _waiting_for(env, inst, 2, "ResizeUnsupported"))
        d = s.condition("Degraded")
        assert d is not None and (d.status, d.reason) == ("True", "ResizeUnsupported")
        assert s.terminal and s.nextRetry == "" and "cannot resize parallels" in s.lastError
        wait_until("the worker to let it go", lambda: inst not in lp.queue.processing())
        # Not requeued: nothing waits in the queue, and its backoff never started.
        assert (lp.queue.depth(), lp.queue.delayed(), lp.queue.requeues(inst)) == (0, 0, 0)
        seen = calls[inst]
        lp.resync()  # a resync sees the error again and leaves it waiting
        assert (lp.queue.depth(), lp.queue.delayed(), calls[inst]) == (0, 0, seen)
        write(env, "r", [_ploop("d", size="8MiB")])  # the manifest changes: tried again
        wait_until("it to converge", lambda: ready(env, inst, 3))
        assert calls[inst] > seen
        assert env.volume(inst, "d").stat().st_size > 0


def test_error_counters_agree_over_terminal_and_retried_errors(env: Env) -> None:
    env.backends = ["flat", "qcow2", "ploop"]
    # A pool libvirt does not have: its disks fail with pool-unreachable, retried.
    env.extra_pools = {
        "gone": {"uri": env.uri, "libvirtPool": "no-such-pool", "backends": ["flat"]}
    }
    env.write_config()
    with loop(env) as lp:
        a = write(env, "a", [disk("disk", size="32MiB")])
        p = write(env, "p", [_ploop("d", size="8MiB")])
        wait_until("both", lambda: ready(env, a, 1) and ready(env, p, 1))
        write(env, "a", [disk("disk", size="16MiB")])
        write(env, "p", [_ploop("d", size="16MiB")])
        u = write(env, "u", [disk("disk", size="1MiB", pool="gone")])
        wait_until("the shrink refused", _waiting_for(env, a, 2, "ShrinkRefused"))
        wait_until("the growth refused", _waiting_for(env, p, 2, "ResizeUnsupported"))
        wait_until("u retried twice", lambda: lp.queue.requeues(u) >= 3)
        s = status(env, u)
        assert s is not None and not s.terminal and s.nextRetry
        c = s.condition("Ready")
        assert c is not None and c.reason == "PoolUnreachable"
    # The loop has stopped: every reconcile it began is counted.
    reg = lp.metrics.registry
    errors = reg.get_sample_value(
        "controller_runtime_reconcile_errors_total", {"controller": "reconcile"}
    )
    by_result = reg.get_sample_value(
        "controller_runtime_reconcile_total", {"controller": "reconcile", "result": "error"}
    )
    assert errors is not None and errors == by_result
    assert errors >= 2 + 3  # two terminal, at least three retried
    retries = reg.get_sample_value("workqueue_retries_total", {"name": "reconcile"})
    assert retries is not None and 3 <= retries <= errors - 2


def test_the_delete_guard_counts_the_managed_disks_as_they_are_now(env: Env) -> None:
    env.safety = {"maxDeletePercent": 5, "deleteGuardFloor": 0}  # every deletion waits
    env.write_config()
    with loop(env) as lp:  # its first resync saw no disk at all
        insts = [write(env, f"k{i}", [disk("disk", size="1MiB")]) for i in range(5)]
        wait_until("five disks", lambda: all(ready(env, i) for i in insts))
        write(env, "k0", [], deleted=True)
        s = wait_until("the guard", _waiting_for(env, insts[0], 2, "DeleteGuard"))
        assert "5% of 5 managed disks" in s.lastError, s.lastError
        more = [write(env, f"k{i}", [disk("disk", size="1MiB")]) for i in range(5, 10)]
        wait_until("ten disks", lambda: all(ready(env, i) for i in more))
        lp.request_reload()  # every instance is queued again, k0 without its backoff

        def counted_again() -> bool:
            st = status(env, insts[0])
            return st is not None and "5% of 10 managed disks" in st.lastError

        wait_until("the guard to count ten", counted_again)
        assert env.volume(insts[0], "disk").exists()


def _yaml_manifest(inst: str, disks: list[dict[str, Any]]) -> tuple[str, list[int]]:
    """A manifest's YAML text and the offsets where each disk's entry ends but the last:
    cut there, the text is a valid manifest naming fewer disks."""
    import yaml

    head = yaml.safe_dump(
        {"apiVersion": "reconciler/v1", "kind": "InstanceStorage", "instance": inst},
        sort_keys=False,
    )
    text = head + "disks:\n"
    cuts = []
    for d in disks:
        cuts.append(len(text))
        text += yaml.safe_dump([d], sort_keys=False)
    return text, cuts[1:]


def _volumes(env: Env, inst: str, names: list[str]) -> dict[str, tuple[int, bytes]]:
    """Each volume's inode and first bytes."""
    out = {}
    for n in names:
        v = env.volume(inst, n)
        with open(v, "rb") as f:
            out[n] = (os.fstat(f.fileno()).st_ino, f.read(64))
    return out


def _paused(lp: Loop, seconds: float) -> Callable[[], bool]:
    """True once `seconds` have passed and two resyncs have run since it was made."""
    start, resyncs = time.monotonic(), lp.metrics.resyncs._value.get()
    return lambda: (
        lp.metrics.resyncs._value.get() >= resyncs + 2 and time.monotonic() - start >= seconds
    )


def test_a_manifest_rewritten_in_place_and_paused_at_each_disk_loses_nothing(env: Env) -> None:
    """`cat >`, `cp` or an editor that does not rename: the writer holds the file open with
    a valid manifest naming fewer disks in it, for longer than the settle time and across
    resyncs; neither the watcher nor the resync acts on it, and no disk is deleted."""
    from reconciler.schema.speed.mcache import stat_key

    settle = 1.5
    names = ["d0", "d1", "d2"]
    inst = str(uuid.uuid5(uuid.NAMESPACE_DNS, "inplace"))
    text, cuts = _yaml_manifest(inst, [disk(n, size="1MiB") for n in names])
    path = env.manifests / "inplace.yaml"
    with loop(env, resync=0.3, settle=settle) as lp:
        path.write_text(text)
        wait_until("the disks", lambda: ready(env, inst, 1))
        for n in names:  # data the reconciler must keep
            with open(env.volume(inst, n), "r+b") as f:
                f.write(f"marker of {n}".encode())
        before = _volumes(env, inst, names)
        for cut in [0, *cuts]:  # 0: the file emptied (O_TRUNC), no disks at all
            read = lp.index.key(str(path))
            with open(path, "wb") as w:  # as `cat > path` does
                w.write(text[:cut].encode())
                w.flush()
                # The pause: past the settle time twice, and two resyncs after the write.
                wait_until(
                    "two resyncs and twice the settle time with the half file",
                    _paused(lp, 2 * settle),
                )
                assert _volumes(env, inst, names) == before, f"cut at {cut}"
                assert lp.index.key(str(path)) == read  # neither watcher nor resync read it
                w.write(text[cut:].encode())
            wait_until(
                "the whole file to be read",
                lambda: lp.index.key(str(path)) == stat_key(os.stat(path)),
            )
        resyncs = lp.metrics.resyncs._value.get()
        wait_until(
            "a resync after the last write", lambda: lp.metrics.resyncs._value.get() > resyncs
        )
        wait_until("the queue to drain", lambda: not lp.queue.depth() and not lp.queue.processing())
        assert _volumes(env, inst, names) == before
        assert ready(env, inst)
        deletes = [
            s
            for m in lp.metrics.actions.collect()
            for s in m.samples
            if s.labels.get("kind") == "delete" and s.value
        ]
        assert deletes == []


def test_a_disk_removed_from_a_closed_manifest_goes_after_the_settle_time(env: Env) -> None:
    """A real removal is applied, once the file has been closed and unchanged for the
    settle time, and not while some process still holds the file open for writing."""
    settle = 3.0
    inst = str(uuid.uuid5(uuid.NAMESPACE_DNS, "removal"))
    text, (cut,) = _yaml_manifest(inst, [disk("keep", size="1MiB"), disk("drop", size="1MiB")])
    path = env.manifests / "removal.yaml"
    with loop(env, settle=settle):
        path.write_text(text)
        wait_until("the disks", lambda: ready(env, inst, 1))
        drop = env.volume(inst, "drop")
        keep_ino = env.volume(inst, "keep").stat().st_ino
        path.write_text(text[:cut])  # in place, and closed: a real removal

        def settling(why: str) -> Callable[[], bool]:
            def check() -> bool:
                s = status(env, inst)
                c = s.condition("Ready") if s else None
                return c is not None and c.reason == "Settling" and why in c.message

            return check

        wait_until("the deletion to wait for the settle time", settling("unchanged for 3 s"))
        assert drop.exists()
        # Opened for writing, and nothing written: no event says when it is done.
        holder = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            wait_until("the deletion to wait for the holder", settling("holds"))
            assert drop.exists()
        finally:
            os.close(holder)
        wait_until("the disk to go", lambda: not drop.exists() and ready(env, inst, 2))
        assert env.volume(inst, "keep").stat().st_ino == keep_ino


def test_with_prune_a_manifest_removed_and_written_anew_keeps_its_disks(env: Env) -> None:
    """An editor that unlinks the file and writes it anew (`rm f; cat > f`): with --prune
    the instance has no manifest for a moment; its disks wait the settle time, and are kept
    when the file is back. A file that stays away is pruned after the settle time."""
    settle = 3.0
    inst = str(uuid.uuid5(uuid.NAMESPACE_DNS, "unlinked"))
    text, _ = _yaml_manifest(inst, [disk("disk", size="1MiB")])
    path = env.manifests / "unlinked.yaml"
    with loop(env, settle=settle, prune=True):
        path.write_text(text)
        wait_until("the disk", lambda: ready(env, inst, 1))
        vol = env.volume(inst, "disk")
        ino = vol.stat().st_ino

        def settling() -> bool:
            s = status(env, inst)
            c = s.condition("Ready") if s else None
            return c is not None and c.reason == "Settling"

        path.unlink()
        wait_until("the prune to wait for the settle time", settling)
        path.write_text(text)
        wait_until("the instance to be Ready again", lambda: ready(env, inst))
        assert vol.stat().st_ino == ino

        path.unlink()
        wait_until("the prune to wait for the settle time", settling)
        assert vol.exists()
        wait_until("the prune", lambda: not vol.exists())


def test_the_status_of_an_invalid_manifest_says_file_line_and_column(env: Env) -> None:
    inst = str(uuid.uuid5(uuid.NAMESPACE_DNS, "invalid"))
    text, _ = _yaml_manifest(inst, [disk("disk", size="1MiB", pool="nowhere")])
    path = env.manifests / "invalid.yaml"
    path.write_text(text)
    rc, _, err = env.main(["validate", "--config", str(env.config_path), str(path)])
    assert rc != 0
    (said,) = [line.removeprefix("error: ") for line in err.splitlines() if "error:" in line]
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: disks\[0\]\.pool: ", said), said
    with loop(env):

        def invalid() -> InstanceStatus | None:
            s = status(env, inst)
            c = s.condition("Ready") if s else None
            return s if c is not None and c.reason == "ManifestInvalid" else None

        s = wait_until("the manifest to be found invalid", invalid)
    assert s.lastError == said
    rc, out, err = env.main(["status", "--output", "json", "--config", str(env.config_path)])
    assert rc == 0, err
    (row,) = [r for r in json.loads(out) if r["instance"] == inst]
    assert row["lastError"] == said
    assert {c["type"]: c for c in row["conditions"]}["Ready"]["message"] == said


def test_sighup_reads_every_manifest_again_with_the_new_config(
    env: Env, pools: Any, tmp_path: Path
) -> None:
    """An instance invalid only because the config lacked its pool converges once SIGHUP
    brings a config that has it, though its manifest did not change."""
    second = pools.make(tmp_path / "second")
    inst = write(env, "later", [disk("disk", size="1MiB", pool="second")])
    proc = _start(env)
    try:
        _ready_line(proc)

        def invalid() -> bool:
            s = status(env, inst)
            c = s.condition("Ready") if s else None
            return c is not None and c.reason == "ManifestInvalid" and s is not None and s.terminal

        wait_until("the manifest to be invalid under the old config", invalid)
        env.pools["second"] = (second.name, second.path)
        env.write_config()
        proc.send_signal(signal.SIGHUP)
        wait_until("the instance to converge", lambda: ready(env, inst))
        assert env.volume(inst, "disk", pool="second").exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_watchdog_is_fed_by_the_main_thread_and_starves_while_it_is_wedged(
    env: Env, tmp_path: Path
) -> None:
    """WatchdogSec=: systemd's NOTIFY_SOCKET (a datagram socket bound here) gets READY=1,
    then WATCHDOG=1 every half of WATCHDOG_USEC; with the main thread wedged (a hold
    point) none comes, while the workers still reconcile, and they resume when it is
    released. (systemd then restarts a starved service; no systemd runs here.)"""
    import socket

    addr = str(tmp_path / "notify")
    wedge = tmp_path / "wedge"
    held = tmp_path / "wedge.held"
    usec = 200_000  # WATCHDOG=1 every 0.1 s
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(addr)
        sock.settimeout(DEADLINE)
        proc = _start(
            env,
            extra={
                "NOTIFY_SOCKET": addr,
                "WATCHDOG_USEC": str(usec),
                "RECONCILER_HOLD_AT": f"loop.main:{wedge}",
            },
        )
        log: list[str] = []  # drained, so a full pipe never wedges the loop instead
        assert proc.stderr is not None
        drain = threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True)
        drain.start()
        try:
            assert sock.recv(100) == b"READY=1"
            for _ in range(3):  # fed, again and again
                assert sock.recv(100) == b"WATCHDOG=1"

            wedge.touch()
            wait_until("the main thread to be wedged", held.exists)
            # Whatever was sent came before the wedge, and is in the socket already.
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    assert sock.recv(100) == b"WATCHDOG=1"
            wedged_at = time.monotonic()
            # The workers still work: a manifest written now converges.
            inst = write(env, "wd", [disk("disk", size="16MiB")])
            # An absence is seen only over time: the reconcile, and at least five of the
            # watchdog's intervals.
            wait_until(
                "the instance to converge with the main thread wedged",
                lambda: ready(env, inst) and time.monotonic() - wedged_at > 5 * usec / 2e6,
            )
            assert held.exists()
            with pytest.raises(BlockingIOError):
                sock.recv(100)  # starved: systemd would restart the service

            sock.settimeout(DEADLINE)
            wedge.unlink()
            assert sock.recv(100) == b"WATCHDOG=1"  # fed again
            proc.send_signal(signal.SIGTERM)
            while (got := sock.recv(100)) == b"WATCHDOG=1":
                pass
            assert got == b"STOPPING=1"
            proc.wait(timeout=DEADLINE)
            assert proc.returncode == 0, "".join(log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    events = [json.loads(line).get("event") for line in log]
    assert "watchdog" in events and "reconcile.crashed" not in events


def test_the_watchdog_is_for_this_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.control.loop import sd_notify, watchdog_interval

    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # a parent's
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert watchdog_interval() is None
    # A notify socket that is gone is logged, not raised: the loop runs on.
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert sd_notify("WATCHDOG=1") is False
