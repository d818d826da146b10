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
import os
import signal
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.drivers.lvm.copies import decode_copy
from reconciler.drivers.lvm.owner import OWNER_TAG
from reconciler.drivers.lvm.volumes import BACKPOINTER
from reconciler.model.record import RecordKind, RecordState
from reconciler.schema.common import Backend, DiskFormat
from tests.conftest import Pools, make_lvm_env
from tests.conftest_lvm import VolumeGroup, spare_vg
from tests.env import Env, disk
from tests.killpoints import at_each_with
from tests.test_busy_pool import wait_for
from tests.test_images import catalog_entry, hostile_refused, qemu_img, records

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
        assert (rec.backend, rec.format, rec.state) == (
            Backend.LVM,
            DiskFormat.RAW,
            RecordState.READY,
        )
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


def test_growing_extends_the_lv_and_keeps_its_data(
    lvm_env: Env, lvm_vg: VolumeGroup, image: Path
) -> None:
    env = lvm_env
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    disks = [lvm("a", size="8MiB", image="img", template=None)]
    inst = env.manifest("vm", disks)
    assert env.run()[0] == 0
    disks.append(lvm("b", size="8MiB"))  # made after a, so a's next extents are b's
    env.manifest("vm", disks, instance=inst)
    assert env.run()[0] == 0
    a = lv(inst, "a")
    assert len(lvm_vg.segments(a)) == 1
    disks[0]["size"] = "24MiB"
    env.manifest("vm", disks, instance=inst)
    p = env.plan_json()
    assert [(x["action"], x["volume"]) for x in p["actions"]] == [("resize", a)]
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert lvm_vg.lv_size(a) == 24 * MiB
    assert len(lvm_vg.segments(a)) == 2  # b follows a: the new extents are elsewhere
    raw = image.read_bytes()
    assert lvm_vg.segment_bytes(a, 8 * MiB) == raw + bytes(8 * MiB - len(raw))
    (rec,) = [r for r in lvm_records(env) if r.volume == a]
    assert (rec.virtual_size, rec.state) == (24 * MiB, RecordState.READY)
    assert decode_copy(lvm_vg.lvs()[a]) == rec
    assert env.plan_json()["actions"] == []


MARKER = b"TENANT-SECRET-" * 64


@pytest.mark.parametrize(
    ("clear", "clear_size", "gone_at"),
    [
        ("zero", 0, {0: True, 5 * MiB: True, 8 * MiB - len(MARKER): True}),
        ("zero", MiB, {0: True, 5 * MiB: False, 8 * MiB - len(MARKER): False}),
        ("none", 0, {0: False, 5 * MiB: False, 8 * MiB - len(MARKER): False}),
    ],
)
def test_delete_clears_the_extents_before_the_next_lv_gets_them(
    pools: Pools,
    tmp_path: Path,
    lvm_vg: VolumeGroup,
    clear: str,
    clear_size: int,
    gone_at: dict[int, bool],
) -> None:
    env = make_lvm_env(pools, tmp_path, lvm_vg)
    env.lvm["vg"] = lvm_vg.section(volumeClear=clear, volumeClearSize=clear_size)
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    inst = env.manifest("old", [lvm("d", size="8MiB")])
    assert env.run()[0] == 0
    old = lv(inst, "d")
    (seg,) = lvm_vg.segments(old)
    for off in gone_at:
        lvm_vg.write_lv(old, off, MARKER)
    assert lvm_vg.segment_bytes(old).count(MARKER) == len(gone_at)

    env.manifest("old", [], instance=inst, deleted=True)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert old not in lvm_vg.lvs()
    with open(lvm_vg.pv, "rb", buffering=0) as f:
        for off, gone in gone_at.items():
            f.seek(seg[0] + off)
            assert (f.read(len(MARKER)) != MARKER) is gone, (clear, clear_size, off)

    # The next tenant's disk gets the same extents and reads none of it.
    new_inst = env.manifest("new", [lvm("d", size="8MiB")])
    assert env.run()[0] == 0
    new = lv(new_inst, "d")
    assert lvm_vg.segments(new) == [seg]
    assert MARKER[:14] not in lvm_vg.segment_bytes(new)


def test_delete_tombstone_and_retain(lvm_env: Env, lvm_vg: VolumeGroup) -> None:
    env = lvm_env
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    keep = [lvm("disk", size="8MiB", template="vfat"), lvm("data", size="8MiB", policy="Retain")]
    inst = env.manifest("old", [lvm("gone", size="8MiB"), *keep])
    assert env.run()[0] == 0
    env.manifest("old", keep, instance=inst)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert lv(inst, "gone") not in lvm_vg.lvs()
    assert lv(inst, "disk") in lvm_vg.lvs()

    env.manifest("old", [], instance=inst, deleted=True)
    p = env.plan_json()
    kinds = {a["disk"]: (a["action"], a["destructive"]) for a in p["actions"]}
    assert kinds == {"disk": ("delete", True), "data": ("release", False)}
    rc, out, err = env.run()
    assert rc == 0, out + err
    lvs = lvm_vg.lvs()
    assert lv(inst, "disk") not in lvs
    assert lv(inst, "data") in lvs  # kept, no longer managed
    assert [r for r in lvm_records(env) if r.instance == inst] == []
    assert env.plan_json()["actions"] == []


def test_a_disk_a_domain_uses_is_not_deleted(
    lvm_env: Env, lvm_vg: VolumeGroup, libvirt_uri: str
) -> None:
    env = lvm_env
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    inst = env.manifest("vm", [lvm("d", size="8MiB"), lvm("e", size="8MiB")])
    assert env.run()[0] == 0
    conn = libvirt.open(libvirt_uri)
    # One domain names the LV by path, one by libvirt pool and volume.
    for n, source in (
        ("bypath", f"<disk type='block'><source dev='/dev/{lvm_vg.vg}/{lv(inst, 'd')}'/>"),
        (
            "bypool",
            f"<disk type='volume'><source pool='{env.pools['vg'][0]}' volume='{lv(inst, 'e')}'/>",
        ),
    ):
        conn.defineXML(
            f"<domain type='qemu'><name>t-{lvm_vg.vg}-{n}</name><memory>65536</memory>"
            "<os><type arch='x86_64'>hvm</type></os><devices>"
            f"{source}<target dev='vda' bus='virtio'/></disk></devices></domain>"
        )
    try:
        env.manifest("vm", [], instance=inst, deleted=True)
        rc, out, _ = env.run()
        assert rc == 1, out
        assert "used by domain(s)" in out
        assert {lv(inst, "d"), lv(inst, "e")} <= set(lvm_vg.lvs())
    finally:
        for n in ("bypath", "bypool"):
            conn.lookupByName(f"t-{lvm_vg.vg}-{n}").undefine()
        conn.close()
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert not {lv(inst, "d"), lv(inst, "e")} & set(lvm_vg.lvs())


def test_cache_gc_spares_the_entry_a_disk_is_being_made_from(
    lvm_env: Env, lvm_vg: VolumeGroup, image: Path, tmp_path: Path
) -> None:
    env = lvm_env
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    env.manifest("vm", [lvm("root", size="16MiB", image="img", template=None)])
    assert env.run()[0] == 0
    env.manifest("vm2", [lvm("root", size="16MiB", image="img", template=None)])
    steps = env.traced_steps()
    assert steps[:4] == ["record.creating", "volume.created", "volume.filled", "record.ready"]
    inst = env.manifest("vm3", [lvm("root", size="16MiB", image="img", template=None)])
    killed = env.subprocess(env={"RECONCILER_CRASH_AT": str(steps.index("volume.created") + 1)})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    (disk_rec,) = [r for r in records(env) if r.instance == inst]
    assert disk_rec.state is RecordState.CREATING and disk_rec.backing is not None
    rc, out, _ = env.main(["cache", "gc", "--config", str(env.config_path)])
    assert rc == 0 and "0 removed, 1 kept" in out and "used by 1 disk(s)" in out, out
    (entry,) = [r.volume for r in records(env) if r.kind is RecordKind.CACHE]
    assert entry in lvm_vg.lvs()

    rc, out, err = env.run()
    assert rc == 0, out + err
    raw = image.read_bytes()
    assert lvm_vg.segment_bytes(lv(inst, "root"), len(raw)) == raw
    rc, out, _ = env.main(["cache", "gc", "--config", str(env.config_path)])
    assert rc == 0 and "1 removed, 0 kept" in out, out
    assert entry not in lvm_vg.lvs()
    assert [r for r in records(env) if r.kind is RecordKind.CACHE] == []
    assert lvm_vg.segment_bytes(lv(inst, "root"), len(raw)) == raw  # a copy: still whole


def test_guest_written_qcow2_header_is_never_followed(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path
) -> None:
    env = lvm_env
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host secret\n" * 100)
    inst = env.manifest("vm", [lvm("guest", size="8MiB")])
    assert env.run()[0] == 0
    img = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(img), "1G")
    guest = lv(inst, "guest")
    lvm_vg.write_lv(guest, 0, img.read_bytes()[:65536])
    recs_before = {r.volume: r for r in records(env)}

    p = env.plan_json()
    assert p["actions"] == [] and p["errors"] == []
    assert [(w["code"], w["volume"]) for w in p["warnings"]] == [("format-mismatch", guest)]
    assert str(secret) not in json.dumps(p)
    assert {r.volume: r for r in records(env)} == recs_before

    # Growing goes by the record (raw: lvextend alone), as does deleting.
    env.manifest("vm", [lvm("guest", size="16MiB")], instance=inst)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert lvm_vg.lv_size(guest) == 16 * MiB
    assert lvm_vg.segment_bytes(guest, 4)[:4] == b"QFI\xfb"  # the guest's bytes, untouched
    (rec,) = [r for r in records(env) if r.volume == guest]
    assert (rec.format, rec.virtual_size) == (DiskFormat.RAW, 16 * MiB)
    before = secret.stat()
    env.manifest("vm", [], instance=inst, deleted=True)
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert guest not in lvm_vg.lvs()
    after = secret.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert str(secret) not in out + err


def test_hostile_images_are_refused_and_leave_nothing(
    lvm_env: Env, lvm_vg: VolumeGroup, image: Path, tmp_path: Path
) -> None:
    env = lvm_env
    hostile_refused(env, image.parent, tmp_path, lambda name: lvm("d", size="16MiB", image=name))
    assert lvm_vg.lvs() == {}
    assert records(env) == []
    tmp = env.root / "state" / "lvm-tmp" / "vg"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_names_lvm_refuses_fail_before_anything_is_made(
    lvm_env: Env, lvm_vg: VolumeGroup, image: Path
) -> None:
    env = lvm_env
    # A disk name LVM would refuse is a manifest error: planned as such, never applied.
    env.manifest("vm", [lvm("rimage", size="8MiB"), lvm("y" * 91, size="8MiB")])
    rc, out, err = env.run("--dry-run")
    assert rc == 1, out + err
    assert "which LVM reserves" in out + err, out + err
    env.manifest("vm", [lvm("y" * 91, size="8MiB")])
    rc, out, err = env.run("--dry-run")
    assert rc == 1 and "an LVM LV name is at most 127" in out + err, out + err
    env.manifest("vm", [lvm("y" * 90, size="8MiB")])  # 36 + 1 + 90 = 127: fine
    assert env.run("--dry-run")[0] == 0
    # A cache entry's name is the driver's: one LVM would refuse fails before any LV.
    long_id = "i" * 100
    env.images = {long_id: catalog_entry(image, "raw")}
    env.write_config()
    inst = env.manifest("vm", [lvm("d", size="8MiB", image=long_id, template=None)])
    rc, out, _ = env.run()
    assert rc == 1, out
    assert "an LVM LV name is at most 127" in out, out
    assert lvm_vg.lvs() == {}
    assert [r for r in records(env) if r.instance == inst] == []
    assert [r for r in records(env) if r.kind is RecordKind.CACHE] == []


def test_record_copies_rebuild_a_lost_store(lvm_env: Env, lvm_vg: VolumeGroup, image: Path) -> None:
    env = lvm_env
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    env.manifest("vm", [lvm("a", size="8MiB", image="img", template=None), lvm("b", size="8MiB")])
    assert env.run()[0] == 0
    before = sorted((r.volume, r.state, r.virtual_size) for r in lvm_records(env))
    # The records database is lost: the VG's owner tag refuses the new, empty store.
    for p in (env.root / "state").glob("records.sqlite*"):
        p.unlink()
    rc, out, err = env.run()
    assert rc == 1 and "records database was lost or replaced" in out + err, out + err
    rc, out, err = env.main(["records", "rebuild", "--yes", "--config", str(env.config_path), "vg"])
    assert rc == 0, out + err
    assert sorted((r.volume, r.state, r.virtual_size) for r in lvm_records(env)) == before
    assert env.plan_json()["actions"] == []


# -- SIGKILL at every step boundary ---------------------------------------------------


def crash_env(pools: Pools, root: Path, vg: VolumeGroup, image: Path) -> tuple[Env, dict[str, str]]:
    env = make_lvm_env(pools, root, vg)
    env.images = {"img": catalog_entry(image, "raw")}
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    env.manifest("doomed", [lvm("d", size="4MiB", template="vfat", label="DOOMED")])
    env.manifest("stable", [lvm("d", size="8MiB", template="ext4", label="stable")])
    rc, out, err = env.run()
    assert rc == 0, out + err
    ids = {p.stem: json.loads(p.read_text())["instance"] for p in env.manifests.glob("*.yaml")}
    return env, ids


def crash_after(env: Env, ids: dict[str, str]) -> None:
    env.manifest("doomed", [], instance=ids["doomed"], deleted=True)
    env.manifest(
        "stable", [lvm("d", size="12MiB", template="ext4", label="stable")], instance=ids["stable"]
    )
    env.manifest(
        "fresh",
        [
            lvm("a", size="16MiB", image="img", template=None),
            lvm("b", size="8MiB", template="swap"),
            lvm("c", size="8MiB"),
        ],
    )


def check_consistent(env: Env, vg: VolumeGroup) -> None:
    store = env.store()
    recs, bad = store.load_all()
    store.close()
    assert not bad
    assert all(r.state is RecordState.READY for r in recs), [
        (r.volume, r.state) for r in recs if r.state is not RecordState.READY
    ]
    assert set(vg.lvs()) == {r.volume for r in recs if r.pool == "vg"}
    tmp = env.root / "state" / "lvm-tmp" / "vg"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_kill_at_every_step_boundary_then_converge(
    pools: Pools, tmp_path: Path, lvm_vg: VolumeGroup, image: Path
) -> None:
    env, ids = crash_env(pools, tmp_path / "trace", lvm_vg, image)
    crash_after(env, ids)
    steps = env.traced_steps("--jobs", "1")
    names = set(steps)
    assert {"cache.volume.filled", "volume.filled", "volume.resized", "volume.cleared"} <= names
    check_consistent(env, lvm_vg)
    raw = image.read_bytes()

    def kill_at(k: int, vg: VolumeGroup) -> None:
        env, ids = crash_env(pools, tmp_path / f"k{k}", vg, image)
        stable = lv(ids["stable"], "d")
        stable_bytes = vg.segment_bytes(stable, 8 * MiB)
        crash_after(env, ids)
        killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": str(k)})
        assert killed.returncode == -signal.SIGKILL, (
            f"kill point {k}:\n{killed.stdout}\n{killed.stderr}"
        )
        rc, out, err = env.run()
        assert rc == 0, f"kill point {k} ({steps[k - 1]}): {out}{err}"
        assert env.plan_json()["actions"] == [], f"kill point {k} did not converge"
        check_consistent(env, vg)
        assert lv(ids["doomed"], "d") not in vg.lvs()
        assert vg.segment_bytes(stable, 8 * MiB) == stable_bytes, k
        assert vg.lv_size(stable) == 12 * MiB
        fresh = json.loads((env.manifests / "fresh.yaml").read_text())["instance"]
        assert vg.segment_bytes(lv(fresh, "a"), 16 * MiB) == raw + bytes(16 * MiB - len(raw))
        assert vg.segment_bytes(lv(fresh, "c")) == bytes(vg.lv_size(lv(fresh, "c")))

    # Two kill points at a time, each on a VG no other point uses while it runs.
    with spare_vg(lvm_vg, "k") as vg2:
        at_each_with(range(1, len(steps) + 1), [lvm_vg, vg2], kill_at)


def test_a_missing_vg_or_a_wrong_libvirt_pool_is_a_plan_error(
    lvm_env: Env, lvm_vg: VolumeGroup, pools: Pools, tmp_path: Path
) -> None:
    env = lvm_env
    env.manifest("vm", [lvm("d", size="8MiB")])
    env.lvm["vg"] = lvm_vg.section(vg="rclnosuchvg")
    env.pools["vg"] = (pools.define_logical("rclnosuchvg"), Path("/dev/rclnosuchvg"))
    env.write_config()
    p = env.plan_json()
    assert p["actions"] == []
    (err,) = p["errors"]
    assert err["code"] == "pool-unreachable"
    assert "VG rclnosuchvg" in err["message"] and "not found" in err["message"], err
    # A libvirt pool of another kind (or over another VG) is refused by name.
    dir_pool = pools.make(tmp_path / "other")
    env.lvm["vg"] = lvm_vg.section()
    env.pools["vg"] = (dir_pool.name, dir_pool.path)
    env.write_config()
    (err,) = env.plan_json()["errors"]
    assert "needs a logical pool over VG " + lvm_vg.vg in err["message"], err
    assert lvm_vg.lvs() == {} and lvm_vg.vg_tags() == []


def test_a_cache_entry_removed_behind_its_back_is_made_again(
    lvm_env: Env, lvm_vg: VolumeGroup, image: Path
) -> None:
    env = lvm_env
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    env.manifest("vm", [lvm("root", size="8MiB", image="img", template=None)])
    assert env.run()[0] == 0
    (entry,) = [r.volume for r in records(env) if r.kind is RecordKind.CACHE]
    lvm_vg.lvm("lvremove", "-y", f"{lvm_vg.vg}/{entry}")  # an operator's mistake
    inst = env.manifest("vm2", [lvm("root", size="8MiB", image="img", template=None)])
    rc, out, err = env.run()
    assert rc == 0, out + err
    raw = image.read_bytes()
    assert lvm_vg.segment_bytes(entry, len(raw)) == raw
    assert lvm_vg.segment_bytes(lv(inst, "root"), len(raw)) == raw
    assert set(lvm_vg.lvs()) == {r.volume for r in lvm_records(env)}


def test_two_processes_make_every_disk_once(lvm_env: Env, lvm_vg: VolumeGroup, image: Path) -> None:
    env = lvm_env
    env.images = {"img": catalog_entry(image, "raw")}
    env.write_config()
    for i in range(8):
        env.manifest(
            f"vm{i}",
            [
                lvm("root", size="8MiB", image="img", template=None),
                lvm("swap", size="4MiB", template="swap"),
            ],
        )
    procs = [env.start() for _ in range(2)]
    results = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    for out, err, rc in results:
        assert rc == 0, out + err
        assert "FAILED" not in out, out
    created = [
        line.split()[1]
        for out, _, _ in results
        for line in out.splitlines()
        if line.startswith("created ")
    ]
    assert len(created) == 16 and len(set(created)) == 16, created
    recs = lvm_records(env)
    # generation 2 = written once as `creating`, once as `ready`: nothing made twice.
    assert {(r.state, r.generation) for r in recs if r.kind is RecordKind.DISK} == {
        (RecordState.READY, 2)
    }
    assert len([r for r in recs if r.kind is RecordKind.CACHE]) == 2
    assert set(lvm_vg.lvs()) == {r.volume for r in recs}
    raw = image.read_bytes()
    for r in recs:
        if r.disk == "root":
            assert lvm_vg.segment_bytes(r.volume, len(raw)) == raw


def test_lv_appearing_after_the_plan_is_left_untouched(lvm_env: Env, lvm_vg: VolumeGroup) -> None:
    """A new disk's LV is not looked up under its lock before `lvcreate` (which refuses a
    taken name itself, changing nothing: steps/context.py volume_exists): an LV of that
    name made by someone else after the plan fails the create, keeps its bytes and tags,
    and leaves no record behind."""
    env = lvm_env
    inst = env.manifest("vm", [lvm("blank", size=4 * MiB, template="blank")])
    vol = lv(inst, "blank")
    flag = env.root / "paused"
    # Boundary 1: the disk's `creating` record is written; nothing is made yet.
    p = env.start("--jobs", "1", env={**os.environ, "RECONCILER_PAUSE_AT": f"1:{flag}"})
    try:
        wait_for("the run to pause", flag.exists, p)
        lvm_vg.lvm(
            "lvcreate", "-an", "-Zn", "-Wn", "-L", "4m", "-n", vol, "--addtag", "theirs", lvm_vg.vg
        )
        lvm_vg.write_lv(vol, 0, b"theirs")
        flag.unlink()
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, out + err
    assert "Traceback" not in out + err
    assert f"volume {vol} appeared in pool vg from elsewhere" in out, out
    assert lvm_vg.lvs()[vol] == ["theirs"]
    assert lvm_vg.segment_bytes(vol, 6) == b"theirs"
    assert [r for r in lvm_records(env) if r.volume == vol] == []
