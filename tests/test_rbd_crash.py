"""SIGKILL at every step boundary (with --jobs 1; with --jobs 4, at a spread of them) of a
run on an rbd pool that imports an image, makes a template entry, snapshots, clones, grows
and deletes; then a normal run must converge: every image has a record and every record
its image (all ready), no temporary image is left, every entry's references are exactly
its disks, and the data of every disk that was ready before the killed run is unchanged."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.rbd.cluster import RbdRecordStore
from reconciler.model.naming import TEMP_PREFIX
from reconciler.model.record import RecordKind, RecordState
from tests.conftest_ceph import Ceph
from tests.env import Env
from tests.killpoints import at_each, kill_points
from tests.rbdsite import RbdSite, rbd_site
from tests.test_rbd import catalog, image_file, rdisk

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]

MiB = 1 << 20
NS = "crash"
HOST = "host-k"


def before(env: Env) -> None:
    env.manifest(
        "grow",
        [
            rdisk("root", size="16MiB", image="a", template=None),
            rdisk("swap", size="8MiB", template="swap"),
        ],
    )
    env.manifest("doomed", [rdisk("d", size="8MiB", template="ext4", label="doomed")])
    env.manifest("stable", [rdisk("d", size="16MiB", image="a", template=None)])


def after(env: Env, ids: dict[str, str]) -> None:
    env.manifest(
        "grow",
        [
            rdisk("root", size="24MiB", image="a", template=None),
            rdisk("swap", size="12MiB", template="swap"),
        ],
        instance=ids["grow"],
    )
    env.manifest("doomed", [], instance=ids["doomed"], deleted=True)
    env.manifest(
        "fresh",
        [
            rdisk("img", size="16MiB", image="b", template=None),
            rdisk("fs", size="8MiB", template="ext4", label="fresh"),
            rdisk("blank", size="4MiB", template="blank"),
        ],
    )


def store(site: RbdSite) -> RbdRecordStore:
    s = RbdRecordStore(
        lambda: site.ceph.cluster.open_ioctx(site.pool), site.pool, host=HOST, namespace=NS
    )
    s.exists = lambda volume: volume in site.images()  # as the driver's store has it
    return s


def setup_env(site: RbdSite, root: Path, images: dict[str, Any]) -> tuple[Env, dict[str, str]]:
    env = site.env(root / "env", namespace=NS)
    env.host = HOST
    env.safety = {"maxDeletePercent": 100}
    env.images = images
    env.write_config()
    before(env)
    res = env.subprocess()
    assert res.returncode == 0, res.stdout + res.stderr
    ids = {
        p.stem: p.read_text().split('"instance": "')[1].split('"')[0]
        for p in env.manifests.glob("*.yaml")
    }
    return env, ids


def check_consistent(site: RbdSite) -> None:
    s = store(site)
    try:
        records, bad = s.load_all()
        assert not bad, bad
        assert all(r.state is RecordState.READY for r in records), [
            (r.volume, r.state) for r in records if r.state is not RecordState.READY
        ]
        recorded = {r.volume for r in records}
        present = site.images()
        assert present == recorded, (present - recorded, recorded - present)
        assert not [i for i in present if i.startswith(TEMP_PREFIX)]
        for entry in (r for r in records if r.kind is RecordKind.CACHE):
            users = {r.volume for r in records if r.backing == entry.volume}
            # Counting prunes a reference whose disk has neither record nor image (a kill
            # between removing an image and dropping its reference).
            assert s.references("ceph", entry.volume) == len(users), entry
            refs = set(s.reference_names("ceph", entry.volume) or {})
            assert refs == users, (entry.volume, refs, users)
        clones = [r for r in records if r.kind is RecordKind.DISK and r.backing]
        parents = site.parents([r.volume for r in clones])
        for r in clones:
            assert r.backing in recorded
            parent = parents[r.volume]
            assert parent is not None and parent[0] == r.backing, (r.volume, parent)
    finally:
        s.close()


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Any]:
    a = image_file(tmp_path / "a.raw")
    b_raw = image_file(tmp_path / "b.raw", 32768)
    b = tmp_path / "b.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(b_raw), str(b)], check=True
    )
    return {"a": catalog(a, "raw"), "b": catalog(b, "qcow2")}


@pytest.mark.parametrize("jobs", [1, 4])
def test_kill_at_every_step_boundary(
    ceph: Ceph, libvirt_uri: str, tmp_path: Path, images: dict[str, Any], jobs: int
) -> None:
    """With --jobs 1 the Nth boundary is the same step in every run, and every one is
    covered; with --jobs 4 it varies, and a kill cuts several steps (and leases, and images
    left open) short at once: eight boundaries spread from the first to the last
    (tests/killpoints.py), to keep the suite's time (all of them passed when this was
    written, in 3.7 min; every third, 12 of 35, until the spread)."""
    with rbd_site(ceph, libvirt_uri) as site:
        env, ids = setup_env(site, tmp_path / "trace", images)
        after(env, ids)
        steps = env.traced_steps("--jobs", str(jobs))
        names = set(steps)
        assert {
            "cache.record.creating",
            "cache.image.fetched",
            "cache.temp.created",
            "cache.snapshot.created",
            "cache.volume.filled",
            "cache.reference.added",
            "volume.cloned",
            "volume.resized",
            "volume.deleted",
            "record.deleted",
        } <= names, names
        check_consistent(site)
        assert env.plan_json()["actions"] == []

    def kill_at(k: int) -> None:
        with rbd_site(ceph, libvirt_uri) as site:
            env, ids = setup_env(site, tmp_path / f"k{k}", images)
            # What must not change: every image ready before the run that is neither grown
            # nor deleted, whole; the grown disks, their first (old) bytes.
            lengths: dict[str, int | None] = {
                name: None
                for name in site.images()
                if not name.startswith(ids["grow"]) and not name.startswith(ids["doomed"])
            }
            lengths.update({f"{ids['grow']}_root": 16 * MiB, f"{ids['grow']}_swap": 8 * MiB})
            before_digests = site.digests(lengths)
            after(env, ids)
            killed = env.subprocess("--jobs", str(jobs), env={"RECONCILER_CRASH_AT": str(k)})
            assert killed.returncode == -signal.SIGKILL, (
                f"kill point {k}:\n{killed.stdout}\n{killed.stderr}"
            )
            res = env.subprocess()
            where = steps[k - 1] if jobs == 1 else f"of {len(steps)}"
            assert res.returncode == 0, f"kill point {k} ({where}): {res.stdout}{res.stderr}"
            assert env.plan_json()["actions"] == [], f"kill point {k} ({where}) did not converge"
            try:
                check_consistent(site)
            except AssertionError as e:
                raise AssertionError(f"kill point {k} ({where}): {e}") from None
            have = site.images()
            assert not [n for n in have if n.startswith(ids["doomed"])]
            now = site.digests(lengths)
            for name, want in before_digests.items():
                assert now[name] == want, (k, where, name)

    points = kill_points(len(steps), jobs)
    at_each(points, kill_at)  # two at a time: each has its own Ceph pool and env
    print(f"kill points covered with --jobs {jobs}: {len(points)} of {len(steps)}")
