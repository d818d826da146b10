"""The pool's image names kept between runs (drivers/rbd/listing.py), on the real test
cluster: kept names are used only while `rbd_directory` and `rbd_trash` have the versions
they were listed at, so every change another client makes to the pool's images (create,
remove, rename, a move to the trash) is listed again, and a file that is not this host's
own, damaged, or another pool's is never used."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.rbd.cluster import Cluster
from reconciler.drivers.rbd.listing import KeptListing, path_for, versions
from reconciler.schema.config import CephConfig
from tests.conftest_ceph import Ceph, unique
from tests.rbdsite import mon

pytestmark = [pytest.mark.ceph]

MiB = 1 << 20


@pytest.fixture(scope="module")
def pool(ceph: Ceph) -> Iterator[tuple[str, Any]]:
    import rbd

    name = unique("lst")
    mon(ceph, "osd pool create", pool=name, pg_num=8, pgp_num=8)
    io = ceph.cluster.open_ioctx(name)
    rbd.RBD().pool_init(io, False)
    try:
        yield name, io
    finally:
        io.close()
        mon(ceph, "osd pool delete", pool=name, pool2=name, yes_i_really_really_mean_it=True)


@pytest.fixture
def cluster(ceph: Ceph, pool: tuple[str, Any], tmp_path: Path) -> Iterator[Cluster]:
    cfg = CephConfig.model_validate({"conf": str(ceph.conf), "pool": pool[0]})
    c = Cluster(
        "ceph",
        cfg,
        "host-a",
        offline=False,
        heartbeat_expiry=300.0,
        listing=path_for(tmp_path, "ceph"),
    )
    try:
        yield c
    finally:
        c.close()


class Counted:
    """A listing callable that counts its calls."""

    def __init__(self, io: Any) -> None:
        self.io = io
        self.calls = 0

    def __call__(self) -> frozenset[str]:
        import rbd

        self.calls += 1
        return frozenset(rbd.RBD().list(self.io))


def kept(path: Path, io: Any, key: dict[str, Any] | None = None) -> tuple[frozenset[str], int]:
    """(the names, how many listings it took) through a KeptListing at `path`."""
    import rados

    listing = Counted(io)
    names = KeptListing(path).names(key or {"k": 1}, lambda: versions(rados, io), listing)
    return names, listing.calls


def test_names_are_kept_until_another_client_changes_the_images(
    pool: tuple[str, Any], tmp_path: Path
) -> None:
    import rbd

    _, io = pool
    path = tmp_path / "kept.json"
    r = rbd.RBD()
    a, b = unique("a"), unique("b")
    r.create(io, a, MiB)
    names, calls = kept(path, io)
    assert a in names and calls == 1
    assert (os.stat(path).st_mode & 0o777) == 0o600
    assert kept(path, io) == (names, 0)  # nothing changed: not listed again

    r.create(io, b, MiB)  # another client's create
    names, calls = kept(path, io)
    assert {a, b} <= names and calls == 1
    assert kept(path, io) == (names, 0)

    r.rename(io, b, b + "-renamed")
    names, calls = kept(path, io)
    assert b not in names and b + "-renamed" in names and calls == 1

    r.remove(io, b + "-renamed")
    names, calls = kept(path, io)
    assert b + "-renamed" not in names and calls == 1

    r.trash_move(io, a, 0)  # rbd trash mv: gone from the listing
    names, calls = kept(path, io)
    assert a not in names and calls == 1
    assert kept(path, io) == (names, 0)


def test_a_change_while_listing_is_not_kept(pool: tuple[str, Any], tmp_path: Path) -> None:
    import rados
    import rbd

    _, io = pool
    path = tmp_path / "kept.json"
    late = unique("late")

    def racing() -> frozenset[str]:
        names = frozenset(rbd.RBD().list(io))
        rbd.RBD().create(io, late, MiB)  # made after the listing, before the second stat
        return names

    names = KeptListing(path).names({"k": 1}, lambda: versions(rados, io), racing)
    assert late not in names
    assert not path.exists()
    names, calls = kept(path, io)
    assert late in names and calls == 1


def test_another_key_a_damaged_or_foreign_file_is_listed_again(
    pool: tuple[str, Any], tmp_path: Path
) -> None:
    _, io = pool
    path = tmp_path / "kept.json"
    names, _ = kept(path, io, {"pool": "p", "id": 1})
    assert kept(path, io, {"pool": "p", "id": 1}) == (names, 0)
    assert kept(path, io, {"pool": "p", "id": 2})[1] == 1  # a pool made again, same name

    doc = json.loads(path.read_text())
    doc["names"] = ["forged"]
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o620)  # another may write it: never trusted
    names, calls = kept(path, io, {"pool": "p", "id": 2})
    assert "forged" not in names and calls == 1
    assert (os.stat(path).st_mode & 0o777) == 0o600  # made anew, not the one others wrote

    os.chmod(path, 0o644)  # readable by others: tightened, as the state directory's files
    assert kept(path, io, {"pool": "p", "id": 2}) == (names, 0)
    assert (os.stat(path).st_mode & 0o777) == 0o600

    path.write_text('{"format": 1, "key": ')  # torn by a crash
    os.chmod(path, 0o600)
    names, calls = kept(path, io, {"pool": "p", "id": 2})
    assert "forged" not in names and calls == 1
    assert kept(path, io, {"pool": "p", "id": 2}) == (names, 0)


def test_the_driver_lists_through_its_kept_names(
    cluster: Cluster, pool: tuple[str, Any], tmp_path: Path
) -> None:
    import rbd

    _, io = pool
    img = unique("img")
    rbd.RBD().create(io, img, MiB)
    first = cluster.list_volumes()
    assert img in first
    path = path_for(tmp_path, "ceph")
    doc = json.loads(path.read_text())
    assert doc["key"]["fsid"] == cluster.client().fsid and doc["names"] == sorted(first)
    assert cluster.list_volumes() == first
    rbd.RBD().remove(io, img)
    assert img not in cluster.list_volumes()
