"""Apply against a real libvirtd dir pool: create, converge, resize, delete, refuse."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from reconciler.model.record import RecordState
from tests.conftest import Pools, daemon_dir
from tests.env import Env, disk

pytestmark = pytest.mark.libvirtd


def has_data(path: Path) -> bool:
    """Whether the file has any data extent (SEEK_DATA finds none in a hole-only file)."""
    with open(path, "rb") as f:
        try:
            os.lseek(f.fileno(), 0, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return False
            raise
    return True


def fs_type(path: Path) -> str:
    out = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip()


def qemu_info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "-f", "qcow2", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    info: dict[str, object] = json.loads(out.stdout)
    return info


def test_creates_every_template_kind_and_converges(env: Env) -> None:
    inst = env.manifest(
        "web",
        [
            disk(
                "root", backend="qcow2", fmt="qcow2", size="128MiB", template="ext4", label="root"
            ),
            disk("eph0", size="64MiB", template="ext4", label="eph0"),
            disk("swap", size="32MiB", template="swap"),
            disk("cfg", size="32MiB", template="vfat", label="CONFIG-2"),
            disk("scratch", fmt="qcow2", size="1GiB", template="blank"),
            disk("blank", size="16MiB", template="blank"),
        ],
    )
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert "Apply: 6 done, 0 skipped, 0 failed." in out

    root = env.volume(inst, "root")
    info = qemu_info(root)
    assert info["virtual-size"] == 128 << 20
    # The overlay names its cache entry with an explicit raw backing format.
    backing = Path(str(info["backing-filename"]))
    assert backing.parent == env.pool_dir() and backing.name.startswith("_cache_template-ext4-")
    assert info["backing-filename-format"] == "raw"
    assert fs_type(backing) == "ext4"

    assert fs_type(env.volume(inst, "eph0")) == "ext4"
    assert os.stat(env.volume(inst, "eph0")).st_size == 64 << 20
    assert fs_type(env.volume(inst, "swap")) == "swap"
    assert fs_type(env.volume(inst, "cfg")) == "vfat"
    assert qemu_info(env.volume(inst, "scratch"))["virtual-size"] == 1 << 30
    blank = env.volume(inst, "blank")
    assert os.stat(blank).st_size == 16 << 20
    assert not has_data(blank)  # sparse (st_blocks counts the record copy's xattr block)

    store = env.store()
    records, bad = store.load_all()
    store.close()
    assert not bad
    disks = {r.disk: r for r in records if r.instance == inst}
    assert set(disks) == {"root", "eph0", "swap", "cfg", "scratch", "blank"}
    assert all(r.state is RecordState.READY for r in disks.values())
    assert disks["root"].backing == backing.name

    again = env.plan_json("--detailed-exitcode")
    assert again["actions"] == [] and again["errors"] == []
    rc, out, _ = env.run("--dry-run", "--detailed-exitcode")
    assert rc == 0 and "No changes." in out


def test_resize_grows_raw_and_qcow2_by_recorded_format(env: Env) -> None:
    inst = env.manifest(
        "db",
        [
            disk("data", size="32MiB", template="blank"),
            disk("root", backend="qcow2", fmt="qcow2", size="64MiB", template="ext4"),
        ],
    )
    assert env.run()[0] == 0
    env.manifest(
        "db",
        [
            disk("data", size="48MiB", template="blank"),
            disk("root", backend="qcow2", fmt="qcow2", size="96MiB", template="ext4"),
        ],
        instance=inst,
    )
    plan = env.plan_json()
    assert [a["action"] for a in plan["actions"]] == ["resize", "resize"]
    assert plan["actions"][0]["patch"] == [{"op": "replace", "path": "/size", "value": 48 << 20}]
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert os.stat(env.volume(inst, "data")).st_size == 48 << 20
    assert qemu_info(env.volume(inst, "root"))["virtual-size"] == 96 << 20
    assert env.plan_json()["actions"] == []


def test_shrink_is_refused_and_nothing_changes(env: Env) -> None:
    inst = env.manifest("db", [disk("data", size="32MiB")])
    assert env.run()[0] == 0
    env.manifest("db", [disk("data", size="16MiB")], instance=inst)
    rc, out, _ = env.run()
    assert rc == 1
    assert "shrink-refused" in out
    assert os.stat(env.volume(inst, "data")).st_size == 32 << 20


def test_tombstone_deletes_and_retain_releases(env: Env) -> None:
    # Enough other disks that deleting two stays under the 10% safety limit.
    for i in range(20):
        env.manifest(f"keep{i}", [disk("d", size="1MiB")])
    inst = env.manifest(
        "old",
        [
            disk("disk", size="8MiB"),
            disk("data", size="8MiB", policy="Retain"),
        ],
    )
    assert env.run()[0] == 0
    env.manifest("old", [], instance=inst, deleted=True)
    plan = env.plan_json()
    kinds = {a["disk"]: (a["action"], a["destructive"]) for a in plan["actions"]}
    assert kinds == {"disk": ("delete", True), "data": ("release", False)}
    rc, out, err = env.run()
    assert rc == 0, out + err
    assert not env.volume(inst, "disk").exists()
    assert env.volume(inst, "data").exists()  # kept, no longer managed
    store = env.store()
    assert [r for r in store.load_all()[0] if r.instance == inst] == []
    store.close()
    # The kept volume is now unmanaged: nothing plans to touch it.
    assert env.plan_json()["actions"] == []


def test_mass_delete_needs_force(env: Env) -> None:
    insts = [env.manifest(f"vm{i}", [disk("d", size="1MiB")]) for i in range(3)]
    assert env.run()[0] == 0
    env.manifest("vm0", [], instance=insts[0], deleted=True)
    rc, out, _ = env.run()
    assert rc == 1 and "delete-threshold" in out
    assert env.volume(insts[0], "d").exists()
    rc, out, err = env.run("--force")
    assert rc == 0, out + err
    assert not env.volume(insts[0], "d").exists()


def test_orphans_are_kept_unless_pruned(env: Env) -> None:
    for i in range(20):
        env.manifest(f"keep{i}", [disk("d", size="1MiB")])
    inst = env.manifest("gone", [disk("d", size="1MiB")])
    assert env.run()[0] == 0
    env.remove_manifest("gone")
    plan = env.plan_json()
    assert plan["actions"] == []
    assert [w["code"] for w in plan["warnings"]] == ["orphaned-record"]
    assert env.run()[0] == 0
    assert env.volume(inst, "d").exists()
    rc, out, err = env.run("--prune")
    assert rc == 0, out + err
    assert not env.volume(inst, "d").exists()


def test_volume_deleted_behind_our_back_is_recreated_as_drift(env: Env) -> None:
    inst = env.manifest("vm", [disk("d", size="4MiB", template="ext4")])
    assert env.run()[0] == 0
    env.volume(inst, "d").unlink()
    plan = env.plan_json()
    assert [a["action"] for a in plan["actions"]] == ["create"]
    assert [w["code"] for w in plan["warnings"]] == ["drift"]
    assert env.run()[0] == 0
    assert fs_type(env.volume(inst, "d")) == "ext4"


def test_unmanaged_volume_in_the_way_is_never_touched(env: Env) -> None:
    inst = "6f1c2a3e-1b2c-4d5e-8f90-0123456789ab"
    squatter = env.pool_dir() / f"{inst}_d"
    squatter.write_bytes(b"operator data")
    env.manifest("vm", [disk("d", size="4MiB")], instance=inst)
    rc, out, _ = env.run()
    assert rc == 1 and "unmanaged-volume" in out
    assert squatter.read_bytes() == b"operator data"


def test_planted_symlinks_are_refused_and_targets_untouched(env: Env, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"do not touch")
    before = secret.stat()
    # 1. A symlink where a new disk's volume would go: unmanaged, never followed.
    inst = "0e0e0e0e-1b2c-4d5e-8f90-0123456789ab"
    (env.pool_dir() / f"{inst}_d").symlink_to(secret)
    env.manifest("a", [disk("d", size="4MiB")], instance=inst)
    rc, out, _ = env.run()
    assert rc == 1 and "unmanaged-volume" in out
    # 2. A managed volume swapped for a symlink: growing it is refused.
    inst2 = env.manifest("b", [disk("d", size="4MiB")])
    assert env.run()[0] == 1  # the first error is still there
    vol = env.volume(inst2, "d")
    vol.unlink()
    vol.symlink_to(secret)
    env.manifest("b", [disk("d", size="8MiB")], instance=inst2)
    rc, out, _ = env.run()
    assert rc == 1
    assert "symlink" in out
    # 3. A symlink planted under a temporary file's name is removed, not followed.
    tmp_link = env.pool_dir() / ".reconciler-tmp-x"
    tmp_link.symlink_to(secret)
    env.manifest("c", [disk("d", size="4MiB")])
    env.run()
    assert not os.path.lexists(tmp_link)
    after = secret.stat()
    assert secret.read_bytes() == b"do not touch"
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_saved_plan_is_applied_exactly_or_refused(env: Env, tmp_path: Path) -> None:
    inst = env.manifest("vm", [disk("d", size="4MiB")])
    plan_file = tmp_path / "plan.json"
    rc, out, _ = env.run("--dry-run", "--plan-out", str(plan_file))
    assert rc == 0 and "+ create" in out
    saved = json.loads(plan_file.read_text())
    assert [a["action"] for a in saved["actions"]] == ["create"]
    argv = ["apply", str(plan_file), "--config", str(env.config_path), str(env.manifests)]
    rc, out, err = env.main(argv)
    assert rc == 0, out + err
    assert env.volume(inst, "d").exists()
    # Applying it again: a fresh plan has nothing to create.
    rc, out, err = env.main(argv)
    assert rc == 1
    assert "differs from a fresh plan" in err and "in the plan, but not in a fresh plan" in err


def test_second_run_makes_no_mutating_call(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    env.manifest(
        "vm",
        [
            disk("a", size="8MiB", template="ext4"),
            disk("b", backend="qcow2", fmt="qcow2", size="8MiB", template="swap"),
        ],
    )
    assert env.run()[0] == 0

    calls: list[str] = []

    def spy(cls: type, name: str) -> None:
        real = getattr(cls, name)

        def wrapper(self: object, *a: object, **k: object) -> object:
            calls.append(f"{cls.__name__}.{name}")
            return real(self, *a, **k)

        monkeypatch.setattr(cls, name, wrapper)

    for name in ("createXML", "createXMLFrom", "delete", "build", "undefine", "destroy"):
        spy(libvirt.virStoragePool, name)
    for name in ("delete", "resize", "wipe", "upload"):
        spy(libvirt.virStorageVol, name)
    for name in (
        "unlink",
        "remove",
        "rename",
        "replace",
        "truncate",
        "ftruncate",
        "mkdir",
        "rmdir",
        "symlink",
    ):
        real = getattr(os, name)

        def os_wrapper(*a: object, _n: str = name, _r: object = real, **k: object) -> object:
            calls.append(f"os.{_n}")
            return _r(*a, **k)  # type: ignore[operator]

        monkeypatch.setattr(os, name, os_wrapper)
    real_open = os.open

    def spy_open(path: object, flags: int, *a: object, **k: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            calls.append(f"os.open({path})")
        return real_open(path, flags, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy_open)
    real_run = subprocess.run

    def spy_run(*a: object, **k: object) -> object:
        calls.append(f"subprocess.run({a[0]!r})")
        return real_run(*a, **k)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", spy_run)
    from reconciler.drivers.host.store import SqliteRecordStore

    spy(SqliteRecordStore, "put")
    spy(SqliteRecordStore, "delete")

    rc, out, err = env.run()
    assert rc == 0, out + err
    assert "No changes." in out
    assert calls == []


def test_disk_full_fails_cleanly(pools: Pools, tmp_path: Path, libvirt_uri: str) -> None:
    """ENOSPC while making a disk: a clear error, no partial volume, consistent records."""
    mnt = daemon_dir(libvirt_uri) / "mnt" / tmp_path.name
    mnt.mkdir(parents=True, exist_ok=True)
    # A small loop-mounted ext4 (tmpfs would not fill: mkfs zeroes by punching holes).
    backing = tmp_path / "fs.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(backing)], check=True)
    subprocess.run(["mount", "-o", "loop", str(backing), str(mnt)], check=True)
    try:
        pool = pools.make(mnt)
        env = Env(tmp_path / "env", pool.uri, {"local": (pool.name, pool.path)})
        env.write_config()
        small = env.manifest("small", [disk("d", size="1MiB")])
        inst = env.manifest("big", [disk("d", size="400MiB", template="xfs", label="big")])
        rc, out, _ = env.run()
        assert rc == 1, out
        (failure,) = [line for line in out.splitlines() if line.startswith("FAILED")]
        assert "No space left on device" in failure and "mkfs.xfs" in failure, failure
        assert env.volume(small, "d").exists()
        left = sorted(
            p.name for p in pool.path.iterdir() if p.name not in (".reconciler", "lost+found")
        )
        assert left == [env.volume(small, "d").name]  # no partial disk, no partial cache entry
        store = env.store()
        records, bad = store.load_all()
        store.close()
        assert not bad
        assert sorted(r.volume for r in records) == [env.volume(small, "d").name]
        # The next plan simply tries again.
        plan = env.plan_json()
        assert [(a["action"], a["instance"]) for a in plan["actions"]] == [("create", inst)]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_replanned_move_finishes_the_old_record(pools: Pools, tmp_path: Path) -> None:
    """A live run whose precondition fails re-plans; a re-planned move still removes the
    record it replaces (or the disk would end up with two records)."""
    from reconciler.control.session import Session
    from reconciler.diff import plan as make_plan
    from reconciler.schema.load import load_config

    a = pools.make(tmp_path / "a")
    b = pools.make(tmp_path / "b")
    env = Env(tmp_path / "env", a.uri, {"local": (a.name, a.path), "other": (b.name, b.path)})
    env.write_config()
    inst = env.manifest("vm", [disk("d", size="4MiB")])
    assert env.run()[0] == 0
    store = env.store()
    (rec,) = [r for r in store.load_all()[0] if r.instance == inst]
    # A run stopped while making it: the record says creating and the volume is gone.
    store.put(
        rec.model_copy(update={"state": RecordState.CREATING, "generation": rec.generation + 1}),
        rec.generation,
    )
    env.volume(inst, "d").unlink()
    store.close()
    env.manifest("vm", [disk("d", size="4MiB", pool="other")], instance=inst)
    with Session(load_config(str(env.config_path))) as s:
        s.load([str(env.manifests)])
        p = make_plan(s.desired, s.observe(), s.options)
        (action,) = p.actions
        assert action.replaces == ("local", rec.volume)
        # Another process touches the old record between planning and applying.
        cur = s.store.get("local", rec.volume)
        assert cur is not None
        s.store.put(cur.model_copy(update={"generation": cur.generation + 1}), cur.generation)
        result = s.executor(saved=False).apply(p.actions)
    assert [o.status for o in result.outcomes] == ["done"]
    store = env.store()
    records = [r for r in store.load_all()[0] if r.instance == inst]
    store.close()
    assert [(r.pool, r.state) for r in records] == [("other", RecordState.READY)]
    assert env.volume(inst, "d", pool="other").exists()
    assert env.plan_json()["actions"] == []
