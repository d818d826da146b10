"""Migrating disks into, out of and between LVM pools, and adopting an existing LV, against
real LVM2 (private VGs over loop devices, activation off: no device-mapper here) and a real
libvirtd with real qemu-img. An LV's bytes are read back through the tests' own segment
reader (tests/conftest_lvm.py), never through the driver's.

Asserted: the data is the same after file -> lvm (flat raw, qcow2, a qcow2 overlay
flattened) and lvm -> file (raw, qcow2); lvm -> lvm (another VG) stays raw; a copy that
would not fit in the VG is refused in the plan (an LV takes its whole size whatever the
file's data); SIGKILL at every step boundary of file -> lvm and lvm -> file migrations
leaves one record naming where the data is, and the next run converges; `reconcile adopt`
of an existing LV records it raw (a qcow2 header in it only warns).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.control.session import Session
from reconciler.drivers.api import overlays_of
from reconciler.drivers.lvm.volumes import BACKPOINTER, LV_TEMP_PREFIX
from reconciler.model.errors import ReconcileError
from reconciler.model.record import DiskRecord, MigrationPhase, RecordKind, RecordState
from reconciler.schema.common import Backend, DiskFormat
from reconciler.schema.load import load_config
from tests.conftest import Pools, make_lvm_env
from tests.conftest_lvm import VolumeGroup, spare_vg
from tests.env import Env, disk
from tests.killpoints import at_each_with
from tests.test_encryption import encrypted
from tests.test_encryption_migrate import KeySpy, decrypted
from tests.test_migrate import apply_ok, content, migrate_once, record, write_pattern

pytestmark = pytest.mark.libvirtd

MiB = 1 << 20
SIZE = 16 * MiB
PATTERN = (0, 1 * MiB, 5 * MiB, 8 * MiB - 65536)  # where write_pattern writes (64 KiB each)


def lvm(name: str, pool: str = "vg", **kw: Any) -> dict[str, Any]:
    return disk(name, backend="lvm", fmt="raw", pool=pool, **kw)


def write_lv_pattern(vg: VolumeGroup, lv: str) -> None:
    """write_pattern's guest data, written into an LV through its segments."""
    for i, off in enumerate(PATTERN):
        vg.write_lv(lv, off, bytes([0x11 + i]) * 65536)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def records(env: Env) -> list[DiskRecord]:
    store = env.store()
    recs, bad = store.load_all()
    store.close()
    assert not bad
    return recs


def local_files(env: Env) -> set[str]:
    return {p.name for p in env.pool_dir("local").iterdir() if p.name != ".reconciler"}


# -- file -> lvm, lvm -> file ---------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        disk("d", size="16MiB"),
        disk("d", backend="qcow2", fmt="qcow2", size="16MiB"),
        disk("d", backend="qcow2", fmt="qcow2", size="16MiB", template="ext4", label="r"),
    ],
    ids=["flat-raw", "qcow2", "qcow2-overlay"],
)
def test_file_to_lvm_keeps_the_data(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path, first: dict[str, Any]
) -> None:
    env = lvm_env
    inst = env.manifest("vm", [first])
    apply_ok(env)
    vol = env.volume(inst, "d")
    write_pattern(vol, first["format"])
    want = content(vol, first["format"], tmp_path)

    source = {k: first["source"][k] for k in first["source"]}
    new = lvm("d", size="16MiB", template=source["template"], label=source.get("label"))
    action = migrate_once(env, "vm", inst, new)
    assert action["replaces"] == {"pool": "local", "volume": vol.name}
    apply_ok(env)
    assert not vol.exists()
    assert record(env, "local", vol.name) is None
    rec = record(env, "vg", vol.name)
    assert rec is not None and rec.migration is None and rec.schema_version == 1
    assert (rec.backend.value, rec.format.value, rec.backing) == ("lvm", "raw", None)
    assert sha(lvm_vg.segment_bytes(vol.name, SIZE)) == want
    tags = lvm_vg.lvs()[vol.name]
    assert any(t.startswith(BACKPOINTER) for t in tags)
    assert any(t.startswith("reconciler.copy.") for t in tags)  # its record copy
    assert env.plan_json()["actions"] == []  # converged


@pytest.mark.parametrize(("backend", "fmt"), [("flat", "raw"), ("qcow2", "qcow2")])
def test_lvm_to_file_keeps_the_data(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path, backend: str, fmt: str
) -> None:
    env = lvm_env
    inst = env.manifest("vm", [lvm("d", size="16MiB")])
    apply_ok(env)
    lv = f"{inst}_d"
    write_lv_pattern(lvm_vg, lv)
    want = sha(lvm_vg.segment_bytes(lv, SIZE))
    assert want != sha(bytes(SIZE))

    migrate_once(env, "vm", inst, disk("d", backend=backend, fmt=fmt, size="16MiB"))
    apply_ok(env)
    assert lv not in lvm_vg.lvs()
    assert record(env, "vg", lv) is None
    rec = record(env, "local", lv)
    assert rec is not None and (rec.backend.value, rec.format.value) == (backend, fmt)
    assert content(env.volume(inst, "d"), fmt, tmp_path) == want
    assert env.plan_json()["actions"] == []


@pytest.fixture
def second_vg(pools: Pools, lvm_vg: VolumeGroup) -> Iterator[tuple[VolumeGroup, str]]:
    """Another private VG (its own loop device) and a logical pool over it."""
    with spare_vg(lvm_vg, "x") as vg:
        yield vg, pools.define_logical(vg.vg)


def test_lvm_to_another_vg_stays_raw(
    pools: Pools, tmp_path: Path, lvm_vg: VolumeGroup, second_vg: tuple[VolumeGroup, str]
) -> None:
    vg2, logical2 = second_vg
    env = make_lvm_env(pools, tmp_path, lvm_vg)
    env.pools["vg2"] = (logical2, Path(f"/dev/{vg2.vg}"))
    env.lvm["vg2"] = vg2.section()
    env.write_config()
    inst = env.manifest("vm", [lvm("d", size="16MiB")])
    apply_ok(env)
    lv = f"{inst}_d"
    write_lv_pattern(lvm_vg, lv)
    want = lvm_vg.segment_bytes(lv, SIZE)

    migrate_once(env, "vm", inst, lvm("d", pool="vg2", size="24MiB"))  # and grows
    apply_ok(env)
    assert lv not in lvm_vg.lvs()
    rec = record(env, "vg2", lv)
    assert rec is not None and (rec.backend.value, rec.format.value) == ("lvm", "raw")
    assert rec.virtual_size == 24 * MiB and vg2.lv_size(lv) == 24 * MiB
    got = vg2.segment_bytes(lv)
    assert got[:SIZE] == want and got[SIZE:] == bytes(8 * MiB)
    assert env.plan_json()["actions"] == []
    lvm_vg.reset()


def test_a_copy_that_does_not_fit_in_the_vg_is_refused_in_the_plan(
    lvm_env: Env, lvm_vg: VolumeGroup
) -> None:
    """Two sparse 5 GiB files (almost no data) into an 8 GiB VG: an LV takes all its
    extents whatever the data, so only the first fits; the second is a plan error."""
    env = lvm_env
    a = env.manifest("a", [disk("d", size="5GiB")])
    b = env.manifest("b", [disk("d", size="5GiB")])
    apply_ok(env)
    assert env.volume(a, "d").stat().st_blocks * 512 < MiB  # sparse: the data is tiny
    env.manifest("a", [lvm("d", size="5GiB")], instance=a)
    env.manifest("b", [lvm("d", size="5GiB")], instance=b)
    plan = env.plan_json()
    assert [(x["action"], x["instance"]) for x in plan["actions"]] == [("migrate", a)]
    (err,) = plan["errors"]
    assert err["code"] == "migrate-no-space" and err["instance"] == b, err
    assert "pool vg" in err["message"]


def test_lvm_disks_have_no_other_layout(lvm_env: Env, lvm_vg: VolumeGroup) -> None:
    """An lvm pool's only layout is lvm/raw: asking for another is refused before anything
    is made, and the disk stays as it is."""
    env = lvm_env
    inst = env.manifest("vm", [lvm("d", size="16MiB")])
    apply_ok(env)
    lv = f"{inst}_d"
    for backend, fmt, why in (
        ("lvm", "qcow2", "backend lvm cannot hold format qcow2"),
        ("qcow2", "qcow2", "pool 'vg' does not serve backend qcow2"),
    ):
        env.manifest(
            "vm", [disk("d", backend=backend, fmt=fmt, pool="vg", size="16MiB")], instance=inst
        )
        rc, out, err = env.run()
        assert rc == 1 and why in out and "[manifest-invalid]" in out, out + err
    rec = record(env, "vg", lv)
    assert rec is not None and rec.format.value == "raw"


# -- SIGKILL at every step boundary ---------------------------------------------------

CRASH_BEFORE = {
    "rawin": disk("d", size="8MiB"),
    "qin": disk("d", backend="qcow2", fmt="qcow2", size="8MiB"),
    "out": lvm("d", size="8MiB"),
}
CRASH_AFTER = {
    "rawin": lvm("d", size="8MiB"),
    "qin": lvm("d", size="8MiB"),
    "out": disk("d", size="8MiB"),
}


def crash_setup(
    pools: Pools, root: Path, vg: VolumeGroup
) -> tuple[Env, dict[str, str], dict[str, str]]:
    env = make_lvm_env(pools, root, vg)
    ids = {name: env.manifest(name, [spec]) for name, spec in CRASH_BEFORE.items()}
    apply_ok(env)
    want = {}
    for name, inst in ids.items():
        if CRASH_BEFORE[name]["pool"] == "vg":
            write_lv_pattern(vg, f"{inst}_d")
            want[name] = sha(vg.segment_bytes(f"{inst}_d", 8 * MiB))
        else:
            vol = env.volume(inst, "d")
            write_pattern(vol, CRASH_BEFORE[name]["format"])
            want[name] = content(vol, CRASH_BEFORE[name]["format"], root)
    for name, spec in CRASH_AFTER.items():
        env.manifest(name, [spec], instance=ids[name])
    return env, ids, want


def data_at(env: Env, vg: VolumeGroup, pool: str, volume: str, fmt: str, tmp: Path) -> str:
    if pool == "vg":
        return sha(vg.segment_bytes(volume, 8 * MiB))
    return content(env.pool_dir(pool) / volume, fmt, tmp)


def check_after_kill(
    env: Env, vg: VolumeGroup, ids: dict[str, str], want: dict[str, str], tmp: Path
) -> None:
    """Never both claimed: one record per disk says where its data is (two only while a
    switched migration's old record is not yet removed); never lost: the data is there."""
    recs = [r for r in records(env) if r.kind is RecordKind.DISK]
    lvs = set(vg.lvs())
    for name, inst in ids.items():
        mine = [r for r in recs if r.instance == inst]
        if len(mine) == 2:
            (rec,) = [r for r in mine if r.migration is not None]
            assert rec.migration is not None and rec.migration.phase is MigrationPhase.SWITCHED
            assert {r.key() for r in mine} == {rec.key(), rec.migration.target()}
        else:
            (rec,) = mine
        mig = rec.migration
        if mig is not None and mig.phase is MigrationPhase.SWITCHED:
            there = lvs if mig.pool == "vg" else local_files(env)
            where = mig.volume if mig.volume in there else mig.final_volume
            got = data_at(env, vg, mig.pool, where, mig.format.value, tmp)
        else:
            got = data_at(env, vg, rec.pool, rec.volume, rec.format.value, tmp)
        assert got == want[name], (name, rec)


def check_converged(
    env: Env, vg: VolumeGroup, ids: dict[str, str], want: dict[str, str], tmp: Path
) -> None:
    recs = records(env)
    assert all(r.state is RecordState.READY and r.migration is None for r in recs), recs
    disks = {r.instance: r for r in recs if r.kind is RecordKind.DISK}
    for name, inst in ids.items():
        rec = disks[inst]
        spec = CRASH_AFTER[name]
        assert (rec.pool, rec.backend.value, rec.format.value) == (
            spec["pool"],
            spec["backend"],
            spec["format"],
        )
        assert data_at(env, vg, rec.pool, rec.volume, rec.format.value, tmp) == want[name]
    assert set(vg.lvs()) == {r.volume for r in recs if r.pool == "vg"}
    assert local_files(env) == {r.volume for r in recs if r.pool == "local"}


def test_kill_at_every_step_of_lvm_migrations(
    pools: Pools, tmp_path: Path, lvm_vg: VolumeGroup
) -> None:
    env, ids, want = crash_setup(pools, tmp_path / "trace", lvm_vg)
    steps = env.traced_steps("--jobs", "1")
    names = set(steps)
    assert {"record.migrating", "volume.copied", "volume.verified", "record.switched"} <= names
    check_converged(env, lvm_vg, ids, want, tmp_path)

    def kill_at(k: int, vg: VolumeGroup) -> None:
        root = tmp_path / f"k{k}"
        env, ids, want = crash_setup(pools, root, vg)
        killed = env.subprocess("--jobs", "1", env={"RECONCILER_CRASH_AT": str(k)})
        assert killed.returncode == -signal.SIGKILL, (
            f"kill point {k}:\n{killed.stdout}\n{killed.stderr}"
        )
        check_after_kill(env, vg, ids, want, root)
        rc, out, err = env.run()
        assert rc == 0, f"kill point {k} ({steps[k - 1]}): {out}{err}"
        assert env.plan_json()["actions"] == [], f"kill point {k} did not converge"
        check_converged(env, vg, ids, want, root)

    # Two kill points at a time, each on a VG no other point uses while it runs.
    with spare_vg(lvm_vg, "k") as vg2:
        at_each_with(range(1, len(steps) + 1), [lvm_vg, vg2], kill_at)
    lvm_vg.reset()


# -- adopt ----------------------------------------------------------------------------


def adopt(env: Env, inst: str, volume: str, fmt: str, *more: str) -> tuple[int, str, str]:
    return env.main(
        [
            *("adopt", "--config", str(env.config_path), "--instance", inst, "--disk", "d"),
            *("--volume", f"vg/{volume}", "--format", fmt, *more, str(env.manifests)),
        ]
    )


def foreign_lv(vg: VolumeGroup, name: str, size: str = "16m") -> None:
    """An LV another tool made (no tags), as an operator would bring one."""
    vg.lvm("lvcreate", "-an", "-Zn", "-Wn", "-L", size, "-n", name, vg.vg)


def test_adopt_an_existing_lv(lvm_env: Env, lvm_vg: VolumeGroup) -> None:
    env = lvm_env
    inst = env.manifest("vm", [lvm("d", size="16MiB")])
    lv = f"{inst}_d"
    foreign_lv(lvm_vg, lv)
    write_lv_pattern(lvm_vg, lv)
    before = lvm_vg.segment_bytes(lv)
    plan = env.plan_json()
    assert plan["actions"] == [] and [e["code"] for e in plan["errors"]] == ["unmanaged-volume"]

    rc, _, err = adopt(env, inst, lv, "qcow2")
    assert rc == 1 and "cannot hold format qcow2" in err and records(env) == []
    rc, _, err = adopt(env, inst, lv, "raw")
    assert rc == 0, err
    assert "look like" not in err
    rec = record(env, "vg", lv)
    assert rec is not None and (rec.backend.value, rec.format.value) == ("lvm", "raw")
    assert rec.virtual_size == 16 * MiB and rec.backing is None
    assert any(t.startswith("reconciler.copy.") for t in lvm_vg.lvs()[lv])
    plan = env.plan_json()
    assert plan["actions"] == [] and plan["errors"] == [], plan
    assert env.run()[0] == 0
    assert lvm_vg.segment_bytes(lv) == before  # adopting wrote nothing into it


def test_adopt_an_lv_with_a_guest_written_qcow2_header_as_raw(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path
) -> None:
    env = lvm_env
    inst = env.manifest("vm", [lvm("d", size="16MiB")])
    lv = f"{inst}_d"
    foreign_lv(lvm_vg, lv)
    hostile = tmp_path / "hostile.qcow2"
    subprocess.run(
        [
            *("qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw"),
            str(hostile),
            "1G",
        ],
        check=True,
    )
    lvm_vg.write_lv(lv, 0, hostile.read_bytes()[:65536])
    rc, _, err = adopt(env, inst, lv, "raw")
    assert rc == 0, err
    assert "look like qcow2" in err and "adopted as the declared raw" in err
    rec = record(env, "vg", lv)
    assert rec is not None and rec.format.value == "raw" and rec.backing is None
    assert rec.virtual_size == 16 * MiB  # the LV's size, not the header's 1 GiB
    plan = env.plan_json()
    assert plan["actions"] == [] and plan["errors"] == []
    assert [w["code"] for w in plan["warnings"]] == ["format-mismatch"]


def test_a_migration_copy_name_taken_is_left_alone(lvm_env: Env, lvm_vg: VolumeGroup) -> None:
    """An LV of the copy's name without a record (file -> lvm copies to the disk's own
    name): the plan says it is unmanaged, apply touches neither volume."""
    env = lvm_env
    inst = env.manifest("vm", [disk("d", size="16MiB")])
    apply_ok(env)
    lv = f"{inst}_d"
    foreign_lv(lvm_vg, lv)
    lvm_vg.write_lv(lv, 0, b"SOMEONE ELSE'S" * 100)
    before = lvm_vg.segment_bytes(lv)
    env.manifest("vm", [lvm("d", size="16MiB")], instance=inst)
    plan = env.plan_json()
    assert plan["actions"] == []
    assert [(e["code"], e["pool"], e["volume"]) for e in plan["errors"]] == [
        ("unmanaged-volume", "vg", lv)
    ]
    assert env.run()[0] == 1
    assert lvm_vg.segment_bytes(lv) == before
    assert env.volume(inst, "d").exists()
    assert record(env, "local", lv) is not None
    assert set(lvm_vg.lvs()) == {lv}


# -- taking in host files (import) ----------------------------------------------------


def test_take_file_fills_a_new_lv_and_never_replaces_one(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path
) -> None:
    """A host file's bytes into a new LV (zeros past its end, to the LV's whole extents);
    an existing name is refused; a temporary LV an interrupted import left is swept; the
    paths it names are /dev/VG/LV only; an overlay cannot be pointed into it."""
    env = lvm_env
    src = tmp_path / "nova-disk"
    data = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(40000))  # 1.25 MB
    src.write_bytes(data)
    with Session(load_config(str(env.config_path))) as s:
        drv = s.managing_drivers()["vg"]
        drv.claim()
        with drv.lock("imported"):
            drv.take_file(str(src), "imported", keep_source=True)
        assert src.exists()
        got = lvm_vg.segment_bytes("imported")
        assert len(got) == 2 * MiB and got == data + bytes(2 * MiB - len(data))
        with drv.lock("imported"), pytest.raises(ReconcileError, match="exists"):
            drv.take_file(str(src), "imported", keep_source=False)
        assert src.exists() and lvm_vg.segment_bytes("imported") == got
        with drv.lock("other"):
            drv.take_file(str(src), "other", keep_source=False)
        assert not src.exists()
        assert lvm_vg.segment_bytes("other") == got

        foreign_lv(lvm_vg, LV_TEMP_PREFIX + "x", "1m")  # not ours (no back-pointer): kept
        drv.prepare_copy(LV_TEMP_PREFIX + "y", Backend.LVM, DiskFormat.RAW, MiB)  # ours
        assert drv.sweep_temp() == [LV_TEMP_PREFIX + "y"]
        assert LV_TEMP_PREFIX + "x" in lvm_vg.lvs() and LV_TEMP_PREFIX + "y" not in lvm_vg.lvs()

        assert drv.volume_at(f"/dev/{lvm_vg.vg}/imported") == "imported"
        assert drv.volume_at(f"/dev/{lvm_vg.vg}x/imported") is None
        assert drv.volume_at(str(env.pool_dir("local") / "imported")) is None
        with pytest.raises(ReconcileError, match="overlay"):
            overlays_of(drv).point_overlay_at(str(tmp_path / "x.qcow2"), "_cache_x")


def test_import_nova_into_an_lvm_pool_is_refused_before_anything_moves(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path
) -> None:
    """import-nova records Nova's disks as flat or qcow2 disks, which an lvm pool does not
    serve: every instance is refused, nothing is moved or recorded."""
    from tests.test_import_nova import nova_host, tree

    env = lvm_env
    nova, _ = nova_host(tmp_path)
    before = tree(nova)
    rc, out, err = env.main(
        [
            *("import-nova", "--config", str(env.config_path), "--instances-path", str(nova)),
            *("--images-type", "raw", "--pool", "vg", "--out", str(env.manifests)),
        ]
    )
    assert rc == 1, out + err
    assert "pool vg serves lvm" in err and "not imported (nothing of it is moved)" in err
    assert tree(nova) == before
    assert records(env) == [] and set(lvm_vg.lvs()) == set()


def test_an_lv_of_several_segments_is_refused_at_apply_in_the_test_mode(
    lvm_env: Env, lvm_vg: VolumeGroup
) -> None:
    """Activation off only (no device-mapper): an LV grown after another LV was made lies
    in two ranges of the PV, which qemu-img cannot address as one device. The migration
    fails with that reason and is rolled back: the LV stays the disk, unchanged, and no
    copy is left."""
    env = lvm_env
    a = env.manifest("a", [lvm("d", size="4MiB")])
    apply_ok(env)
    env.manifest("b", [lvm("d", size="4MiB")])  # after a's extents, so a grows past it
    apply_ok(env)
    env.manifest("a", [lvm("d", size="8MiB")], instance=a)
    apply_ok(env)
    lv = f"{a}_d"
    assert len(lvm_vg.segments(lv)) == 2
    write_lv_pattern(lvm_vg, lv)
    before = lvm_vg.segment_bytes(lv)
    migrate_once(env, "a", a, disk("d", backend="qcow2", fmt="qcow2", size="8MiB"))
    rc, out, err = env.run()
    assert rc == 1 and "lies in 2 segments" in out + err, out + err
    rec = record(env, "vg", lv)
    assert rec is not None and rec.migration is None and rec.schema_version == 1
    assert lvm_vg.segment_bytes(lv) == before
    assert not env.volume(a, "d").exists() and record(env, "local", lv) is None


def test_a_copy_into_a_fragmented_vg_is_one_segment_or_refused(
    lvm_env: Env, lvm_vg: VolumeGroup
) -> None:
    """Test mode: a copy is allocated in one run of free extents (one range qemu-img can
    address). Free space in 4 MiB holes only (the rest of the VG taken by another tool's
    LV): an 8 MiB copy is refused at apply in LVM's words and rolled back; once a run of
    8 MiB is free, it is made in one segment and compares equal."""
    env = lvm_env
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    holes = []
    for i in range(2):  # one apply each: LVs in this order on the PV, hole, wall, ...
        holes.append(env.manifest(f"hole{i}", [lvm("d", size="4MiB")]))
        apply_ok(env)
        env.manifest(f"wall{i}", [lvm("d", size="4MiB")])
        apply_ok(env)
    inst = env.manifest("vm", [disk("d", backend="qcow2", fmt="qcow2", size="8MiB")])
    apply_ok(env)
    lvm_vg.lvm("lvcreate", "-an", "-Zn", "-Wn", "-l", "100%FREE", "-n", "rest", lvm_vg.vg)
    for i, h in enumerate(holes):
        env.manifest(f"hole{i}", [], instance=h, deleted=True)
    apply_ok(env)
    vol = env.volume(inst, "d")
    write_pattern(vol, "qcow2")
    want = content(vol, "qcow2", env.root)
    migrate_once(env, "vm", inst, lvm("d", size="8MiB"))
    rc, out, err = env.run()
    assert rc == 1 and "contiguous" in out + err, out + err
    lv = f"{inst}_d"
    assert lv not in lvm_vg.lvs() and record(env, "vg", lv) is None
    rec = record(env, "local", lv)
    assert rec is not None and rec.migration is None
    assert content(vol, "qcow2", env.root) == want

    lvm_vg.lvm("lvremove", "-y", f"{lvm_vg.vg}/rest")
    apply_ok(env)
    assert len(lvm_vg.segments(lv)) == 1
    assert sha(lvm_vg.segment_bytes(lv, 8 * MiB)) == want
    assert not vol.exists()


# -- encryption (model/keying.py) ------------------------------------------------------


def test_a_plain_lv_is_encrypted_and_a_luks_file_moves_in_as_it_is(
    lvm_env: Env, lvm_vg: VolumeGroup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plain LV -> luks (a new key: the LV read from its PV decrypts with it to the old
    data); a raw LUKS file -> an LV on the same daemon (keep: its header and ciphertext
    copied as they are, the same secret, no key read)."""
    spy = KeySpy(monkeypatch)
    env = lvm_env
    env.safety = {"maxDeletePercent": 100}
    env.write_config()
    size = 8 * MiB
    inst = env.manifest("vm", [lvm("p", size="8MiB"), encrypted(disk("f", size="8MiB"))])
    apply_ok(env)
    p_lv, f_vol = f"{inst}_p", f"{inst}_f"
    write_lv_pattern(lvm_vg, p_lv)
    want = lvm_vg.segment_bytes(p_lv, size)
    f_rec = record(env, "local", f_vol)
    assert f_rec is not None and f_rec.encryption is not None
    f_bytes = env.volume(inst, "f").read_bytes()

    env.manifest(
        "vm",
        [encrypted(lvm("p", size="8MiB")), encrypted(lvm("f", size="8MiB"))],
        instance=inst,
    )
    plan = env.plan_json()
    assert not plan["errors"], plan["errors"]
    reasons = {a["disk"]: a["reason"] for a in plan["actions"]}
    assert "key (new)" in reasons["p"] and "key (keep)" in reasons["f"], reasons
    apply_ok(env)
    assert env.plan_json()["actions"] == []

    p = record(env, "vg", p_lv)
    assert p is not None and p.encryption is not None and p.migration is None
    at_rest = lvm_vg.segment_bytes(p_lv)
    assert at_rest[:6] == b"LUKS\xba\xbe" and want[:65536] not in at_rest
    (tmp_path / "p.lv").write_bytes(at_rest)
    got = decrypted(tmp_path / "p.lv", p, spy.keys[p.encryption.secret], tmp_path)
    assert got[:size] == want

    f = record(env, "vg", f_vol)
    assert f is not None and f.encryption == f_rec.encryption  # the same secret, kept
    assert record(env, "local", f_vol) is None and not env.volume(inst, "f").exists()
    assert lvm_vg.segment_bytes(f_vol, len(f_bytes)) == f_bytes
