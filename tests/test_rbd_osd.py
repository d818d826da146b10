"""The OSD stopped in the middle of a run on an rbd pool: every step after it fails with a
clear error naming the cause once the client's op timeout (the pool's opTimeout, 3 s
here) is spent, and the calls after the first timeout fail at once rather than each
waiting again, so the run ends instead of hanging; nothing is recorded as done that was
not; and a run after the OSD is back converges. The mon unreachable: one connect's wait,
the error saying so.

This needs an OSD that keeps its data across a restart, which a memstore OSD does not (it
holds everything in its own memory), so the test starts a cluster of its own with a
BlueStore OSD on a sparse file (scripts/ceph.sh with RECONCILER_CEPH_OBJECTSTORE=bluestore)
and stops and starts just that cluster's OSD; the shared test cluster is not touched."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest_ceph import Ceph, ceph_sh, private_cluster
from tests.env import ROOT
from tests.rbdsite import RbdSite, rbd_site
from tests.test_rbd import catalog, image_file, rdisk
from tests.test_rbd_crash import HOST, NS, check_consistent

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]

DEADLINE = 120.0  # seconds for any one wait below; far above what each should take


@pytest.fixture(scope="module")
def bluestore() -> Iterator[Ceph]:
    with private_cluster("bs", RECONCILER_CEPH_OBJECTSTORE="bluestore") as c:
        yield c


def wait_for(what: str, ok: Any) -> None:
    deadline = time.monotonic() + DEADLINE
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def writable(site: RbdSite) -> bool:
    try:
        site.ioctx.write_full("probe", b"x")
    except Exception:
        return False
    return True


def test_the_osd_stopped_mid_run(bluestore: Ceph, libvirt_uri: str, tmp_path: Path) -> None:
    d: Path = bluestore.dir  # type: ignore[attr-defined]
    with rbd_site(bluestore, libvirt_uri) as site:
        env = site.env(tmp_path / "env", namespace=NS, op_timeout=3)
        env.host = HOST
        env.safety = {"maxDeletePercent": 100}
        env.images = {"a": catalog(image_file(tmp_path / "a.raw"), "raw")}
        env.write_config()
        for i in range(6):
            env.manifest(f"vm{i}", [rdisk("root", size="16MiB", image="a", template=None)])
        flag = tmp_path / "paused"
        # Boundary 12: the image is imported and the first disks are cloned.
        res_env = {"RECONCILER_PAUSE_AT": f"12:{flag}"}
        p = subprocess.Popen(
            env.argv("--jobs", "2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, **res_env},
        )
        try:
            wait_for("the run to pause", flag.exists)
            ceph_sh("stop-osd", str(d))
            flag.unlink()
            out, _ = p.communicate(timeout=DEADLINE)  # a hang fails here
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 1, out
        assert "Traceback" not in out, out
        # Each failed step names the cause, the first Ceph call that timed out, not a
        # cleanup (a rollback, a lock's release) that failed after it: those are skipped
        # within opTimeout of the first timeout (drivers/rbd/outage.py).
        failed = [line for line in out.splitlines() if line.startswith("FAILED ")]
        assert failed, out
        # "FAILED create I/D (P/V): why", and the run's last line if the store stopped it.
        whys = [
            line.split("): ", 1)[1]
            for line in failed
            if "the records database failed; the run stops" not in line
        ]
        last = out.strip().splitlines()[-1]
        if last.startswith("reconcile: error: "):
            whys.append(last.removeprefix("reconcile: error: "))
        for why in whys:
            assert "timed out" in why and "releas" not in why, out
        ceph_sh("start-osd", str(d))
        wait_for("the OSD to serve writes", lambda: writable(site))
        # Nothing recorded as done that was not: each ready record has its image.
        from tests.test_rbd_crash import store

        s = store(site)
        try:
            recs, bad = s.load_all()
        finally:
            s.close()
        assert not bad
        images = site.images()
        for r in recs:
            if r.state.value == "ready":
                assert r.volume in images, r
        res = env.subprocess()
        assert res.returncode == 0, res.stdout + res.stderr
        assert env.plan_json()["actions"] == []
        check_consistent(site)


def test_the_mon_unreachable(bluestore: Ceph, libvirt_uri: str, tmp_path: Path) -> None:
    """A run that finds the monitor not answering (stopped with SIGSTOP: connections are
    accepted and never answered) fails the pool once, naming the connect that timed out;
    the driver's later calls (the records, the locks) do not each wait to connect again."""
    d: Path = bluestore.dir  # type: ignore[attr-defined]
    pid = int((d / "run" / "mon.a.pid").read_text())
    with rbd_site(bluestore, libvirt_uri) as site:
        env = site.env(tmp_path / "env", namespace=NS, op_timeout=3)
        env.host = HOST
        env.images = {"a": catalog(image_file(tmp_path / "a.raw"), "raw")}
        env.write_config()
        env.manifest("vm0", [rdisk("root", size="16MiB", image="a", template=None)])
        os.kill(pid, signal.SIGSTOP)
        try:
            res = env.subprocess(timeout=DEADLINE)  # a hang fails here
        finally:
            os.kill(pid, signal.SIGCONT)
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert "Traceback" not in out, out
        assert "cannot connect to Ceph" in out and "timed out" in out, out
        causes = [line for line in out.splitlines() if "ceph.unreachable" in line]
        assert len(causes) == 1, out  # one connect's wait
        res = env.subprocess(timeout=DEADLINE)
        assert res.returncode == 0, res.stdout + res.stderr
