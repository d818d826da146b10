"""Several hosts on one Ceph pool: each a separate reconciler process with its own state
directory and host identity, as compute hosts sharing a Ceph cluster are.

- Three hosts started together on overlapping manifests: one import per image cluster-wide,
  each disk made once and owned by one host, and every host converged (ten rounds).
- An instance moves from A to B with both manifests present for a while, A running with
  `--prune`: nothing is deleted, A hands the instance over once its manifest is gone, B
  takes it and converges, the disk's data unchanged.
- A is stopped (SIGSTOP) past its heartbeat: B takes over, fencing A; A resumed cannot
  write anything (its client is blocklisted) and the disk stays as B has it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.rbd.records import RadosRecordStore
from reconciler.model.record import DiskRecord, RecordKind
from tests.conftest_ceph import Ceph
from tests.env import Env, disk
from tests.rbdsite import RbdSite, rbd_site

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]

MiB = 1 << 20
DEADLINE = 120.0  # seconds: generous, two cores shared with other test sessions
ROUNDS = 10


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def image_file(path: Path, n: int = 8192) -> Path:
    path.write_bytes(
        b"".join(hashlib.sha256(f"{path.name}{i}".encode()).digest() for i in range(n))
    )
    return path


def catalog(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {
        "location": f"file://{path}",
        "format": "raw",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def host_env(
    site: RbdSite,
    root: Path,
    host: str,
    ns: str,
    images: dict[str, Any],
    op_timeout: float = 30,
    **ownership: Any,
) -> Env:
    env = site.env(root, namespace=ns, op_timeout=op_timeout)
    env.host = host
    env.images = images
    env.safety = {"maxDeletePercent": 100}
    env.ownership = ownership
    env.write_config()
    return env


def store(site: RbdSite, ns: str, host: str) -> RadosRecordStore:
    return RadosRecordStore(
        lambda: site.ceph.cluster.open_ioctx(site.pool), site.pool, host=host, namespace=ns
    )


def owned(site: RbdSite, ns: str, host: str) -> list[DiskRecord]:
    s = store(site, ns, host)
    try:
        good, bad = s.load_all()
        assert bad == []
        return [r for r in good if r.kind is RecordKind.DISK]
    finally:
        s.close()


def rdisk(name: str, **kw: Any) -> dict[str, Any]:
    return disk(name, backend="rbd", fmt="raw", pool="ceph", **kw)


def plan(env: Env) -> dict[str, Any]:
    res = env.subprocess("--dry-run", "--output", "json")
    assert res.returncode in (0, 1), res.stdout + res.stderr
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def plan_here(env: Env) -> dict[str, Any]:
    """plan(), by the CLI's main in this process: for checks of the state the hosts left,
    where a process of its own (0.4 s of start-up) would add nothing."""
    rc, out, err = env.run("--dry-run", "--output", "json")
    assert rc in (0, 1), out + err
    doc: dict[str, Any] = json.loads(out)
    return doc


def codes(doc: dict[str, Any]) -> Counter[str]:
    return Counter(e["code"] for e in doc["errors"])


def warned(doc: dict[str, Any]) -> Counter[str]:
    return Counter(w["code"] for w in doc["warnings"])


def wait_for(what: str, check: Any, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.1)  # polling a condition with a deadline, not synchronising on time
    raise AssertionError(f"timed out waiting for {what}")


# -- three hosts at once -------------------------------------------------------------------


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_three_hosts_started_together_make_each_disk_once(
    site: RbdSite, tmp_path: Path, round_: int
) -> None:
    ns = f"hosts-{round_}"
    imgs = {n: image_file(tmp_path / f"{n}.raw") for n in ("alpha", "beta")}
    images = {n: catalog(p) for n, p in imgs.items()}
    envs = [host_env(site, tmp_path / f"h{i}", f"host-{i}", ns, images) for i in range(3)]
    # Nine instances, three per host, and each host also names its neighbour's first: the
    # overlap is what hosts race for.
    ids = [str(uuid.UUID(int=round_ * 100 + k + 1)) for k in range(9)]
    for i, env in enumerate(envs):
        for k in [3 * i, 3 * i + 1, 3 * i + 2, (3 * i + 3) % 9]:
            env.manifest(
                f"vm{k}",
                [
                    rdisk("root", image="alpha" if k % 2 else "beta", size="8MiB"),
                    rdisk("scratch", size="4MiB"),
                ],
                instance=ids[k],
            )
    traces = [tmp_path / f"trace{i}" for i in range(3)]
    procs = []
    for env, trace in zip(envs, traces, strict=True):
        full = dict(os.environ, RECONCILER_TRACE_STEPS=str(trace))
        procs.append(env.start("--jobs", "2", env=full))
    outs = [p.communicate(timeout=DEADLINE) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        # 1: a host lost the race for an instance it shares (owned elsewhere), reported.
        assert p.returncode in (0, 1), out + err
        assert "Traceback" not in out + err

    # One import per image, cluster-wide.
    fetched = sum(t.read_text().count(" cache.image.fetched\n") for t in traces if t.exists())
    assert fetched == 2
    # Each disk made once, owned by exactly one host; nothing left over.
    by_host = {env.host: owned(site, ns, str(env.host)) for env in envs}
    keys = [r.key() for recs in by_host.values() for r in recs]
    assert len(keys) == len(set(keys)) == 18
    disks = {f"{i}_{d}" for i in ids for d in ("root", "scratch")}
    assert {v for _, v in keys} == disks
    images_now = site.images()
    assert disks <= images_now
    assert {i for i in images_now - disks if not i.startswith("_cache_")} == set()
    # Every host converged: nothing to do, no error; a warning only for the instance its
    # neighbour owns.
    for env in envs:
        doc = plan_here(env)
        assert doc["actions"] == [] and doc["errors"] == [], doc["errors"]
        mine = {r.instance for r in by_host[str(env.host)]}
        named = {w["instance"] for w in doc["warnings"] if w["code"] == "owned-elsewhere"}
        assert not (mine & named)
    # The data: each root disk begins with its image's bytes.
    for k, inst in enumerate(ids):
        want = imgs["alpha" if k % 2 else "beta"].read_bytes()
        assert site.read(f"{inst}_root", len(want)) == want
        assert site.size(f"{inst}_root") == 8 * MiB


# -- an instance moves -------------------------------------------------------------------


def test_an_instance_moves_from_a_to_b_without_losing_its_disk(
    site: RbdSite, tmp_path: Path
) -> None:
    ns = "move"
    imgs = {"alpha": image_file(tmp_path / "alpha.raw")}
    images = {"alpha": catalog(imgs["alpha"])}
    a = host_env(site, tmp_path / "a", "host-a", ns, images)
    b = host_env(site, tmp_path / "b", "host-b", ns, images)
    disks = [rdisk("root", image="alpha", size="8MiB"), rdisk("data", size="4MiB")]
    inst = a.manifest("vm", disks)
    res = a.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    marker = b"written by the guest on host A"
    site.write(f"{inst}_data", marker)

    # Both manifests present: B reports who owns it and changes nothing, and exits 0 (the
    # normal state while an instance moves); A, even with --prune, keeps everything (its
    # manifest names the instance).
    b.manifest("vm", disks, instance=inst)
    doc = plan(b)
    assert doc["actions"] == [] and doc["errors"] == []
    assert warned(doc) == Counter({"owned-elsewhere": 2})
    assert all("host host-a" in w["message"] for w in doc["warnings"])
    res = b.subprocess()
    assert res.returncode == 0 and "owned by host host-a" in res.stdout, res.stdout
    assert b.subprocess("--detailed-exitcode").returncode == 0
    res = a.subprocess("--prune")
    assert res.returncode == 0, res.stdout + res.stderr
    assert {r.volume for r in owned(site, ns, "host-a")} == {f"{inst}_root", f"{inst}_data"}

    # A's manifest goes. Without --prune A hands nothing over; with it, A hands over.
    a.remove_manifest("vm")
    assert plan(a)["actions"] == []
    res = a.subprocess("--prune")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("handed over") >= 2, res.stdout
    assert owned(site, ns, "host-a") == []
    assert {f"{inst}_root", f"{inst}_data"} <= site.images()  # nothing deleted

    # B takes it over (its first pass), then converges (its second).
    res = b.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("take-over") >= 2 or res.stdout.count("taken over") >= 2
    res = b.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    doc = plan(b)
    assert doc["actions"] == [] and doc["errors"] == []
    assert {r.volume for r in owned(site, ns, "host-b")} == {f"{inst}_root", f"{inst}_data"}
    assert site.read(f"{inst}_data", len(marker)) == marker
    # A, pruning again, has nothing of it and does nothing.
    doc = plan(a)
    assert doc["actions"] == []


# -- a host that is gone ------------------------------------------------------------------


def test_a_stopped_host_is_taken_over_and_cannot_write_when_resumed(
    site: RbdSite, tmp_path: Path
) -> None:
    ns = "fence"
    expiry = 3
    a = host_env(site, tmp_path / "a", "host-a", ns, {}, 5, heartbeatExpiry=expiry)
    b = host_env(site, tmp_path / "b", "host-b", ns, {}, 5, heartbeatExpiry=expiry)
    inst = a.manifest("vm", [rdisk("data", size="4MiB")])
    log = tmp_path / "a-watch.log"
    watch = a.start_watch(log, "--resync-interval", "1")
    try:
        wait_for(
            "A to make the disk",
            lambda: [r for r in owned(site, ns, "host-a") if r.state.value == "ready"],
        )
        os.kill(watch.pid, signal.SIGSTOP)
        b.manifest("vm", [rdisk("data", size="4MiB")], instance=inst)
        # B waits out A's heartbeat: owned elsewhere until then, then free to take.
        doc = wait_for(
            "A's heartbeat to expire",
            lambda: (d := plan(b))["actions"] and d,
            deadline=expiry * 10 + DEADLINE,
        )
        assert [x["action"] for x in doc["actions"]] == ["take-over"]
        res = b.subprocess()
        assert res.returncode == 0, res.stdout + res.stderr
        assert [r.volume for r in owned(site, ns, "host-b")] == [f"{inst}_data"]
        # A's manifest now asks for a bigger disk; A resumes, resyncs, and changes nothing.
        a.manifest("vm", [rdisk("data", size="8MiB")], instance=inst)
        seen = log.read_text().count('"event": "resync"')
        os.kill(watch.pid, signal.SIGCONT)
        wait_for(
            "A to resync twice after it resumed",
            lambda: log.read_text().count('"event": "resync"') >= seen + 2,
        )
        assert site.size(f"{inst}_data") == 4 * MiB
        assert [r.volume for r in owned(site, ns, "host-b")] == [f"{inst}_data"]
        assert owned(site, ns, "host-a") == []
        # A new process of host A is a new client: it sees who owns the disk, and waits.
        # B's heartbeat is as old as its last run; once that is older than A's expiry, A
        # would rightly offer to take the instance back, so this process of A gives B's
        # heartbeat a minute (a machine busy for `expiry` seconds made it fail).
        a.ownership = {"heartbeatExpiry": 60}
        a.write_config()
        doc = plan(a)
        assert doc["actions"] == [] and doc["errors"] == []
        assert warned(doc) == Counter({"owned-elsewhere": 1})
        (w,) = doc["warnings"]
        assert "host host-b" in w["message"]
        doc = plan(b)
        assert doc["actions"] == [] and doc["errors"] == []
    finally:
        os.kill(watch.pid, signal.SIGCONT)
        watch.terminate()
        watch.wait(DEADLINE)
