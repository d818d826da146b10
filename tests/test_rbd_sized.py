"""Disks bigger than their cache entry are clones of the entry's snapshot of their size
(drivers/rbd/cache.py make_sized): never grown or opened after the clone, each size's
snapshot made once, the entry's head left at its own size; while another host holds the
entry's sizing lock, a clone of `base` grown as before; a snapshot of the wrong size (not
made by the reconciler) is refused and the create leaves nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.drivers.rbd.cache import SNAP, sized_snap, sizing_lock
from reconciler.drivers.rbd.leases import lock_object
from tests.conftest_ceph import Ceph
from tests.rbdsite import RbdSite, rbd_site
from tests.test_rbd import catalog, image_file, rdisk, run

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]

MiB = 1 << 20


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def test_a_disk_is_a_clone_of_the_entrys_snapshot_of_its_size(
    site: RbdSite, tmp_path: Path
) -> None:
    import rbd

    ns = "sized"
    env = site.env(tmp_path / "env", namespace=ns)
    env.host = "host-s"
    raw = image_file(tmp_path / "img.raw")  # 2 MiB
    data = raw.read_bytes()
    env.images = {"raw": catalog(raw, "raw")}
    env.write_config()

    def disk_of(mib: int) -> list[dict[str, object]]:
        return [rdisk("root", size=f"{mib}MiB", image="raw", template=None)]

    sizes = {"a": 8, "b": 8, "c": 16, "d": 2}
    insts = {k: env.manifest(f"vm{k}", disk_of(mib)) for k, mib in sizes.items()}
    rc, out = run(env, "--jobs", "4")
    assert rc == 0, out
    entries = set()
    for k, mib in sizes.items():
        vol = f"{insts[k]}_root"
        parent = site.parent(vol)
        want = SNAP if mib * MiB == len(data) else sized_snap(mib * MiB)
        assert parent is not None and parent[1] == want, (k, parent)
        entries.add(parent[0])
        assert site.size(vol) == mib * MiB
        assert site.read(vol, len(data)) == data
        assert site.read(vol, MiB, mib * MiB - MiB) == (bytes(MiB) if mib > 2 else data[MiB:])
    (entry,) = entries
    with rbd.Image(site.ioctx, entry, read_only=True) as img:
        snaps = {s["name"]: s["size"] for s in img.list_snaps()}
        assert img.size() == len(data)  # the head is the entry's size again
    assert snaps == {SNAP: len(data), sized_snap(8 * MiB): 8 * MiB, sized_snap(16 * MiB): 16 * MiB}
    assert env.plan_json()["actions"] == []

    # Another host holds the entry's sizing lock: a disk of a new size is a clone of base,
    # grown (after SIZE_WAIT), and no snapshot of its size is made.
    cluster = site.ceph.connect()
    io = cluster.open_ioctx(site.pool)
    io.set_namespace(ns)
    lock = lock_object(sizing_lock(entry))
    try:
        io.lock_exclusive(lock, "reconciler", "other/1/boot/1", "another host", 120, 0)
        e = env.manifest("vme", disk_of(32))
        rc, out = run(env)
        assert rc == 0, out
        assert site.parent(f"{e}_root") == (entry, SNAP)
        assert site.size(f"{e}_root") == 32 * MiB
        assert site.read(f"{e}_root", len(data)) == data
        with rbd.Image(site.ioctx, entry, read_only=True) as img:
            assert sized_snap(32 * MiB) not in {s["name"] for s in img.list_snaps()}
    finally:
        io.unlock(lock, "reconciler", "other/1/boot/1")
        io.close()
        cluster.shutdown()

    # A snapshot of a disk's size that holds another size (someone else's) is refused: the
    # disk is not made, and nothing is left.
    with rbd.Image(site.ioctx, entry) as img:
        img.resize(4 * MiB)
        img.create_snap(sized_snap(64 * MiB))
        img.resize(len(data), allow_shrink=True)
    f = env.manifest("vmf", disk_of(64))
    rc, out = run(env)
    assert rc != 0 and "not made by this reconciler" in out, out
    assert f"{f}_root" not in site.images()
    assert env.plan_json()["actions"][0]["action"] == "create"
