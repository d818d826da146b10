"""The lvm backend against real LVM2 (a private VG over a loop device) and a real libvirtd.

The kernel has no device-mapper, so the pools run with `activate: false` and the tests
read an LV's bytes from its segments on the PV (tests/conftest_lvm.py, written apart from
the driver's own segment map). The whole cycle: create from an image and from every
template with the image's data, grow, delete (clearing the extents first), tombstone,
Retain, cache gc, the guest-written header, hostile images, and SIGKILL at every step
boundary.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.drivers.lvmpool import BACKPOINTER, OWNER_TAG, decode_copy
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.record import RecordKind, RecordState
from tests.conftest import Pools, make_lvm_env
from tests.conftest_lvm import VolumeGroup
from tests.env import Env, disk
from tests.test_images import catalog_entry, hostile, qemu_img, records

pytestmark = pytest.mark.libvirtd

MiB = 1 << 20


def lvm(name: str, **kw: Any) -> dict[str, Any]:
    return disk(name, backend="lvm", fmt="raw", pool="vg", **kw)


def fillers(env: Env, n: int = 20) -> None:
    """Disks elsewhere, so deleting a few stays under the 10% safety limit."""
    for i in range(n):
        env.manifest(f"keep{i}", [disk("d", size="1MiB")])


def lv(inst: str, name: str) -> str:
    return f"{inst}_{name}"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A raw image of recognisable content (3 MiB, not a whole number of extents)."""
    d = tmp_path / "images"
    d.mkdir()
    raw = d / "good.raw"
    raw.write_bytes(b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(98304)))
    return raw


def lvm_records(env: Env) -> list[Any]:
    return [r for r in records(env) if r.pool == "vg"]


def test_disks_from_an_image_and_every_template(
    lvm_env: Env, lvm_vg: VolumeGroup, image: Path, tmp_path: Path
) -> None:
    env = lvm_env
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(image), str(tmp_path / "good.qcow2"))
    env.images = {
        "img": catalog_entry(image, "raw"),
        "qimg": catalog_entry(tmp_path / "good.qcow2", "qcow2"),
    }
    env.write_config()
    sizes = {"img": 16 * MiB, "qimg": 8 * MiB, "blank": 8 * MiB, "swap": 8 * MiB}
    sizes |= {"ext4": 16 * MiB, "xfs": 320 * MiB, "vfat": 8 * MiB}
    disks = [
        lvm("img", size=sizes["img"], image="img", template=None),
        lvm("qimg", size=sizes["qimg"], image="qimg", template=None),
    ]
    for kind in ("blank", "swap", "ext4", "xfs", "vfat"):
        label = {"ext4": "root", "xfs": "data", "vfat": "CFG"}.get(kind)
        disks.append(lvm(kind, size=sizes[kind], template=kind, label=label))
    # A previous tenant's bytes on the extents a blank disk will get are never shown.
    inst = env.manifest("vm", disks)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert "Apply: 7 done, 0 skipped, 0 failed." in out

    recs = {r.volume: r for r in lvm_records(env)}
    entries = {
        r.spec.get("template") or r.spec["image"]: r.volume
        for r in recs.values()
        if r.kind is RecordKind.CACHE
    }
    assert set(entries) == {"img", "qimg", "swap", "ext4", "xfs", "vfat"}
    lvs = lvm_vg.lvs()
    assert set(lvs) == set(recs)  # every LV has its record, and nothing else is in the VG
    store = env.store()
    store_id = store.identity().id
    store.close()
    for name, size in sizes.items():
        vol = lv(inst, name)
        rec = recs[vol]
        assert (rec.backend, rec.format, rec.state) == (Backend.LVM, DiskFormat.RAW, RecordState.READY)
        assert rec.backing is None  # a copy: it depends on no cache entry once made
        assert lvm_vg.lv_size(vol) >= size
        data = lvm_vg.segment_bytes(vol, size)
        if name in ("img", "qimg"):
            want = image.read_bytes()
        elif name == "blank":
            want = b""
        else:
            want = lvm_vg.segment_bytes(entries[name], size)
            assert want.strip(b"\0"), name  # mkfs wrote something
        assert data == want + bytes(size - len(want)), name
        # Each LV points back at its record, and carries a copy of it.
        assert f"{BACKPOINTER}{store_id}/vg" in lvs[vol]
        copy = decode_copy(lvs[vol])
        assert copy == rec
    # The image's entry holds exactly the image (raw, checked).
    assert lvm_vg.segment_bytes(entries["img"], image.stat().st_size) == image.read_bytes()
    # The VG names the store that manages it.
    (owner,) = [t for t in lvm_vg.vg_tags() if t.startswith(OWNER_TAG)]
    assert store_id in __import__("base64").b64decode(owner[len(OWNER_TAG) :]).decode()
    # Converged: no action, no warning.
    again = env.plan_json("--detailed-exitcode")
    assert again["actions"] == [] and again["errors"] == [] and again["warnings"] == []
