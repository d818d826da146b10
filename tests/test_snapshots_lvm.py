"""Snapshots on a real LVM volume group (activation disabled: no device-mapper here): a
copy LV made read-only, restored into a larger LV, deleted, and its record kept as the
LV's tags (records rebuild restores it)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from reconciler.drivers.lvm.copies import decode_copy
from reconciler.model.naming import snapshot_name
from reconciler.model.record import RecordKind, RecordState
from tests.conftest_lvm import VolumeGroup
from tests.env import Env, disk
from tests.test_images import catalog_entry, records

pytestmark = pytest.mark.libvirtd


def lvm(name: str, **kw: Any) -> dict[str, Any]:
    return disk(name, backend="lvm", fmt="raw", pool="vg", **kw)


def test_take_restore_delete_and_rebuild(lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path) -> None:
    env = lvm_env
    img = tmp_path / "img.raw"
    img.write_bytes(b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(65536)))
    env.images = {"img": catalog_entry(img, "raw")}
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    vm = env.manifest(
        "vm", [lvm("d", size="4MiB", image="img", template=None) | {"snapshots": ["s"]}]
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    vol = f"{vm}_d"
    key = snapshot_name(vol, "s")
    taken = env.plan_json()
    assert [(a["action"], a["volume"]) for a in taken["actions"]] == [("snapshot", key)]
    rc, out, err = env.run()
    assert rc == 0, out + err
    before = lvm_vg.segment_bytes(vol, 4 << 20)
    assert lvm_vg.segment_bytes(key, 4 << 20) == before
    (row,) = lvm_vg.report("lvs", "lv_attr", f"{lvm_vg.vg}/{key}")
    assert row["lv_attr"][1] == "r", row  # lvchange --permission r
    rec = {r.volume: r for r in records(env)}[key]
    assert rec.kind is RecordKind.SNAPSHOT and rec.state is RecordState.READY
    assert decode_copy(lvm_vg.lvs()[key]) == rec  # its copy, as the LV's tags

    # The disk moves on; a larger disk restored from the snapshot has its bytes, then zeros.
    lvm_vg.write_lv(vol, 0, b"moved on" * 512)
    rest = env.manifest(
        "rest", [lvm("d", size="8MiB", template=None) | {"source": {"snapshot": f"{vm}/d@s"}}]
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert lvm_vg.segment_bytes(f"{rest}_d", 8 << 20) == before + bytes(4 << 20)

    # The store is lost: rebuild restores the snapshot's record from its tags.
    want = sorted((r.volume, r.kind, r.state) for r in records(env) if r.pool == "vg")
    for p in (env.root / "state").glob("records.sqlite*"):
        p.unlink()
    rc, out, err = env.main(["records", "rebuild", "--yes", "--config", str(env.config_path), "vg"])
    assert rc == 0, out + err
    assert sorted((r.volume, r.kind, r.state) for r in records(env) if r.pool == "vg") == want
    assert env.plan_json()["actions"] == []

    # Dropped from the list: deleted (its extents cleared as the pool's volumeClear says).
    env.manifest("vm", [lvm("d", size="4MiB", image="img", template=None)], instance=vm)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert key not in lvm_vg.lvs() and key not in {r.volume for r in records(env)}
