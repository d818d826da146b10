"""The rbd snapshot primitives (reconciler/drivers/rbd/snapshots.py) against the real Ceph
(Pacific 16.2), and the facts of librbd their design stands on:

- a snapshot is a user-namespace image snapshot, clone v2 of which needs no protect and
  reads the disk's data at that moment, its parent's included, whatever the disk writes
  after;
- `remove_snap` of a snapshot with clones does not fail: it moves it to the trash, which is
  why `delete` asks Ceph for clones first and refuses, naming them;
- clone depth read from the parent chain, and a restore past `max_depth` flattened with
  its data whole;
- RBD's exclusive lock is no snapshot window: a writer holding the image open gets EROFS
  (so the driver pauses domains instead: drivers/host/pause.py, tested on test:///).

python-rbd calls that read images for assertions run through the site's helpers; nothing
here opens a group-namespace snapshot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from reconciler.drivers.host.libvirt import Connections
from reconciler.drivers.host.store import open_store
from reconciler.drivers.rbd import snapshots
from reconciler.drivers.rbd.cluster import Cluster
from reconciler.drivers.rbd.pool import RbdPoolDriver
from reconciler.model.errors import ReconcileError
from reconciler.model.naming import snapshot_name
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from reconciler.schema.config import CephConfig, PoolConfig
from tests.conftest_ceph import Ceph
from tests.rbdsite import RbdSite, rbd_site

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]

MiB = 1 << 20


@pytest.fixture(scope="module")
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


@pytest.fixture
def c(site: RbdSite) -> Iterator[Cluster]:
    cfg = CephConfig.model_validate(
        {"conf": str(site.ceph.conf), "pool": site.pool, "namespace": "reconciler"}
    )
    cl = Cluster("ceph", cfg, "host-a", offline=False, heartbeat_expiry=300.0)
    try:
        yield cl
    finally:
        cl.close()


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def disk_of_parent(site: RbdSite) -> tuple[str, str]:
    """A parent image P (data 'P' at 0) with snapshot base, and a disk D cloned from it
    that wrote 'D' at 4 MiB: the shape of a disk cloned from a cache entry."""
    import rbd

    parent, disk = name("par"), name("disk")
    rbd.RBD().create(site.ioctx, parent, 8 * MiB, old_format=False)
    with rbd.Image(site.ioctx, parent) as img:
        img.write(b"P" * 4096, 0)
        img.create_snap("base")
    rbd.RBD().clone(site.ioctx, parent, "base", site.ioctx, disk)
    site.write(disk, b"D" * 4096, 4 * MiB)
    return parent, disk


def test_a_restore_is_a_clone_of_the_snapshot_at_its_moment(site: RbdSite, c: Cluster) -> None:
    _, disk = disk_of_parent(site)
    ids = snapshots.take(c, [disk], "s1")
    assert set(ids) == {disk}
    assert snapshots.take(c, [disk], "s1") == ids  # a retry keeps the snapshot it made
    site.write(disk, b"X" * 4096, 4 * MiB)  # the disk moves on

    target = name("rest")
    flat = snapshots.restore(c, disk, "s1", target, 16 * MiB, '{"r": 1}', max_depth=4)
    assert not flat
    assert site.parent(target) == (disk, "snap-s1")
    assert site.size(target) == 16 * MiB
    assert site.read(target, 4) == b"PPPP"  # the parent's data, read through
    assert site.read(target, 4, 4 * MiB) == b"DDDD"  # the disk's, as it was
    assert site.metadata(target, "reconciler.record") == '{"r": 1}'
    assert snapshots.depth(c, target) == 2
    assert snapshots.dependents(c, disk, "s1") == [target]
    with pytest.raises(ReconcileError, match=r"exists|appeared"):
        snapshots.restore(c, disk, "s1", target, 16 * MiB, "{}", max_depth=4)


def test_delete_is_refused_while_clones_exist(site: RbdSite, c: Cluster) -> None:
    import rbd

    _, disk = disk_of_parent(site)
    snapshots.take(c, [disk], "s1")
    target = name("rest")
    snapshots.restore(c, disk, "s1", target, 8 * MiB, "{}", max_depth=4)
    with pytest.raises(snapshots.SnapshotInUse, match=target):
        snapshots.delete(c, disk, "s1")
    assert snapshots.exists(c, disk, "s1")

    # What the refusal guards against: librbd itself accepts the removal and moves the
    # snapshot to the trash namespace, out of reach by name, holding the disk.
    other = name("disk")
    rbd.RBD().create(site.ioctx, other, 4 * MiB, old_format=False)
    snapshots.take(c, [other], "t")
    child = name("child")
    snapshots.restore(c, other, "t", child, 4 * MiB, "{}", max_depth=4)
    with rbd.Image(site.ioctx, other) as img:
        img.remove_snap("snap-t")
        left = [(s["name"], s["namespace"]) for s in img.list_snaps()]
    assert len(left) == 1 and left[0][0] != "snap-t"
    assert left[0][1] == rbd.RBD_SNAP_NAMESPACE_TYPE_TRASH
    assert snapshots.depth(c, child) == 1  # its parent's snapshot in the trash: name only

    rbd.RBD().remove(site.ioctx, target)
    assert snapshots.dependents(c, disk, "s1") == []
    snapshots.delete(c, disk, "s1")
    assert not snapshots.exists(c, disk, "s1")
    snapshots.delete(c, disk, "s1")  # a missing snapshot is fine
    snapshots.delete(c, name("gone"), "s1")  # and a missing image


def test_a_restore_deeper_than_the_limit_is_flattened(site: RbdSite, c: Cluster) -> None:
    _, disk = disk_of_parent(site)  # depth 1
    snapshots.take(c, [disk], "a")
    r1 = name("r1")
    assert not snapshots.restore(c, disk, "a", r1, 8 * MiB, "{}", max_depth=2)  # depth 2
    site.write(r1, b"1" * 4096, 2 * MiB)
    snapshots.take(c, [r1], "b")
    r2 = name("r2")
    assert snapshots.restore(c, r1, "b", r2, 8 * MiB, "{}", max_depth=2)  # 3 > 2: flattened
    assert site.parent(r2) is None
    assert snapshots.depth(c, r2) == 0
    assert (site.read(r2, 4), site.read(r2, 4, 2 * MiB), site.read(r2, 4, 4 * MiB)) == (
        b"PPPP",
        b"1111",
        b"DDDD",
    )
    # flattened, it holds its snapshot's parent no more
    assert snapshots.dependents(c, r1, "b") == []


def test_snapshots_of_several_disks_and_a_missing_source(site: RbdSite, c: Cluster) -> None:
    _, d1 = disk_of_parent(site)
    _, d2 = disk_of_parent(site)
    ids = snapshots.take(c, [d1, d2], "both")
    assert sorted(ids) == sorted([d1, d2])
    assert snapshots.exists(c, d1, "both") and snapshots.exists(c, d2, "both")
    with pytest.raises(ReconcileError, match="gone"):
        snapshots.restore(c, d1, "nope", name("r"), 8 * MiB, "{}", max_depth=4)


# A writer in another client holds the image open and writes while this process takes
# RBD's exclusive lock: its writes fail (EROFS), they are not held back.
WRITER = """
import sys, time, rados, rbd
cluster = rados.Rados(conffile=sys.argv[1], name="client.admin"); cluster.connect()
io = cluster.open_ioctx(sys.argv[2])
errors = 0
with rbd.Image(io, sys.argv[3]) as img:
    img.write(b"w" * 4096, 0)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(200):
        try:
            img.write(b"w" * 4096, i * 4096)
        except rbd.ReadOnlyImage:
            errors += 1
print(errors, flush=True)
"""


def test_the_exclusive_lock_is_no_snapshot_window(site: RbdSite) -> None:
    import rbd

    image = name("lock")
    rbd.RBD().create(site.ioctx, image, 4 * MiB, old_format=False)
    w = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(site.ceph.conf), site.pool, image],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert w.stdout is not None and w.stdin is not None
        assert w.stdout.readline().strip() == "ready"
        with rbd.Image(site.ioctx, image) as img:
            img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            assert img.is_exclusive_lock_owner()
            w.stdin.write("go\n")
            w.stdin.flush()
            errors = int(w.stdout.readline())
            img.lock_release()
        assert errors == 200
    finally:
        w.kill()
        w.wait(timeout=60)


# Why not RBD group snapshots (which would make several disks' snapshots one moment by
# themselves): on this Ceph their image snapshots are in the group namespace, and neither
# RBD.clone nor Image(snapshot=) reaches one by name. Run in a child process, so that a
# librbd abort fails this test instead of the worker (librbd aborted once elsewhere in a
# group-snapshot call).
GROUP = """
import sys, rados, rbd
cluster = rados.Rados(conffile=sys.argv[1], name="client.admin"); cluster.connect()
io = cluster.open_ioctx(sys.argv[2]); img, g = sys.argv[3], sys.argv[4]
r = rbd.RBD()
r.create(io, img, 4 << 20, old_format=False)
r.group_create(io, g)
group = rbd.Group(io, g)
group.add_image(io, img)
group.create_snap("gs")
with rbd.Image(io, img, read_only=True) as im:
    (snap,) = list(im.list_snaps())
print(snap["namespace"] == rbd.RBD_SNAP_NAMESPACE_TYPE_GROUP)
for try_ in (
    lambda: r.clone(io, img, snap["name"], io, img + "-c1"),
    lambda: rbd.Image(io, img, snapshot=snap["name"], read_only=True).close(),
    lambda: r.clone(io, img, "gs", io, img + "-c2"),
):
    try:
        try_()
        print("reached")
    except rbd.ImageNotFound:
        print("not found")
"""


def test_a_group_snapshot_cannot_be_cloned_on_this_ceph(site: RbdSite) -> None:
    res = subprocess.run(
        [sys.executable, "-c", GROUP, str(site.ceph.conf), site.pool, name("g"), name("grp")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:4] == ["True", "not found", "not found", "not found"]


def test_record_copies_and_an_export_at_the_snapshot(site: RbdSite, c: Cluster) -> None:
    import os

    _, disk = disk_of_parent(site)
    snapshots.take(c, [disk], "s")
    snapshots.keep_copy(c, disk, "s", '{"snap": 1}')
    assert site.metadata(disk, "reconciler.snapshot.s") == '{"snap": 1}'
    site.write(disk, b"X" * 4096, 4 * MiB)
    with snapshots.export_at(c, disk, "s") as fd:
        assert os.pread(fd, 4, 0) == b"PPPP"
        assert os.pread(fd, 4, 4 * MiB) == b"DDDD"  # the disk as it was
        assert os.fstat(fd).st_size == 8 * MiB
    with pytest.raises(ReconcileError, match="gone"), snapshots.export_at(c, disk, "nope"):
        pass
    # A restore inherits its source disk's metadata: the snapshot copies are removed.
    target = name("rest")
    snapshots.restore(c, disk, "s", target, 8 * MiB, "{}", max_depth=4)
    assert site.metadata(target, "reconciler.snapshot.s") is None
    snapshots.drop_copy(c, disk, "s")
    snapshots.drop_copy(c, disk, "s")  # a missing copy is fine
    assert site.metadata(disk, "reconciler.snapshot.s") is None


# -- the driver's Snapshots (drivers/api.py) --------------------------------------------


def snap_record(pool: str, instance: str, disk_name: str, snap: str) -> DiskRecord:
    vol = f"{instance}_{disk_name}"
    spec = {
        "name": disk_name,
        "backend": "rbd",
        "pool": pool,
        "format": "raw",
        "size": 8 * MiB,
        "source": {"template": "blank"},
    }
    return DiskRecord.model_validate(
        {
            "backend": "rbd",
            "pool": pool,
            "volume": snapshot_name(vol, snap),
            "instance": instance,
            "disk": disk_name,
            "format": "raw",
            "virtual_size": 8 * MiB,
            "spec": spec,
            "source": spec["source"],
            "state": "creating",
            "generation": 1,
            "kind": "snapshot",
            "snapshot": {"name": snap, "disk_generation": 1, "consistency": "crash"},
        }
    )


@pytest.fixture
def test_domains() -> Iterator[Connections]:
    yield Connections()


def driver(site: RbdSite, tmp_path: Path, uri: str, conns: Connections) -> RbdPoolDriver:
    cfg = PoolConfig.model_validate(
        {**site.pool_config(), "uri": uri, "ceph": {**site.pool_config()["ceph"]}}
    )
    store = open_store(tmp_path)
    return RbdPoolDriver("ceph", cfg, conns, store, {}, "host-a")


def test_the_driver_pauses_the_running_domain_across_several_disks(
    site: RbdSite, tmp_path: Path, test_domains: Connections, monkeypatch: pytest.MonkeyPatch
) -> None:
    """take_snapshots on libvirt's test:/// driver, where a running domain's XML names the
    instance's rbd disks: paused while the image snapshots are taken, running after."""
    import libvirt
    import rbd

    inst = str(uuid.uuid4())
    d = driver(site, tmp_path, "test:///default", test_domains)
    try:
        vols = [f"{inst}_root", f"{inst}_data"]
        for v in vols:
            rbd.RBD().create(site.ioctx, v, 8 * MiB, old_format=False)
        disks = "".join(
            f"<disk type='network' device='disk'><source protocol='rbd' name='{site.pool}/{v}'/>"
            f"<target dev='vd{'ab'[i]}' bus='virtio'/></disk>"
            for i, v in enumerate(vols)
        )
        conn = test_domains.get("test:///default")
        dom = conn.defineXML(
            f"<domain type='test'><name>vm-{inst}</name><memory>1024</memory><vcpu>1</vcpu>"
            f"<os><type>hvm</type></os><devices>{disks}</devices></domain>"
        )
        dom.create()
        seen: list[int] = []
        take = snapshots.take

        def spy(c: Cluster, volumes: Sequence[str], snap: str) -> dict[str, int]:
            seen.append(int(dom.state()[0]))
            return take(c, volumes, snap)

        monkeypatch.setattr(snapshots, "take", spy)
        recs = [snap_record("ceph", inst, n, "s") for n in ("root", "data")]
        handles = d.take_snapshots(recs, "crash")
        assert seen == [libvirt.VIR_DOMAIN_PAUSED]
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        assert handles == {r.volume: f"{inst}_{r.disk}@snap-s" for r in recs}
        # One disk alone is one atomic snapshot: no pause.
        seen.clear()
        d.take_snapshots([snap_record("ceph", inst, "root", "t")], "crash")
        assert seen == [libvirt.VIR_DOMAIN_RUNNING]
        dom.destroy()
        dom.undefine()
    finally:
        d.close()


def test_the_driver_keeps_copies_restores_and_refuses_deletes(
    site: RbdSite, tmp_path: Path, libvirt_uri: str
) -> None:
    import rbd

    inst = str(uuid.uuid4())
    d = driver(site, tmp_path, libvirt_uri, Connections())
    try:
        vol = f"{inst}_root"
        rbd.RBD().create(site.ioctx, vol, 8 * MiB, old_format=False)
        site.write(vol, b"S" * 4096, 0)
        rec = snap_record("ceph", inst, "root", "s")
        assert d.take_snapshots([rec], "idle") == {rec.volume: f"{vol}@snap-s"}
        ready = rec.model_copy(update={"state": RecordState.READY})
        d.keep_record_copy(ready)
        site.write(vol, b"N" * 4096, 0)
        with d.snapshot_image(ready) as qi:
            assert qi.format == "raw" and os.pread(qi.fds[0], 4, 0) == b"SSSS"

        other = str(uuid.uuid4())
        target = DiskRecord.model_validate(
            {
                **json.loads(ready.model_dump_json()),
                "kind": "disk",
                "volume": f"{other}_root",
                "instance": other,
                "virtual_size": 16 * MiB,
                "source": {"snapshot": f"{inst}/root@s"},
                "snapshot": None,
            }
        )
        d.restore_snapshot(ready, target)
        assert site.read(f"{other}_root", 4) == b"SSSS" and site.size(f"{other}_root") == 16 * MiB
        assert d.snapshot_dependents(ready) == [f"{other}_root"]
        with pytest.raises(ReconcileError, match=f"{other}_root"):
            d.delete_snapshot(ready)

        copies = d.record_copies()
        snaps = [r for r in copies.records if r.kind is RecordKind.SNAPSHOT]
        assert snaps == [ready]  # the restore's inherited copy was removed
        assert copies.refused == ()

        rbd.RBD().remove(site.ioctx, f"{other}_root")
        d.delete_snapshot(ready)
        d.delete_snapshot(ready)  # again: gone is fine
        assert not snapshots.exists(d.c, vol, "s")
        assert [r for r in d.record_copies().records if r.kind is RecordKind.SNAPSHOT] == []
    finally:
        d.close()
