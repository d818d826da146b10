"""`reconcile export` of rbd disks against the real Ceph test cluster: a clone of a cache
entry (an ext4 template) with guest data over it is exported raw (python-rbd, read-only,
its parent's data read through) and qcow2 (qemu-img from the driver's read-only local
raw export), both reading as the image does, both standalone; a snapshot of such a clone
(h-snaprbd's Snapshots.snapshot_image) is exported as it was taken, after the disk changed;
no image or snapshot is made in Ceph by an export. An unknown @SNAP is refused in one line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Pools
from tests.conftest_ceph import Ceph
from tests.rbdsite import RbdSite, rbd_site
from tests.test_export import export, export_ok, refused, sha
from tests.test_images import catalog_entry
from tests.test_migrate import content
from tests.test_preallocation import qemu_info
from tests.test_rbd_migrate import image_sha, make_env, rdisk, run_ok, write_image_pattern

pytestmark = [pytest.mark.ceph, pytest.mark.libvirtd]


@pytest.fixture
def site(ceph: Ceph, libvirt_uri: str) -> Iterator[RbdSite]:
    with rbd_site(ceph, libvirt_uri) as s:
        yield s


def test_an_rbd_clone_is_exported_flat_as_the_image_reads(
    pools: Pools, site: RbdSite, tmp_path: Path
) -> None:
    env = make_env(pools, tmp_path, ("ceph", site))
    inst = env.manifest("vm", [rdisk("d", size="16MiB", template="ext4", label="x")])
    run_ok(env)
    image = f"{inst}_d"
    assert site.parent(image) is not None  # a clone: its parent's data must come along
    write_image_pattern(site, image)
    want = image_sha(site, image)
    before = sorted(site.images())

    raw, qcow = tmp_path / "d.raw", tmp_path / "d.qcow2"
    doc = export_ok(env, f"{inst}/d", "--format", "raw", "--out", str(raw))
    assert doc["written_by"] == "raw copy" and sha(raw) == want == doc["sha256"]
    assert raw.stat().st_blocks * 512 < 16 << 20  # zero blocks left holes
    doc = export_ok(env, f"{inst}/d", "--format", "qcow2", "--out", str(qcow))
    assert doc["written_by"] == "qemu-img convert"
    assert "backing-filename" not in qemu_info(qcow, "qcow2")
    assert content(qcow, "qcow2", tmp_path) == want
    assert doc["catalog"] == {f"{inst}-d": catalog_entry(qcow, "qcow2")}
    assert sorted(site.images()) == before  # nothing made in Ceph
    assert site.parent(image) is not None

    res = export(env, f"{inst}/d@s1", "--format", "raw", "--out", str(tmp_path / "s.raw"))
    refused(res, "no snapshot s1")


def test_an_rbd_snapshot_is_exported_as_it_was_taken(
    pools: Pools, site: RbdSite, tmp_path: Path
) -> None:
    env = make_env(pools, tmp_path, ("ceph", site))
    d = rdisk("d", size="16MiB", template="ext4", label="s")
    inst = env.manifest("vm", [d])
    run_ok(env)
    image = f"{inst}_d"
    write_image_pattern(site, image)
    want = image_sha(site, image)
    env.manifest("vm", [{**d, "snapshots": ["s1"]}], instance=inst)
    run_ok(env)
    site.write(image, b"after" * 1000, 2 << 20)  # the disk changes, its snapshot must not
    assert image_sha(site, image) != want
    before = sorted(site.images())
    for fmt in ("raw", "qcow2"):
        f = tmp_path / f"s1.{fmt}"
        doc = export_ok(env, f"{inst}/d@s1", "--format", fmt, "--out", str(f))
        assert doc["written_by"] == "qemu-img convert" and doc["sha256"] == sha(f)
        assert content(f, fmt, tmp_path) == want
    assert sorted(site.images()) == before  # nothing made in Ceph
