"""The rbd backend through the real CLI, on a real Ceph cluster and a real libvirtd with an
rbd pool: disks are clones of cache entries in the same Ceph pool, records and cache
entries live in RADOS, hostile images are refused leaving nothing, and a domain's rbd
network disk is never deleted."""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.rbd.cache import SNAP, sized_snap, sizing_lock
from reconciler.drivers.rbd.copies import RECORD_KEY
from reconciler.drivers.rbd.leases import lock_object
from reconciler.drivers.rbd.records import RadosRecordStore
from reconciler.model.record import DiskRecord, RecordKind, RecordState
from tests.conftest_ceph import Ceph
from tests.env import Env, disk
from tests.rbdsite import RbdSite, rbd_site

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]

MiB = 1 << 20


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def rdisk(name: str, **kw: Any) -> dict[str, Any]:
    return disk(name, backend="rbd", fmt="raw", pool="ceph", **kw)


def records(site: RbdSite, namespace: str, host: str) -> list[DiskRecord]:
    """Every record a host keeps and every cache entry record, read straight from RADOS."""
    store = RadosRecordStore(
        lambda: site.ceph.cluster.open_ioctx(site.pool), site.pool, host=host, namespace=namespace
    )
    try:
        good, bad = store.load_all()
        assert not bad, bad
        return good
    finally:
        store.close()


def image_file(path: Path, n: int = 65536) -> Path:
    path.write_bytes(
        b"".join(hashlib.sha256(f"{path.name}{i}".encode()).digest() for i in range(n))
    )
    return path


def catalog(path: Path, fmt: str) -> dict[str, Any]:
    data = path.read_bytes()
    return {
        "location": f"file://{path}",
        "format": fmt,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def run(env: Env, *args: str) -> tuple[int, str]:
    res = env.subprocess(*args)
    return res.returncode, res.stdout + res.stderr


def test_whole_cycle_through_the_cli(site: RbdSite, tmp_path: Path) -> None:
    import subprocess

    ns = "cycle"
    env = site.env(tmp_path / "env", namespace=ns)
    env.host = "host-a"
    env.safety = {"maxDeletePercent": 100}
    raw = image_file(tmp_path / "img.raw")
    qcow = tmp_path / "img.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True
    )
    env.images = {"raw": catalog(raw, "raw"), "q": catalog(qcow, "qcow2")}
    env.write_config()
    disks = [
        rdisk("root", size="16MiB", image="raw", template=None),
        rdisk("other", size="8MiB", image="q", template=None),
        rdisk("swap", size="8MiB", template="swap"),
        rdisk("data", size="8MiB", template="ext4", label="data"),
        rdisk("blank", size="4MiB", template="blank"),
    ]
    inst = env.manifest("vm", disks)
    kept = env.manifest("keeper", [rdisk("d", size="4MiB", template="swap", policy="Retain")])
    rc, out = run(env)
    assert rc == 0, out
    vol = {d["name"]: f"{inst}_{d['name']}" for d in disks}
    have = site.images()
    assert set(vol.values()) <= have
    entries = {n for n in have if n.startswith("_cache_")}
    # One entry per image (raw and qcow2) and per (template, size, label): swap 8M, ext4,
    # swap 4M of the keeper.
    assert len(entries) == 5, entries
    # Each disk but the blank one is a clone (depth 1) of an entry's snapshot: `base`
    # where the disk is the entry's size (a template's), else the entry's snapshot of the
    # disk's size (no grow), whose head stays the entry's size.
    sizes = {"root": 16 * MiB, "other": 8 * MiB, "swap": 8 * MiB, "data": 8 * MiB}
    for name, snap in [
        ("root", sized_snap(16 * MiB)),
        ("other", sized_snap(8 * MiB)),
        ("swap", SNAP),
        ("data", SNAP),
    ]:
        parent = site.parent(vol[name])
        assert parent is not None and parent[0] in entries and parent[1] == snap, (name, parent)
        assert site.parent(parent[0]) is None  # an entry is never a clone
        assert site.size(vol[name]) == sizes[name]
    assert site.parent(vol["blank"]) is None
    data = raw.read_bytes()
    root_entry = site.parent(vol["root"])[0]  # type: ignore[index]
    assert site.size(root_entry) == len(data)
    assert site.read(vol["root"], len(data)) == data
    assert site.read(vol["other"], len(data)) == data  # qcow2 converted to raw
    assert site.read(vol["root"], MiB, 15 * MiB) == bytes(MiB)
    # Records in RADOS: the host's disks and the shared entries, every one ready.
    recs = {r.volume: r for r in records(site, ns, "host-a")}
    assert set(vol.values()) | entries <= set(recs)
    assert all(r.state is RecordState.READY for r in recs.values())
    assert {r.volume for r in recs.values() if r.kind is RecordKind.CACHE} == entries
    assert recs[vol["root"]].backing == site.parent(vol["root"])[0]  # type: ignore[index]
    # The image carries a copy of its record: the back-pointer.
    copy = json.loads(site.metadata(vol["root"], RECORD_KEY) or "{}")
    assert (copy["pool"], copy["volume"], copy["instance"]) == ("ceph", vol["root"], inst)
    # libvirt's rbd pool sees the disks as domains will.
    assert set(vol.values()) <= set(site.refresh_libvirt())

    # Converged: nothing to do.
    assert env.plan_json()["actions"] == []

    # Grow; the data stays.
    disks[0] = rdisk("root", size="32MiB", image="raw", template=None)
    env.manifest("vm", disks, instance=inst)
    rc, out = run(env)
    assert rc == 0, out
    assert site.size(vol["root"]) == 32 * MiB
    assert site.read(vol["root"], len(data)) == data

    # Shrink: a plan error, nothing changes.
    disks[0] = rdisk("root", size="8MiB", image="raw", template=None)
    env.manifest("vm", disks, instance=inst)
    plan = env.plan_json()
    assert "shrink-refused" in {e["code"] for e in plan["errors"]}, plan
    rc, out = run(env)
    assert rc == 1
    assert site.size(vol["root"]) == 32 * MiB

    # cache ls: every entry with its users.
    rc, out = run_cache(env, "ls")
    assert rc == 0, out
    for e in entries:
        assert e in out

    # Tombstones: vm's disks go with their records; the keeper's Retain disk stays, its
    # record released.
    env.manifest("vm", [], instance=inst, deleted=True)
    env.manifest("keeper", [], instance=kept, deleted=True)
    rc, out = run(env)
    assert rc == 0, out
    have = site.images()
    assert not set(vol.values()) & have
    assert f"{kept}_d" in have
    recs = {r.volume: r for r in records(site, ns, "host-a")}
    assert not set(vol.values()) & set(recs)
    assert f"{kept}_d" not in recs

    # gc: the keeper's entry still has a clone (RBD reports it), the others go.
    rc, out = run_cache(env, "gc", "--min-age", "0")
    assert rc == 0, out
    left = {n for n in site.images() if n.startswith("_cache_")}
    keeper_entry = site.parent(f"{kept}_d")
    assert keeper_entry is not None
    assert left == {keeper_entry[0]}, (left, out)
    recs = {r.volume: r for r in records(site, ns, "host-a")}
    assert {v for v in recs if v.startswith("_cache_")} == left
    # An entry removed takes its sized snapshots and their lock object with it.
    import rados

    ioctx = site.ceph.cluster.open_ioctx(site.pool)
    try:
        ioctx.set_namespace(ns)
        with pytest.raises(rados.ObjectNotFound):
            ioctx.stat(lock_object(sizing_lock(root_entry)))
    finally:
        ioctx.close()


def run_cache(env: Env, *args: str) -> tuple[int, str]:
    from tests.env import cli

    res = cli("cache", *args, "--config", str(env.config_path))
    return res.returncode, res.stdout + res.stderr


def test_hostile_images_are_refused_and_leave_nothing(site: RbdSite, tmp_path: Path) -> None:
    """Every hostile image of the file pools' tests is refused for rbd too: no image (not
    even a temporary one), no record, and no byte of the host file it points at in the
    output."""
    from tests.test_images import hostile_refused

    images = tmp_path / "images"
    images.mkdir()
    ns = "hostile"
    env = site.env(tmp_path / "env", namespace=ns)
    env.host = "host-h"
    before = site.images()
    hostile_refused(
        env,
        images,
        tmp_path,
        lambda name: rdisk("d", size="16MiB", image=name, template=None),
        run,
    )
    assert site.images() == before  # nothing made, nothing left
    assert records(site, ns, "host-h") == []


def test_a_guest_written_qcow2_header_changes_nothing(site: RbdSite, tmp_path: Path) -> None:
    """A guest writes a qcow2 header naming a host file as its backing into its raw disk:
    the reconciler reads nothing from the disk, so the plan, a grow and a delete are what
    they would be without it, and libvirt's rbd pool still calls the volume raw."""
    import libvirt

    from tests.test_images import qemu_img

    env = site.env(tmp_path / "env", namespace="guest")
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    inst = env.manifest("vm", [rdisk("d", size="16MiB", template="ext4", label="g")])
    rc, out = run(env)
    assert rc == 0, out
    vol = f"{inst}_d"
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"secret\n" * 1000)
    hdr = tmp_path / "hdr.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(hdr), "1G")
    import rbd

    with rbd.Image(site.ioctx, vol) as img:
        img.write(hdr.read_bytes(), 0)  # what the guest can do to its own disk
    assert env.plan_json()["actions"] == []
    env.manifest("vm", [rdisk("d", size="24MiB", template="ext4", label="g")], instance=inst)
    plan = env.plan_json()
    assert [a["action"] for a in plan["actions"]] == ["resize"], plan
    rc, out = run(env)
    assert rc == 0, out
    assert site.size(vol) == 24 * MiB  # the header's 1 GiB means nothing
    conn = libvirt.open(site.uri)
    try:
        p = conn.storagePoolLookupByName(site.libvirt_pool)
        p.refresh(0)
        xml = p.storageVolLookupByName(vol).XMLDesc(0)
    finally:
        conn.close()
    assert "<format type='raw'/>" in xml and "backingStore" not in xml, xml
    env.manifest("vm", [], instance=inst, deleted=True)
    rc, out = run(env)
    assert rc == 0, out
    assert vol not in site.images()
    assert secret.read_text() not in out


def test_a_domain_using_an_rbd_disk_blocks_its_deletion(site: RbdSite, tmp_path: Path) -> None:
    import libvirt

    env = site.env(tmp_path / "env", namespace="domain")
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    inst = env.manifest("vm", [rdisk("d", size="4MiB", template="blank")])
    rc, out = run(env)
    assert rc == 0, out
    vol = f"{inst}_d"
    conn = libvirt.open(site.uri)
    name = f"guest-{uuid.uuid4().hex[:12]}"  # unique: other files' tests define domains at once
    dom = conn.defineXML(
        f"""<domain type='qemu'><name>{name}</name><memory>65536</memory>
        <os><type arch='x86_64'>hvm</type></os><devices>
        <disk type='network' device='disk'><driver name='qemu' type='raw'/>
        <source protocol='rbd' name='{site.pool}/{vol}'>
          <host name='127.0.0.1' port='{site.ceph.mon_v1_port()}'/></source>
        <auth username='admin'><secret type='ceph' uuid='{site.secret}'/></auth>
        <target dev='vda' bus='virtio'/></disk></devices></domain>"""
    )
    try:
        env.manifest("vm", [], instance=inst, deleted=True)
        plan = env.plan_json()
        assert plan["actions"] == []
        (err,) = plan["errors"]
        assert err["code"] == "volume-in-use" and name in err["message"], err
        assert err["pool"] == "ceph" and err["volume"] == vol
        rc, out = run(env)
        assert rc == 1 and vol in site.images()
    finally:
        dom.undefine()
        conn.close()
    rc, out = run(env)
    assert rc == 0, out
    assert vol not in site.images()


def test_an_rbd_snapshot_in_the_same_cluster_is_cloned_from_directly(
    site: RbdSite, tmp_path: Path
) -> None:
    """rbd://FSID/POOL/IMAGE/SNAP of this cluster: cloned from, no download and no cache
    entry; another cluster's FSID cannot be fetched here and says so; a source that is
    itself a clone is refused (clone depth stays 1), leaving nothing."""
    import uuid

    import rbd

    data = image_file(tmp_path / "g.raw").read_bytes()
    r = rbd.RBD()
    r.create(site.ioctx, "glance-img", len(data), old_format=False)
    with rbd.Image(site.ioctx, "glance-img") as img:
        img.write(data, 0)
        img.create_snap("snap")
    r.clone(site.ioctx, "glance-img", "snap", site.ioctx, "glance-child")
    with rbd.Image(site.ioctx, "glance-child") as img:
        img.create_snap("snap")
    fsid = site.ceph.cluster.get_fsid()
    sha = hashlib.sha256(data).hexdigest()

    def entry(loc: str) -> dict[str, Any]:
        return {"location": loc, "format": "raw", "sha256": sha, "size": len(data)}

    env = site.env(tmp_path / "env", namespace="direct")
    env.images = {
        "here": entry(f"rbd://{fsid}/{site.pool}/glance-img/snap"),
        "elsewhere": entry(f"rbd://{uuid.uuid4()}/{site.pool}/glance-img/snap"),
        "deep": entry(f"rbd://{fsid}/{site.pool}/glance-child/snap"),
    }
    env.write_config()
    inst = env.manifest("vm", [rdisk("root", size="16MiB", image="here", template=None)])
    far = env.manifest("far", [rdisk("root", size="16MiB", image="elsewhere", template=None)])
    deep = env.manifest("deep", [rdisk("root", size="16MiB", image="deep", template=None)])
    # An encrypted disk would be a copy of the snapshot, which is not built: the plan says
    # so (apply refuses it too), and nothing is made for it.
    enc = env.manifest(
        "enc",
        [{**rdisk("root", size="16MiB", image="here", template=None),
          "encryption": {"format": "luks"}}],
    )  # fmt: skip
    plan = env.plan_json()
    (refused,) = [e for e in plan["errors"] if e.get("instance") == enc]
    assert refused["code"] == "encryption-unsupported" and "rbd:// snapshot" in refused["message"]
    assert not [a for a in plan["actions"] if a["instance"] == enc]
    before = site.images()
    rc, out = run(env)
    assert rc == 1, out
    assert site.parent(f"{inst}_root") == ("glance-img", "snap")
    assert site.read(f"{inst}_root", len(data)) == data
    assert site.size(f"{inst}_root") == 16 * MiB
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2, out
    assert any(far in line and "another Ceph cluster" in line for line in failed), failed
    assert any(deep in line and "itself a clone" in line for line in failed), failed
    assert site.images() - before == {f"{inst}_root"}
    assert not [n for n in site.images() if n.startswith(("_cache_", ".reconciler"))]
    recs = {r.volume: r for r in records(site, "direct", socket.gethostname())}
    assert recs[f"{inst}_root"].backing is None  # depends on no cache entry
    assert set(recs) == {f"{inst}_root"}


def test_record_and_image_that_disagree_are_reported_not_deleted(
    site: RbdSite, tmp_path: Path
) -> None:
    import rbd

    env = site.env(tmp_path / "env", namespace="disagree")
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    inst = env.manifest("vm", [rdisk("d", size="4MiB", template="swap")])
    other = env.manifest("other", [rdisk("d", size="4MiB", template="blank")])
    rc, out = run(env)
    assert rc == 0, out
    # The image of vm's disk now carries the record copy of another disk (a copied or
    # renamed image, say).
    copy = site.metadata(f"{other}_d", RECORD_KEY)
    assert copy is not None
    with rbd.Image(site.ioctx, f"{inst}_d") as img:
        img.metadata_set(RECORD_KEY, copy)
    env.manifest("vm", [], instance=inst, deleted=True)
    rc, out = run(env)
    assert rc == 1, out
    assert "record and image disagree" in out and f"{other}_d" in out, out
    assert f"{inst}_d" in site.images()


def test_a_second_store_on_the_same_ceph_pool_is_refused(site: RbdSite, tmp_path: Path) -> None:
    """The pool is claimed by the namespace's store (every host of it passes); a config
    pointing another namespace (another store) at the same Ceph pool changes nothing."""
    first = site.env(tmp_path / "a", namespace="one")
    first.manifest("vm", [rdisk("d", size="4MiB", template="blank")])
    rc, out = run(first)
    assert rc == 0, out
    again = site.env(tmp_path / "b", namespace="one")  # another host, same store
    again.host = "host-two"
    again.write_config()
    again.manifest("vm2", [rdisk("d", size="4MiB", template="blank")])
    rc, out = run(again)
    assert rc == 0, out
    second = site.env(tmp_path / "c", namespace="two")
    second.manifest("vm3", [rdisk("d", size="4MiB", template="blank")])
    plan = second.plan_json()
    assert plan["actions"] == []
    assert [e["code"] for e in plan["errors"]] == ["pool-managed-elsewhere"], plan
    rc, out = run(second)
    assert rc == 1


def test_lost_records_are_rebuilt_from_the_images_metadata(site: RbdSite, tmp_path: Path) -> None:
    """Every object of the records' namespace is lost: the pool's owner names a store that
    no longer exists, so nothing is done; `records rebuild` restores each disk's and entry's
    record from its image's metadata (never its bytes), and the plan is empty again. The
    entry's references are gone with its record, but RBD still reports its clones, so
    `cache gc` keeps it."""
    from tests.env import cli

    env = site.env(tmp_path / "env", namespace="lost")
    raw = image_file(tmp_path / "img.raw")
    env.images = {"img": catalog(raw, "raw")}
    env.write_config()
    inst = env.manifest(
        "vm",
        [
            rdisk("root", size="16MiB", image="img", template=None),
            rdisk("swap", size="8MiB", template="swap"),
        ],
    )
    rc, out = run(env)
    assert rc == 0, out
    before = {r.volume: r for r in records(site, "lost", socket.gethostname())}
    io = site.ceph.cluster.open_ioctx(site.pool)
    io.set_namespace("lost")
    for o in list(io.list_objects()):
        io.remove_object(o.key)
    io.close()
    plan = env.plan_json()
    assert plan["actions"] == []
    assert "pool-managed-elsewhere" in {e["code"] for e in plan["errors"]}, plan
    res = cli("records", "rebuild", "ceph", "--yes", "--config", str(env.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    after = {r.volume: r for r in records(site, "lost", socket.gethostname())}
    assert set(after) == set(before)
    for v, r in before.items():
        assert after[v].model_dump(exclude={"last_used"}) == r.model_dump(exclude={"last_used"})
    assert env.plan_json()["actions"] == []
    rc, out = run_cache(env, "gc", "--min-age", "0")
    assert rc == 0, out
    assert {n for n in site.images() if n.startswith("_cache_")} == {
        v for v in before if v.startswith("_cache_")
    }, out
    assert f"{inst}_root" in site.images()


def test_a_deleted_disk_leaves_no_lock_object(site: RbdSite, tmp_path: Path) -> None:
    from reconciler.drivers.rbd.leases import lock_object

    env = site.env(tmp_path / "env", namespace="lockobj")
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    inst = env.manifest("vm", [rdisk("d", size="4MiB", template="blank")])
    rc, out = run(env)
    assert rc == 0, out
    io = site.ceph.cluster.open_ioctx(site.pool)
    io.set_namespace("lockobj")
    try:
        names = {o.key for o in io.list_objects()}
        assert lock_object(f"{inst}_d") in names  # the lease object of its create
        env.manifest("vm", [], instance=inst, deleted=True)
        rc, out = run(env)
        assert rc == 0, out
        assert lock_object(f"{inst}_d") not in {o.key for o in io.list_objects()}
    finally:
        io.close()
