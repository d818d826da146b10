"""A catalog image that is an RBD snapshot in another Ceph cluster (rbd://FSID/...): fetched
through a client of that cluster (the catalog's cephConf) and checked like any image, then
cached in the pool's own cluster; never cloned across clusters."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest_ceph import Ceph, private_cluster
from tests.env import disk
from tests.rbdsite import RbdSite, rbd_site

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]

MiB = 1 << 20


@pytest.fixture(scope="module")
def other() -> Iterator[Ceph]:
    """A second one-node cluster: another fsid, another mon, its own pool `rbd`."""
    with private_cluster("far") as c:
        yield c


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def test_a_snapshot_in_another_cluster_is_fetched_checked_and_cached(
    site: RbdSite, other: Ceph, tmp_path: Path
) -> None:
    import rbd

    data = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(65536))  # 2 MiB
    r = rbd.RBD()
    name = f"far-{tmp_path.name[-8:]}"
    r.create(other.ioctx, name, len(data), old_format=False)
    with rbd.Image(other.ioctx, name) as img:
        img.write(data, 0)
        img.create_snap("snap")
    fsid = other.cluster.get_fsid()
    assert fsid != site.ceph.cluster.get_fsid()
    loc = f"rbd://{fsid}/{other.pool}/{name}/snap"
    sha = hashlib.sha256(data).hexdigest()

    def entry(**kw: Any) -> dict[str, Any]:
        return {"location": loc, "format": "raw", "sha256": sha, "size": len(data), **kw}

    env = site.env(tmp_path / "env", namespace="remote")
    env.images = {
        "far": entry(cephConf=str(other.conf)),
        "tampered": entry(cephConf=str(other.conf), sha256="0" * 64),
        "noconf": entry(),
    }
    env.write_config()
    ok = env.manifest("ok", [disk("root", backend="rbd", pool="ceph", image="far", size="8MiB")])
    bad = env.manifest("bad", [disk("root", backend="rbd", pool="ceph", image="tampered")])
    nc = env.manifest("nc", [disk("root", backend="rbd", pool="ceph", image="noconf")])
    before = site.images()
    far_before = set(r.list(other.ioctx))
    res = env.subprocess()
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    # Fetched into a cache entry of this cluster, the disk a clone of it: same bytes.
    parent = site.parent(f"{ok}_root")
    assert parent is not None and parent[0].startswith("_cache_image-"), parent
    assert site.read(f"{ok}_root", len(data)) == data
    assert site.size(f"{ok}_root") == 8 * MiB
    # A snapshot whose bytes do not match the catalog is refused, leaving nothing; one with
    # no client for its cluster says what to configure.
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert any(bad in line and "sha256 mismatch" in line for line in failed), out
    assert any(nc in line and "cephConf" in line for line in failed), out
    made = site.images() - before
    assert made == {f"{ok}_root", parent[0]}
    assert not [n for n in site.images() if n.startswith(".reconciler")]
    # Nothing was written in the other cluster.
    assert set(r.list(other.ioctx)) == far_before
    with rbd.Image(other.ioctx, name, read_only=True) as img:
        assert [s["name"] for s in img.list_snaps()] == ["snap"]
