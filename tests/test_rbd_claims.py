"""Honest plans on a Ceph pool many hosts share, for the disks of an instance another host
owns (its claim, drivers/rbd/records.py): a disk that has no record yet is planned like
its siblings, never as a create that apply then refuses; a live owner is a warning (the
peer host's one-shot runs and cron exit 0, or 2 with --detailed-exitcode when it has
other work); an owner that is gone is taken over, its new disk made (as before).
Real Ceph cluster, real libvirtd, the real CLI as separate processes."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.control.status import InstanceStatus, StatusStore
from tests.conftest_ceph import Ceph
from tests.env import Env
from tests.rbdsite import RbdSite, rbd_site
from tests.test_rbd_hosts import DEADLINE, host_env, owned, plan, rdisk, wait_for, warned

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def ok(res: subprocess.CompletedProcess[str], rc: int = 0) -> str:
    assert res.returncode == rc, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return res.stdout


def status(env: Env, instance: str) -> InstanceStatus | None:
    store = StatusStore(env.root / "state" / "status.sqlite")
    try:
        return store.get(instance)
    finally:
        store.close()


def ready_status(env: Env, instance: str) -> str | None:
    st = status(env, instance)
    c = None if st is None else st.condition("Ready")
    return None if c is None else c.status


def test_a_new_disk_of_an_instance_another_host_owns_is_planned_owned_elsewhere(
    site: RbdSite, tmp_path: Path
) -> None:
    ns = "claims"
    a = host_env(site, tmp_path / "a", "host-a", ns, {})
    b = host_env(site, tmp_path / "b", "host-b", ns, {})
    inst = a.manifest("vm", [rdisk("root", size="4MiB")])
    ok(a.subprocess())
    root, extra = f"{inst}_root", f"{inst}_extra"

    # B's manifest names the instance with a disk A has not made, and an instance of its own.
    b.manifest("vm", [rdisk("root", size="4MiB"), rdisk("extra", size="4MiB")], instance=inst)
    mine = b.manifest("mine", [rdisk("d", size="4MiB")])
    doc = plan(b)
    assert [(x["action"], x["volume"]) for x in doc["actions"]] == [("create", f"{mine}_d")]
    assert doc["errors"] == []
    assert warned(doc) == Counter({"owned-elsewhere": 2})
    by_volume = {w["volume"]: w["message"] for w in doc["warnings"]}
    assert "host host-a (heartbeat" in by_volume[root]
    assert "host host-a (heartbeat" in by_volume[extra]
    assert f"which has claimed instance {inst}" in by_volume[extra]
    # Exit codes: anything else planned is 2 with --detailed-exitcode, the warning 0.
    ok(b.subprocess("--dry-run", "--detailed-exitcode"), 2)
    ok(b.subprocess("--dry-run"))

    # Apply does what the dry run said: B's own disk, nothing of A's instance.
    out = ok(b.subprocess())
    assert f"created {mine}/d" in out and "FAILED" not in out, out
    assert extra not in site.images()
    assert {r.volume for r in owned(site, ns, "host-b")} == {f"{mine}_d"}
    assert {r.volume for r in owned(site, ns, "host-a")} == {root}
    ok(b.subprocess("--detailed-exitcode"))  # nothing else to do: 0, the warning stays

    # B's loop says so in the instance's status: not ready, owned by another host, no error.
    watch = b.start_watch(tmp_path / "b-watch.log", "--resync-interval", "1")
    try:
        got = wait_for("B's loop to write the instance's status", lambda: status(b, inst))
        ready = got.condition("Ready")
        assert ready is not None and (ready.status, ready.reason) == ("False", "OwnedElsewhere")
        assert "host host-a" in ready.message and not got.lastError
        # Its own instance, in the same pass, is ready.
        wait_for("B's own instance to be ready", lambda: ready_status(b, mine) == "True")
    finally:
        watch.terminate()
        watch.wait(timeout=DEADLINE)

    # A is gone (B gives heartbeats 3 s): B takes the instance over, fencing A, and makes
    # the new disk (what apply did before plans showed the claim).
    b.ownership = {"heartbeatExpiry": 3}
    b.write_config()
    doc = wait_for(
        "A's heartbeat to expire", lambda: (d := plan(b))["actions"] and d, deadline=DEADLINE
    )
    assert sorted((x["action"], x["volume"]) for x in doc["actions"]) == [
        ("create", extra),
        ("take-over", root),
    ]
    assert doc["errors"] == [] and "owned-elsewhere" not in warned(doc)
    ok(b.subprocess())
    assert {r.volume for r in owned(site, ns, "host-b")} == {f"{mine}_d", root, extra}
    assert extra in site.images()
    doc = plan(b)
    assert doc["actions"] == [] and doc["errors"] == []
