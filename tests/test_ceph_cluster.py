"""The Ceph test cluster, and the behaviours of Ceph (16.2, Debian's bindings) that the rbd
driver will rely on, pinned against the real cluster: exclusive creates, compare-and-swap,
clone v2, bounded client waits, and libvirt's rbd pool over the same Ceph pool.

See the notes' Ceph sections (../shared/libvirt-and-ceph-notes.md) for where each comes from.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest_ceph import Ceph, unique

pytestmark = pytest.mark.ceph

DEADLINE = 60.0  # seconds; generous: two cores, other test sessions running at once


def omap(ioctx: Any, oid: str, *keys: str) -> dict[str, bytes]:
    import rados

    with rados.ReadOpCtx() as rop:
        it, _ = ioctx.get_omap_vals_by_keys(rop, keys)
        ioctx.operate_read_op(rop, oid)
        return dict(it)


def create_exclusive(ioctx: Any, oid: str, owner: bytes) -> None:
    """Create `oid` with omap owner=OWNER in one compound write, only if it does not exist."""
    import rados

    with rados.WriteOpCtx() as op:
        op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
        ioctx.set_omap(op, ("owner",), (owner,))
        ioctx.operate_write_op(op, oid)


@pytest.fixture
def objects(ceph: Ceph) -> Iterator[list[str]]:
    """Names for RADOS objects of one test (in pool rbd's default namespace); removed after."""
    import rados

    names: list[str] = []
    yield names
    for oid in names:
        with contextlib.suppress(rados.ObjectNotFound):
            ceph.ioctx.remove_object(oid)


@pytest.fixture
def second_client(ceph: Ceph) -> Iterator[Any]:
    """Another client.admin connection: a second reconciler, as far as Ceph can tell."""
    cluster = ceph.connect()
    yield cluster
    cluster.shutdown()


def mon(ceph: Ceph, prefix: str, **args: str) -> Any:
    """A mon command's JSON answer."""
    cmd = {"prefix": prefix, "format": "json", **args}
    ret, out, err = ceph.cluster.mon_command(json.dumps(cmd), b"")
    assert ret == 0, f"{prefix}: {ret} {err}"
    return json.loads(out)


def test_the_cluster_has_one_osd_up_and_pool_rbd(ceph: Ceph) -> None:
    stat = mon(ceph, "osd stat")
    assert (stat["num_osds"], stat["num_up_osds"], stat["num_in_osds"]) == (1, 1, 1)
    assert ceph.cluster.pool_exists("rbd")
    assert mon(ceph, "osd pool get", pool="rbd", var="size")["size"] == 1
    # Clone v2 (clones of unprotected snapshots) needs this.
    assert mon(ceph, "osd dump")["require_min_compat_client"] == "mimic"


def test_exclusive_create_with_omap_has_exactly_one_winner(
    ceph: Ceph, second_client: Any, objects: list[str]
) -> None:
    """Two clients race to create each object with its own owner in one compound write
    (create-exclusive + set_omap): exactly one wins, the other gets ObjectExists, and the
    stored owner is the winner's (the loser's failed op changed nothing)."""
    import rados

    n = 40
    objects.extend(unique(f"race{i}") for i in range(n))
    ioctxs = {b"w1": ceph.cluster.open_ioctx(ceph.pool), b"w2": second_client.open_ioctx(ceph.pool)}
    barrier = threading.Barrier(2, timeout=DEADLINE)
    results: dict[bytes, list[str]] = {w: [] for w in ioctxs}
    errors: list[BaseException] = []

    def racer(me: bytes) -> None:
        try:
            for oid in objects:
                barrier.wait()  # both released together, per object
                try:
                    create_exclusive(ioctxs[me], oid, me)
                    results[me].append("won")
                except rados.ObjectExists:
                    results[me].append("lost")
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=racer, args=(w,)) for w in ioctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    try:
        assert not any(t.is_alive() for t in threads), "a racer did not finish"
        assert not errors, errors
        for i, oid in enumerate(objects):
            outcome = {w: results[w][i] for w in ioctxs}
            assert sorted(outcome.values()) == ["lost", "won"], (oid, outcome)
            winner = next(w for w, r in outcome.items() if r == "won")
            assert omap(ceph.ioctx, oid, "owner") == {"owner": winner}
    finally:
        for io in ioctxs.values():
            io.close()


def test_failed_exclusive_create_is_object_exists_and_changes_nothing(
    ceph: Ceph, objects: list[str]
) -> None:
    import rados

    oid = unique("excl")
    objects.append(oid)
    create_exclusive(ceph.ioctx, oid, b"first")
    with pytest.raises(rados.ObjectExists) as e:
        create_exclusive(ceph.ioctx, oid, b"second")
    assert e.value.errno == errno.EEXIST
    assert isinstance(e.value, rados.OSError)
    assert omap(ceph.ioctx, oid, "owner") == {"owner": b"first"}
    # The idempotent flavour succeeds on an existing object.
    with rados.WriteOpCtx() as op:
        op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
        ceph.ioctx.set_omap(op, ("owner",), (b"third",))
        ceph.ioctx.operate_write_op(op, oid)
    assert omap(ceph.ioctx, oid, "owner") == {"owner": b"third"}


def test_assert_version_is_a_compare_and_swap(ceph: Ceph, objects: list[str]) -> None:
    """A write guarded by assert_version(v) applies only at version v: a stale v raises
    rados.OSError with errno ERANGE (34), a v from the future EOVERFLOW (75), and neither
    changes the object."""
    import rados

    oid = unique("cas")
    objects.append(oid)
    io = ceph.cluster.open_ioctx(ceph.pool)  # get_last_version is per ioctx
    try:

        def guarded_write(version: int, value: bytes) -> None:
            with rados.WriteOpCtx() as op:
                op.assert_version(version)
                io.set_omap(op, ("state",), (value,))
                io.operate_write_op(op, oid)

        create_exclusive(io, oid, b"me")
        io.stat(oid)  # reads don't change the version; they report it
        v1 = io.get_last_version()
        assert v1 > 0
        guarded_write(v1, b"one")
        io.stat(oid)
        v2 = io.get_last_version()
        assert v2 > v1

        with pytest.raises(rados.OSError) as stale:
            guarded_write(v1, b"stale")
        assert stale.value.errno == errno.ERANGE
        assert type(stale.value) is rados.OSError  # no subclass: check errno
        with pytest.raises(rados.OSError) as ahead:
            guarded_write(v2 + 1, b"ahead")
        assert ahead.value.errno == errno.EOVERFLOW

        assert omap(io, oid, "state", "owner") == {"state": b"one", "owner": b"me"}
        io.stat(oid)
        assert io.get_last_version() == v2
        guarded_write(v2, b"two")
        assert omap(io, oid, "state") == {"state": b"two"}
    finally:
        io.close()


@pytest.fixture
def images(ceph: Ceph) -> Iterator[list[str]]:
    """Names for rbd images of one test; removed after (children first: list them last)."""
    import rbd

    names: list[str] = []
    yield names
    for name in reversed(names):
        try:
            with rbd.Image(ceph.ioctx, name) as img:
                for snap in list(img.list_snaps()):
                    img.remove_snap(snap["name"])
        except rbd.ImageNotFound:
            continue
        rbd.RBD().remove(ceph.ioctx, name)


def test_clone_v2_of_an_unprotected_snapshot_reads_the_parent(
    ceph: Ceph, images: list[str]
) -> None:
    """The rbd driver's image cache: one image per source image, a snapshot, and
    copy-on-write clones of it, without protecting the snapshot (clone v2)."""
    import rbd

    base, child = unique("base"), unique("clone")
    images.extend([base, child])
    mib = 1 << 20
    data = b"parent data\n" * 100
    r = rbd.RBD()
    r.create(ceph.ioctx, base, 16 * mib)
    with rbd.Image(ceph.ioctx, base) as img:
        img.write(data, 0)
        img.write(data, 9 * mib)  # in another 4 MiB object
        img.create_snap("s1")
        assert not img.is_protected_snap("s1")

    r.clone(ceph.ioctx, base, "s1", ceph.ioctx, child, features=rbd.RBD_FEATURE_LAYERING)

    with rbd.Image(ceph.ioctx, child) as img:
        assert img.op_features() & rbd.RBD_OPERATION_FEATURE_CLONE_CHILD  # v2
        assert img.parent_info() == (ceph.pool, base, "s1")
        assert img.size() == 16 * mib
        assert img.read(0, len(data)) == data
        assert img.read(9 * mib, len(data)) == data
        img.write(b"child's own", 0)  # copy-on-write: the parent keeps its data
        assert img.read(0, 11) == b"child's own"
    with rbd.Image(ceph.ioctx, base, snapshot="s1", read_only=True) as img:
        assert img.read(0, len(data)) == data
    with rbd.Image(ceph.ioctx, base) as img:
        assert img.op_features() & rbd.RBD_OPERATION_FEATURE_CLONE_PARENT
        assert [c["image"] for c in img.list_children2()] == [child]

    # What cleanup must handle: an image with snapshots is not removed.
    with pytest.raises(rbd.ImageHasSnapshots):
        r.remove(ceph.ioctx, base)


def test_image_metadata_missing_key_is_keyerror(ceph: Ceph, images: list[str]) -> None:
    """Records ride in RBD image metadata; a missing key is the built-in KeyError."""
    import rbd

    name = unique("meta")
    images.append(name)
    rbd.RBD().create(ceph.ioctx, name, 1 << 20)
    with rbd.Image(ceph.ioctx, name) as img:
        img.metadata_set("reconciler.record", '{"generation": 1}')
        assert img.metadata_get("reconciler.record") == '{"generation": 1}'
        with pytest.raises(KeyError):
            img.metadata_get("reconciler.missing")


def test_test_clients_bound_every_wait(ceph: Ceph, second_client: Any) -> None:
    """Without op timeouts a client blocks forever on a stopped OSD (and connect() for 300 s
    on a stopped mon): the conf's [client] section bounds them for every client made from
    it. (Stopping the OSD to watch it would disturb the shared cluster.)"""
    for cluster in (ceph.cluster, second_client):
        for option in ("rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout"):
            value = float(cluster.conf_get(option))
            assert 0 < value <= 120, (option, value)


def test_libvirt_rbd_pool_lists_the_images_of_the_ceph_pool(
    ceph: Ceph, libvirt_uri: str, images: list[str]
) -> None:
    """A libvirt `rbd` pool over pool rbd (the mon by its v1 address, client.admin's key in
    a libvirt secret), as domains will see the disks in production: an image made with
    python-rbd is a volume after a refresh, with its capacity."""
    import libvirt
    import rbd

    conn = libvirt.open(libvirt_uri)
    caps = conn.getStoragePoolCapabilities(0)
    assert "<pool type='rbd' supported='yes'>" in caps, (
        "libvirtd has no rbd storage backend: install libvirt-daemon-driver-storage-rbd "
        "(scripts/setup.sh) before the daemon starts (scripts/libvirtd.sh start restarts it)"
    )
    tag = unique("t-rbd")
    name = unique("vol")
    images.append(name)
    secret = pool = None
    try:
        secret = conn.secretDefineXML(
            "<secret ephemeral='no' private='no'><usage type='ceph'>"
            f"<name>client.admin secret {tag}</name></usage></secret>"
        )
        secret.setValue(base64.b64decode(ceph.admin_key()))
        pool = conn.storagePoolDefineXML(
            f"<pool type='rbd'><name>{tag}</name><source><name>{ceph.pool}</name>"
            f"<host name='127.0.0.1' port='{ceph.mon_v1_port()}'/>"
            "<auth username='admin' type='ceph'>"
            f"<secret uuid='{secret.UUIDString()}'/></auth></source></pool>"
        )
        pool.create(0)
        assert pool.isActive()

        rbd.RBD().create(ceph.ioctx, name, 32 << 20)
        pool.refresh(0)
        assert name in [v.name() for v in pool.listAllVolumes(0)]
        vol = pool.storageVolLookupByName(name)
        _, capacity, _ = vol.info()
        assert capacity == 32 << 20
        assert vol.path() == f"{ceph.pool}/{name}"
        assert "<format type='raw'/>" in vol.XMLDesc(0)
    finally:
        if pool is not None:
            if pool.isActive():
                pool.destroy()
            pool.undefine()
        if secret is not None:
            secret.undefine()
        conn.close()
