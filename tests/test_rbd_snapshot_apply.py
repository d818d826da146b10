"""Snapshots on a real rbd pool through `reconcile` (the real Ceph and the private
libvirtd): planned, applied, restored from, refused and deleted; records rebuilt from the
disk images' metadata; and two hosts on one pool.

What each test proves:
- an instance's two disks get one `snapshot` action; apply makes image snapshots
  `snap-NAME`, records them ready in RADOS with their handle, and keeps each record's copy
  in its disk's metadata; a restore is a clone v2 of the snapshot holding the disk's bytes
  as they were, grown; dropping the snapshot while a clone of it exists, whoever made the
  clone, is a plan error naming it and refused by apply; once the clone is gone the delete
  is planned destructive and applied; an instance that goes takes its snapshots with it;
- lost snapshot records come back from the disk images (`records rebuild`) and the next
  plan has nothing to do;
- only the host holding the instance's claim takes its snapshots: another host with the
  same manifest plans none and makes none.
Every plan is checked against what apply then does on the same state.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.model.naming import snapshot_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from tests.conftest_ceph import Ceph
from tests.env import Env
from tests.rbdsite import RbdSite, rbd_site
from tests.test_rbd_hosts import catalog, host_env, image_file, rdisk, store, warned

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]

MiB = 1 << 20


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def snaps_of(site: RbdSite, image: str) -> list[str]:
    import rbd

    with rbd.Image(site.ioctx, image, read_only=True) as img:
        return sorted(str(s["name"]) for s in img.list_snaps())


def records(site: RbdSite, ns: str, host: str) -> dict[str, DiskRecord]:
    s = store(site, ns, host)
    try:
        good, bad = s.load_all()
        assert bad == []
        return {r.volume: r for r in good}
    finally:
        s.close()


def setup(site: RbdSite, tmp_path: Path, host: str = "host-a") -> tuple[Env, str, dict[str, Any]]:
    ns = f"snap-{uuid.uuid4().hex[:8]}"
    images = {"alpha": catalog(image_file(tmp_path / "alpha.raw"))}
    return host_env(site, tmp_path / host, host, ns, images), ns, images


def vm_disks(root: list[str], data: list[str]) -> list[dict[str, Any]]:
    return [
        rdisk("root", image="alpha", size="8MiB") | {"snapshots": root},
        rdisk("data", size="4MiB") | {"snapshots": data},
    ]


def run(env: Env, *args: str) -> str:
    rc, out, err = env.run(*args)
    assert rc == 0, out + err
    return out


def test_take_restore_refuse_and_delete(site: RbdSite, tmp_path: Path) -> None:
    env, ns, _ = setup(site, tmp_path)
    vm = env.manifest("vm", vm_disks(["s1"], ["s1"]))
    run(env)  # the disks are made; their snapshots are taken by the next run
    root, data = f"{vm}_root", f"{vm}_data"
    site.write(root, b"before" * 1000, 2 * MiB)
    site.write(data, b"data-before", 0)
    before = site.digests({root: None})[root]

    plan = env.plan_json()
    keys = sorted([snapshot_name(root, "s1"), snapshot_name(data, "s1")])
    assert [(a["action"], a["snapshot"]["name"]) for a in plan["actions"]] == [("snapshot", "s1")]
    assert sorted(d["key"] for d in plan["actions"][0]["snapshot"]["disks"]) == keys
    assert plan["actions"][0]["snapshot"]["consistency"] == "idle"
    run(env)
    assert snaps_of(site, root) == ["snap-s1"] and snaps_of(site, data) == ["snap-s1"]
    recs = records(site, ns, "host-a")
    for key in keys:
        r = recs[key]
        assert r.kind is RecordKind.SNAPSHOT and r.state is RecordState.READY
        assert r.snapshot is not None and r.snapshot.handle == key.replace("+snap-", "@snap-")
        vol = key.split("+")[0]
        assert r.snapshot.disk_generation == recs[vol].generation
        assert site.metadata(vol, "reconciler.snapshot.s1") == r.model_dump_json()
    assert env.plan_json()["actions"] == []

    # The disk moves on; a larger disk restored from the snapshot has the old bytes.
    site.write(root, b"after!" * 1000, 2 * MiB)
    rest = env.manifest(
        "restored",
        [rdisk("root", size="16MiB", template=None) | {"source": {"snapshot": f"{vm}/root@s1"}}],
    )
    restored = f"{rest}_root"
    plan = env.plan_json()
    assert [(a["action"], a["volume"]) for a in plan["actions"]] == [("create", restored)]
    run(env)
    assert site.parent(restored) == (root, "snap-s1")
    assert site.size(restored) == 16 * MiB
    assert site.digests({restored: 8 * MiB})[restored] == before
    assert site.metadata(restored, "reconciler.snapshot.s1") is None  # not inherited
    assert records(site, ns, "host-a")[restored].source == {"snapshot": f"{vm}/root@s1"}
    assert env.plan_json()["actions"] == []

    # Dropping s1 of root while clones of it exist: a plan error naming them (the restore,
    # and a clone someone else made, which no record of this host names), refused by apply.
    import rbd

    stranger = f"other-{uuid.uuid4().hex[:8]}"
    rbd.RBD().clone(site.ioctx, root, "snap-s1", site.ioctx, stranger)
    env.manifest("vm", vm_disks([], ["s1"]), instance=vm)
    plan = env.plan_json("--prune")
    (e,) = plan["errors"]
    assert e["code"] == "snapshot-in-use" and restored in e["message"] and stranger in e["message"]
    assert [a for a in plan["actions"] if a["action"] == "delete-snapshot"] == []
    rc, out, err = env.run("--prune")
    assert rc == 1 and "snapshot-in-use" in out + err, out + err
    assert snaps_of(site, root) == ["snap-s1"]

    # The clones go; then the delete is planned, destructive, and applied.
    rbd.RBD().remove(site.ioctx, stranger)
    env.manifest("restored", [], instance=rest, deleted=True)  # gone, not handed over
    # The restore is deleted first; the snapshot is still in use as this plan is made,
    # so it says so (and the run exits 1); the next plan deletes it.
    plan = env.plan_json("--prune")
    assert [a["action"] for a in plan["actions"]] == ["delete"]
    assert [e["code"] for e in plan["errors"]] == ["snapshot-in-use"]
    rc, out, err = env.run("--prune")
    assert rc == 1 and "deleted" in out, out + err
    assert restored not in site.images() and snaps_of(site, root) == ["snap-s1"]
    plan = env.plan_json("--prune")
    dels = [(a["action"], a["volume"], a["destructive"]) for a in plan["actions"]]
    assert dels == [("delete-snapshot", snapshot_name(root, "s1"), True)]
    run(env, "--prune")
    assert snaps_of(site, root) == [] and snaps_of(site, data) == ["snap-s1"]
    assert snapshot_name(root, "s1") not in records(site, ns, "host-a")
    assert site.metadata(root, "reconciler.snapshot.s1") is None
    assert env.plan_json("--prune")["actions"] == []

    # The instance goes: its disks take their snapshots with them.
    env.manifest("vm", [], instance=vm, deleted=True)
    run(env, "--prune")
    assert not [i for i in site.images() if i.startswith(vm)]
    assert not [r for r in records(site, ns, "host-a").values() if r.instance == vm]


def test_lost_snapshot_records_are_rebuilt_from_the_disk_images(
    site: RbdSite, tmp_path: Path
) -> None:
    env, ns, _ = setup(site, tmp_path)
    vm = env.manifest("vm", vm_disks(["a", "b"], ["a"]))
    run(env)
    run(env)
    recs = records(site, ns, "host-a")
    snaps = {k: r for k, r in recs.items() if r.kind is RecordKind.SNAPSHOT}
    assert len(snaps) == 3
    # Lose them from RADOS (the disks' own records stay).
    s = store(site, ns, "host-a")
    try:
        for r in snaps.values():
            s.delete(r.pool, r.volume, r.generation)
    finally:
        s.close()
    assert not [r for r in records(site, ns, "host-a").values() if r.kind is RecordKind.SNAPSHOT]

    rc, out, err = env.main(
        [
            "records",
            "rebuild",
            "ceph",
            "--yes",
            "--config",
            str(env.config_path),
            str(env.manifests),
        ]
    )
    assert rc == 0, out + err
    back = {k: r for k, r in records(site, ns, "host-a").items() if r.kind is RecordKind.SNAPSHOT}
    assert back.keys() == snaps.keys()
    for k, r in back.items():
        assert r.snapshot == snaps[k].snapshot and r.state is RecordState.READY
    plan = env.plan_json()
    assert plan["actions"] == [] and plan["errors"] == []
    assert snaps_of(site, f"{vm}_root") == ["snap-a", "snap-b"]


def test_only_the_claim_holder_takes_snapshots(site: RbdSite, tmp_path: Path) -> None:
    a, ns, images = setup(site, tmp_path, "host-a")
    b = host_env(site, tmp_path / "host-b", "host-b", ns, images)
    vm = a.manifest("vm", vm_disks(["s"], []))
    run(a)
    run(a)
    assert snaps_of(site, f"{vm}_root") == ["snap-s"]

    # B has the same manifest with more snapshots: it plans nothing for A's instance, and
    # its apply makes nothing.
    b.manifest("vm", vm_disks(["s", "t"], ["t"]), instance=vm)
    doc = b.plan_json()
    assert doc["actions"] == [] and doc["errors"] == []
    assert warned(doc) == Counter({"owned-elsewhere": 2})
    run(b)
    assert snaps_of(site, f"{vm}_root") == ["snap-s"] and snaps_of(site, f"{vm}_data") == []
    assert [r for r in records(site, ns, "host-b").values() if r.instance == vm] == []
    # A takes its own when its manifest asks.
    a.manifest("vm", vm_disks(["s", "t"], ["t"]), instance=vm)
    run(a)
    assert snaps_of(site, f"{vm}_root") == ["snap-s", "snap-t"]
    assert snaps_of(site, f"{vm}_data") == ["snap-t"]
    assert {r.volume for r in records(site, ns, "host-a").values()} >= {
        snapshot_name(f"{vm}_root", "t"),
        snapshot_name(f"{vm}_data", "t"),
    }


def test_an_instance_moves_to_another_host_with_its_snapshots(
    site: RbdSite, tmp_path: Path
) -> None:
    a, ns, images = setup(site, tmp_path, "host-a")
    b = host_env(site, tmp_path / "host-b", "host-b", ns, images)
    vm = a.manifest("vm", vm_disks(["s"], ["s"]))
    run(a)
    run(a)
    keys = {snapshot_name(f"{vm}_root", "s"), snapshot_name(f"{vm}_data", "s")}
    assert keys <= records(site, ns, "host-a").keys()

    # A's manifest goes and A hands the instance over (--prune): its snapshots go with
    # the disks, none is deleted.
    b.manifest("vm", vm_disks(["s"], ["s"]), instance=vm)
    a.remove_manifest("vm")
    plan = a.plan_json("--prune")
    assert sorted(x["action"] for x in plan["actions"]) == ["hand-over", "hand-over"]
    run(a, "--prune")
    assert [r for r in records(site, ns, "host-a").values() if r.instance == vm] == []
    assert snaps_of(site, f"{vm}_root") == ["snap-s"] and snaps_of(site, f"{vm}_data") == ["snap-s"]

    # B takes the disks, and their snapshot records with them; then has nothing to do.
    run(b)
    got = records(site, ns, "host-b")
    assert keys <= got.keys()
    assert all(got[k].state is RecordState.READY for k in keys)
    plan = b.plan_json()
    assert plan["actions"] == [] and plan["errors"] == []
    # B, now the holder, deletes one.
    b.manifest("vm", vm_disks([], ["s"]), instance=vm)
    run(b, "--prune")
    assert snaps_of(site, f"{vm}_root") == [] and snaps_of(site, f"{vm}_data") == ["snap-s"]
